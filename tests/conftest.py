"""Shared pytest setup: fixtures for the real peers live in ``tests/fixtures/``."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from pipeline.lifecycle.state import WorkDir
from tests.helpers import TEST_KEY_HEX
from transforms.consent_ids import KEY_ENV, KEY_FILE_ENV, KEY_SOURCE_ENV

# Every test (and every CLI it starts) writes Consent ids under the tests' own key, read from a private file the
# way a deployment's is; a test about keys sets its own environment.
_KEY_DIR = Path(tempfile.mkdtemp(prefix="ndop-test-key-"))
(_KEY_DIR / "id.key").write_text(TEST_KEY_HEX + "\n")
os.chmod(_KEY_DIR / "id.key", 0o600)
for _name in (KEY_ENV, KEY_SOURCE_ENV):
    os.environ.pop(_name, None)
os.environ[KEY_FILE_ENV] = str(_KEY_DIR / "id.key")

pytest_plugins = ["tests.fixtures.fhir", "tests.fixtures.hapi", "tests.fixtures.mesh", "tests.fixtures.memfs",
                  "tests.fixtures.flink"]


@pytest.fixture(scope="session", autouse=True)
def _stop_prism_at_the_end() -> Iterator[None]:
    """Whichever test module started Beam's shared Prism job server, stop it while pytest still captures its log
    (tests/test_runners.stop_prism_job_server): otherwise Beam stops it at exit, after pytest's summary."""
    yield
    from tests.test_runners import stop_prism_job_server

    stop_prism_job_server()


@pytest.fixture
def work_dir(tmp_path) -> WorkDir:
    return WorkDir(tmp_path / "work")

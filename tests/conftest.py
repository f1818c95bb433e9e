"""Shared pytest setup: fixtures for the real peers live in ``tests/fixtures/``."""
from __future__ import annotations

import pytest

from pipeline.state import WorkDir

pytest_plugins = ["tests.fixtures.fhir", "tests.fixtures.hapi", "tests.fixtures.mesh", "tests.fixtures.memfs",
                  "tests.fixtures.flink"]


@pytest.fixture
def work_dir(tmp_path) -> WorkDir:
    return WorkDir(tmp_path / "work")

"""Helpers every test file shares: the repo root, the real CLI in a subprocess, FHIR read-back, test set-up."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

from pipeline.core.faults import FAULT_ENV
from pipeline.core.nhs import NHS_NUMBER_SYSTEM
from pipeline.fhir.config import FhirClientConfig
from pipeline.fhir.search import iter_search
from pipeline.fhir.sessions import open_session
from pipeline.core.clock import isoformat, utcnow
from pipeline.lifecycle.state import RequestRecord, WorkDir
from transforms.consent_ids import KeySource, parse_key
from transforms.vocabulary import IDENTIFIER_SYSTEM

REPO_ROOT = Path(__file__).resolve().parent.parent

TEST_KEY_HEX = "7e57" * 16  # the tests' Consent id key (tests/conftest.py puts it in NDOP_ID_KEY_FILE)
TEST_KEY = parse_key(TEST_KEY_HEX, "the tests' key")
consent_id = TEST_KEY.consent_id  # a patient's Consent id as every test run writes it


def key_source_for_tests() -> KeySource:
    """Where a test pipeline's workers read the tests' key (the file conftest.py wrote)."""
    return KeySource(f"file:{os.environ['NDOP_ID_KEY_FILE']}", TEST_KEY.fingerprint)


def cli_command(*args: str) -> list[str]:
    """``ndop ARGS`` as this checkout's code runs it."""
    return [sys.executable, "-m", "pipeline.cli", *args]


def cli_env(extra: Mapping[str, str] | None = None, *, drop_fhir: bool = False) -> dict[str, str]:
    """The test process's environment (without a stray fault point; without FHIR_* when asked), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV and not (drop_fhir and k.startswith("FHIR_"))}
    env.update(extra or {}, PYTHONPATH=str(REPO_ROOT))
    return env


def cli(*args: str, env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] = REPO_ROOT,
        timeout: float = 120, drop_fhir: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess and capture its output."""
    return subprocess.run(cli_command(*args), cwd=cwd, env=cli_env(env, drop_fhir=drop_fhir), capture_output=True,
                          text=True, timeout=timeout)


def consents_of(fhir_url: str, numbers: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """Every Consent stored for each patient, found by its business identifier (a list: a duplicate shows)."""
    with open_session(FhirClientConfig.from_env(env={}, base_url=fhir_url, auth="none")) as session:
        return {n: list(iter_search(session, fhir_url, "Consent", {"identifier": f"{IDENTIFIER_SYSTEM}|{consent_id(n)}"}))
                for n in numbers}


def force_state(work_dir: WorkDir, request_id: str, state: str, **fields: Any) -> RequestRecord:
    """Test set-up only: put a record in ``state`` directly, past the transition table (as a hand edit would)."""
    record: dict[str, Any] = {**work_dir.load(request_id), **fields, "state": state}
    record["history"] = [*record.get("history", []), {"state": state, "at": isoformat(utcnow())}]
    return work_dir.save(record)


def consents_for_patient(fhir_url: str, nhs_number: str) -> list[dict[str, Any]]:
    """Every Consent stored for one patient, found by the patient's NHS number (a duplicate shows)."""
    with open_session(FhirClientConfig.from_env(env={}, base_url=fhir_url, auth="none")) as session:
        return list(iter_search(session, fhir_url, "Consent", {"patient:identifier": f"{NHS_NUMBER_SYSTEM}|{nhs_number}"}))


def summarise(results: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Add up WriteConsents' per-bundle results."""
    total = {"created": 0, "updated": 0, "failed": 0, "refused": 0}
    for result in results:
        for key in total:
            total[key] += int(result.get(key, 0))
    return total

"""The local FHIR server launcher: it answers on loopback and leaves no process behind."""
from __future__ import annotations

import os

import pytest
import time

import requests

from dev.fhir_server import FhirServer


def test_session_server_answers_metadata(fhir_server: str) -> None:
    assert fhir_server.startswith("http://127.0.0.1:")
    body = requests.get(f"{fhir_server}/metadata", timeout=10).json()
    assert body["resourceType"] == "CapabilityStatement"
    assert body["fhirVersion"].startswith("4.0")


def test_server_is_stopped_even_when_the_block_raises(tmp_path) -> None:
    server = FhirServer(tmp_path / "fhir")
    with pytest.raises(RuntimeError, match="boom"):
        with server:
            pid = server.pid
            assert requests.get(f"{server.base_url}/metadata", timeout=10).status_code == 200
            raise RuntimeError("boom")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.base_url}/metadata", timeout=2)


def test_a_server_launched_early_is_found_ready_after_its_start_timeout_has_passed(tmp_path) -> None:
    # the HAPI fixture launches at collection and first waits minutes later: that wait must still ask
    server = FhirServer(tmp_path / "early", start_timeout=1).launch()
    try:
        launched = time.monotonic()
        while not _answers(server.base_url) and time.monotonic() - launched < 60:
            time.sleep(0.2)
        time.sleep(max(0.0, 1.5 - (time.monotonic() - launched)))  # past its start_timeout, up
        server.wait_ready()
        assert requests.get(f"{server.base_url}/metadata", timeout=10).status_code == 200
    finally:
        server.stop()
    assert not server.running


def _answers(base_url: str) -> bool:
    try:
        return requests.get(f"{base_url}/metadata", timeout=2).status_code == 200
    except requests.RequestException:
        return False

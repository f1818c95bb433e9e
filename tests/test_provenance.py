"""Provenance (transforms/provenance.py): valid R4, no NHS number, one per bundle over exactly the Consents
written, in the same transaction or after the batch, idempotent on re-run; read back with
``Provenance?target=Consent/<id>`` from both real FHIR servers (sekmet, and HAPI with its validator on write)."""
from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from pipeline.fhir.config import FhirClientConfig
from tests.test_write_consents import make_consent, numbers, run, summarise
from transforms.provenance import (
    MESH_MESSAGE_SYSTEM, REQUEST_SYSTEM, ProvenanceSettings, build_provenance, consent_reference, provenance_id,
    validate_provenance,
)

SETTINGS = ProvenanceSettings(organisation="X26ABC1", request_id="X26ABC1-021226-0001",
                              checked_at="2024-11-26T10:00:00Z", reply_message_id="20261202101500123456_ABCDEF")


def provenances_of(fhir: str, consent_id: str) -> list[dict[str, Any]]:
    bundle = requests.get(f"{fhir}/Provenance", params={"target": f"Consent/{consent_id}"}, timeout=30).json()
    return [e["resource"] for e in bundle.get("entry", [])]


def test_provenance_is_valid_r4_names_the_ndop_answer_and_holds_no_number() -> None:
    nums = numbers(3, 201)
    consents = [make_consent(n) for n in nums]
    provenance = SETTINGS.build([consent_reference(c, "id") for c in consents], recorded="2026-12-02T10:00:00Z")
    validate_provenance(provenance)
    assert [t["reference"] for t in provenance["target"]] == [f"Consent/{c['id']}" for c in consents]
    assert provenance["occurredDateTime"] == SETTINGS.checked_at and provenance["recorded"] == "2026-12-02T10:00:00Z"
    assert provenance["agent"][0]["who"]["identifier"]["value"] == "X26ABC1"
    assert {(e["what"]["identifier"]["system"], e["what"]["identifier"]["value"]) for e in provenance["entity"]} == {
        (MESH_MESSAGE_SYSTEM, SETTINGS.reply_message_id), (REQUEST_SYSTEM, SETTINGS.request_id)}
    assert not any(n in json.dumps(provenance) for n in nums)
    # the id depends on the request and the targets only (not their order, not the write time)
    again = SETTINGS.build([consent_reference(c, "id") for c in reversed(consents)], recorded="2026-12-03T00:00:00Z")
    assert again["id"] == provenance["id"]
    assert provenance_id("X26ABC1-021226-0002", [f"Consent/{consents[0]['id']}"]) != provenance["id"]
    bare = build_provenance(["Consent/x"], recorded="2026-12-02T10:00:00Z", checked_at=SETTINGS.checked_at,
                            organisation="X26ABC1", request_id="")
    assert "entity" not in bare  # FHIR JSON has no empty arrays (HAPI refuses them)
    with pytest.raises(ValueError, match="at least one target"):
        build_provenance([], recorded="x", checked_at="x", organisation="X", request_id="r")
    with pytest.raises(ValueError, match="not valid FHIR R4"):
        validate_provenance({**provenance, "recorded": "yesterday"})


def test_conditional_upsert_targets_the_consent_identifier() -> None:
    consent = make_consent(numbers(1, 202)[0])
    reference = consent_reference(consent, "conditional")
    assert reference == {"type": "Consent", "identifier": consent["identifier"][0]}
    validate_provenance(SETTINGS.build([reference]))


def test_batch_writes_one_provenance_per_bundle_over_the_consents_that_succeeded(fhir_store: str) -> None:
    fhir_server = fhir_store
    consents = [make_consent(n) for n in numbers(5, 203)]
    del consents[2]["status"]  # the real server refuses this one
    main, dead, counters = run(consents, FhirClientConfig(fhir_server), batch_size=10, provenance=SETTINGS)
    assert summarise(main)["created"] == 4 and len(dead) == 1
    assert counters["provenances_written"] == 1 and counters["provenance_targets"] == 4
    [stored] = provenances_of(fhir_server, consents[0]["id"])
    assert sorted(t["reference"] for t in stored["target"]) == sorted(
        f"Consent/{c['id']}" for i, c in enumerate(consents) if i != 2)
    assert provenances_of(fhir_server, consents[2]["id"]) == []
    # a re-run replaces the same Provenance (same id), never adds one
    del consents[2]
    run(consents, FhirClientConfig(fhir_server), batch_size=10, provenance=SETTINGS)
    assert [p["id"] for p in provenances_of(fhir_server, consents[0]["id"])] == [stored["id"]]


def test_transaction_carries_its_provenance_and_a_refused_one_falls_back_to_after_the_batch(fhir_store: str) -> None:
    fhir_server = fhir_store
    good = [make_consent(n) for n in numbers(3, 204)]
    main, _, counters = run(good, FhirClientConfig(fhir_server), bundle_type="transaction", provenance=SETTINGS)
    assert summarise(main)["created"] == 3 and counters["bundles_posted"] == 1  # Provenance in the same POST
    [stored] = provenances_of(fhir_server, good[1]["id"])
    assert len(stored["target"]) == 3

    mixed = [make_consent(n) for n in numbers(4, 205)]
    del mixed[1]["status"]  # both servers roll the transaction back whole: nothing of it, no Provenance either
    main, dead, counters = run(mixed, FhirClientConfig(fhir_server), bundle_type="transaction", provenance=SETTINGS)
    assert summarise(main)["created"] == 3 and len(dead) == 1
    assert counters["provenances_written"] == 1 and counters["provenance_targets"] == 3
    [after] = provenances_of(fhir_server, mixed[0]["id"])
    assert f"Consent/{mixed[1]['id']}" not in [t["reference"] for t in after["target"]] and len(after["target"]) == 3


def test_no_provenance_writes_none(fhir_server: str) -> None:
    consents = [make_consent(n) for n in numbers(2, 206)]
    _, _, counters = run(consents, FhirClientConfig(fhir_server))
    assert counters.get("provenances_written", 0) == 0
    assert provenances_of(fhir_server, consents[0]["id"]) == []

"""The FHIR R4 ``Provenance`` written beside every bundle of Consents: which NDOP answer set them.

One Provenance per bundle keeps it small: ``target`` lists the Consents that bundle stored, ``recorded``
is the write time, ``occurredDateTime`` the NDOP check the Consents carry as ``dateTime``, ``policy`` the
national data opt-out, ``agent`` the exchange (its MESH mailbox or organisation, as an identifier) and
``entity`` the NDOP reply (its MESH message id) and this tool's request id. A person can then ask the
store ``Provenance?target=Consent/<id>`` which answer set a Consent. No NHS number is ever in it.

Its id is derived from the request id and the targets, so a re-run of the same bundle (after a crash)
replaces its Provenance instead of adding a second one.
"""
from __future__ import annotations

import uuid
from typing import Any, Sequence

from transforms.build_consent import NDOP_POLICY_URI

PROVENANCE_ID_NAMESPACE = uuid.UUID("0b4f6a2e-8d1c-5e3a-b7f9-2c6d1e0a9b84")  # fixed forever
MAILBOX_SYSTEM = "urn:ndop-sync:mesh-mailbox"
MESH_MESSAGE_SYSTEM = "urn:ndop-sync:mesh-message-id"
REQUEST_SYSTEM = "urn:ndop-sync:request-id"


def provenance_id(request_id: str, targets: Sequence[str]) -> str:
    return str(uuid.uuid5(PROVENANCE_ID_NAMESPACE, request_id + "\n" + "\n".join(sorted(targets))))


def build_provenance(targets: Sequence[str], *, recorded: str, checked_at: str, organisation: str,
                     request_id: str, reply_message_id: str | None = None) -> dict[str, Any]:
    """A Provenance over ``targets`` (references such as ``Consent/<id>``, or a transaction's ``urn:uuid:``)."""
    if not targets:
        raise ValueError("a Provenance needs at least one target")
    entities = [{"role": "source", "what": {"identifier": {"system": REQUEST_SYSTEM, "value": request_id},
                                            "display": "ndop-sync request"}}]
    if reply_message_id:
        entities.insert(0, {"role": "source",
                            "what": {"identifier": {"system": MESH_MESSAGE_SYSTEM, "value": reply_message_id},
                                     "display": "NDOP reply (MESH message)"}})
    return {
        "resourceType": "Provenance",
        "id": provenance_id(request_id, targets),
        "target": [{"reference": target} for target in targets],
        "occurredDateTime": checked_at,
        "recorded": recorded,
        "policy": [NDOP_POLICY_URI],
        "activity": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                                 "code": "UPDATE", "display": "revise"}]},
        "agent": [{
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                 "code": "performer", "display": "Performer"}]},
            "who": {"identifier": {"system": MAILBOX_SYSTEM, "value": organisation}},
        }],
        "entity": entities,
    }


def validate_provenance(provenance: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``provenance`` is a valid R4 Provenance (fhir.resources)."""
    from fhir.resources.R4B.provenance import Provenance
    from pydantic import ValidationError

    try:
        Provenance.model_validate(provenance)
    except ValidationError as err:
        raise ValueError(f"Provenance {provenance.get('id')} is not valid FHIR R4: {err}") from None

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
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from transforms.build_consent import NDOP_POLICY_URI
from pipeline.core.clock import isoformat, utcnow
from pipeline.fhir.answers import FHIR_JSON, encode, response_reason

PROVENANCE_ID_NAMESPACE = uuid.UUID("0b4f6a2e-8d1c-5e3a-b7f9-2c6d1e0a9b84")  # fixed forever
MAILBOX_SYSTEM = "urn:ndop-sync:mesh-mailbox"
MESH_MESSAGE_SYSTEM = "urn:ndop-sync:mesh-message-id"
REQUEST_SYSTEM = "urn:ndop-sync:request-id"


Target = str | Mapping[str, Any]  # "Consent/<id>", or a whole Reference


def _reference(target: Target) -> dict[str, Any]:
    return {"reference": target} if isinstance(target, str) else dict(target)


def _key(target: Target) -> str:
    ref = _reference(target)
    return ref.get("reference") or "{system}|{value}".format(**ref["identifier"])


def provenance_id(request_id: str, targets: Sequence[Target], checked_at: str = "") -> str:
    """The same request (or, run without one, the same NDOP check) and the same targets give the same id:
    a re-run replaces its Provenance, never adds a second."""
    scope = request_id or f"checked_at:{checked_at}"
    return str(uuid.uuid5(PROVENANCE_ID_NAMESPACE, scope + "\n" + "\n".join(sorted(map(_key, targets)))))


def build_provenance(targets: Sequence[Target], *, recorded: str, checked_at: str, organisation: str,
                     request_id: str, reply_message_id: str | None = None) -> dict[str, Any]:
    """A Provenance over ``targets`` (references such as ``Consent/<id>``, or a transaction's ``urn:uuid:``)."""
    if not targets:
        raise ValueError("a Provenance needs at least one target")
    entities = [{"role": "source", "what": {"identifier": {"system": REQUEST_SYSTEM, "value": request_id},
                                            "display": "ndop-sync request"}}] if request_id else []
    if reply_message_id:
        entities.insert(0, {"role": "source",
                            "what": {"identifier": {"system": MESH_MESSAGE_SYSTEM, "value": reply_message_id},
                                     "display": "NDOP reply (MESH message)"}})
    return {
        "resourceType": "Provenance",
        "id": provenance_id(request_id, targets, checked_at),
        "target": [_reference(target) for target in targets],
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
        **({"entity": entities} if entities else {}),  # FHIR JSON has no empty arrays
    }


def validate_provenance(provenance: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``provenance`` is a valid R4 Provenance (fhir.resources)."""
    from fhir.resources.R4B.provenance import Provenance
    from pydantic import ValidationError

    try:
        Provenance.model_validate(provenance)
    except ValidationError as err:
        raise ValueError(f"Provenance {provenance.get('id')} is not valid FHIR R4: {err}") from None


@dataclass(frozen=True)
class ProvenanceSettings:
    """What every Provenance of one process run says (the pipeline options ``--provenance_org`` etc.)."""

    organisation: str
    request_id: str
    checked_at: str
    reply_message_id: str | None = None

    def __post_init__(self) -> None:
        if not self.organisation:
            raise ValueError("a Provenance needs the exchange's organisation or MESH mailbox (--provenance_org)")

    def build(self, targets: Sequence[Target], recorded: str | None = None) -> dict[str, Any]:

        return build_provenance(targets, recorded=recorded or isoformat(utcnow()), checked_at=self.checked_at,
                                organisation=self.organisation, request_id=self.request_id,
                                reply_message_id=self.reply_message_id)


def consent_reference(consent: Mapping[str, Any], upsert: str) -> dict[str, Any]:
    """The target a Provenance names for a written Consent: ``Consent/<id>`` (``--upsert id``, searchable as
    ``Provenance?target=Consent/<id>``); with a conditional upsert the server chose the id, so the target is
    the Consent's business identifier instead (``Provenance?target:identifier=...`` where a server supports it)."""
    if upsert == "id":
        return {"reference": f"Consent/{consent['id']}"}
    identifier = consent["identifier"][0]
    return {"type": "Consent", "identifier": {"system": identifier["system"], "value": identifier["value"]}}


def transaction_entry(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The Provenance as one more PUT of a transaction Bundle (stored with the Consents, or not at all)."""
    return {"resource": dict(provenance), "request": {"method": "PUT", "url": f"Provenance/{provenance['id']}"}}


def put_provenance(session: Any, base_url: str, provenance: Mapping[str, Any]) -> tuple[int, str]:
    """``PUT Provenance/<id>`` (idempotent: a re-run replaces it); (HTTP status, reason). Retries: the session's."""
    import requests


    url = f"{base_url.rstrip('/')}/Provenance/{provenance['id']}"
    try:
        response = session.put(url, data=encode(provenance), headers={"Content-Type": FHIR_JSON})
    except requests.RequestException as exc:
        return 0, f"no answer from the FHIR server: {type(exc).__name__}"
    with response:
        return response.status_code, ("" if response.status_code < 300 else response_reason(response))

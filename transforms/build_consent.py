"""One FHIR R4 ``Consent`` per patient, in the shape of docs/ndop-and-mesh.md ("The Consent ndop-sync writes").

Validating every Consent with pydantic (``fhir.resources.R4B``) would cost far more than building
it, so the shape is validated once, on a template, when the pipeline is built, and again on a sample
at run time (``sample_validate`` per worker); each Consent is then the same literal with its
variable fields (id, identifier, status, patient, dateTime) filled in.
"""
from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, Iterator, Sequence

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from pipeline.core import nhs
from transforms import shards as shardlib
from transforms.consent_ids import IdKey, KeySource
from transforms.vocabulary import (  # noqa: F401 (IDENTIFIER_SYSTEM: this module's public word)
    IDENTIFIER_SYSTEM,
    METRICS_NAMESPACE,
    NOT_OPTED_OUT,
    OPTED_OUT,
    Counter,
)

_LOGGER = logging.getLogger(__name__)

NDOP_POLICY_URI = "https://digital.nhs.uk/services/national-data-opt-out"

def _shared_parts() -> dict[str, Any]:
    """The parts every Consent shares (docs/ndop-and-mesh.md), as fresh objects (literals: 5x cheaper than deepcopy)."""
    return {
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "patient-privacy", "display": "Privacy Consent"}]},
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                  "code": "INFA", "display": "information access"}]}],
        "policy": [{"authority": "https://www.gov.uk/", "uri": NDOP_POLICY_URI}],
        "provision": {
            "type": "deny",  # in both statuses: absence from the opt-out list is not explicit consent
            "action": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction",
                                    "code": "disclose"}]}],
            "purpose": [{"system": "http://snomed.info/sct", "code": "370856009",
                         "display": "Limiting access to confidential patient information"}],
        },
    }


def build_consent(nhs_number: str, status: str, checked_at: str, patient_id: str | None = None, *,
                  consent_id: str) -> dict[str, Any]:
    """The Consent for one patient; ``status`` is ``active`` (opted out) or ``inactive``; ``consent_id`` from
    :meth:`IdKey.consent_id <transforms.consent_ids.IdKey.consent_id>` (or the ledger, which holds it).

    With the Patient's FHIR id known, ``patient`` references ``Patient/<id>`` with the NHS number
    identifier beside it (so ``Consent?patient=Patient/<id>`` and chained searches find it, and servers
    that check references resolve it); without, it is the identifier alone.
    """
    cid = consent_id
    patient: dict[str, Any] = {"identifier": {"system": nhs.NHS_NUMBER_SYSTEM, "value": nhs_number}}
    if patient_id:
        patient = {"reference": f"Patient/{patient_id}", **patient}
    shared = _shared_parts()
    return {
        "resourceType": "Consent",
        "id": cid,
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": cid}],
        "status": status,
        "scope": shared["scope"],
        "category": shared["category"],
        "patient": patient,
        "dateTime": checked_at,
        "policy": shared["policy"],
        "provision": shared["provision"],
    }


def validate_consent(consent: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``consent`` is a valid R4 Consent of our shape."""
    from fhir.resources.R4B.consent import Consent
    from pydantic import ValidationError

    try:
        Consent.model_validate(consent)
    except ValidationError as err:
        raise ValueError(f"Consent {consent.get('id')} is not valid FHIR R4: {err}") from None
    if consent["status"] not in (OPTED_OUT, NOT_OPTED_OUT) or not consent.get("dateTime"):
        raise ValueError(f"Consent {consent.get('id')}: status must be active/inactive and dateTime set")


def check_checked_at(checked_at: str | None) -> str:
    """``checked_at`` must be a FHIR dateTime with a time zone: it dates every Consent."""
    if not checked_at:
        raise ValueError("checked_at (when NDOP answered) is required")
    try:
        moment = datetime.fromisoformat(checked_at.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"checked_at {checked_at!r} is not an ISO 8601 date-time") from None
    if moment.tzinfo is None or "T" not in checked_at:
        raise ValueError(f"checked_at {checked_at!r} needs a time and a time zone (e.g. 2024-11-26T10:15:00Z)")
    validate_consent(build_consent("9990000018", OPTED_OUT, checked_at,
                                   consent_id="00000000-0000-8000-8000-000000000000"))  # the template, validated once
    return checked_at


class BuildConsentFn(beam.DoFn):
    """A classified ``(status, int64 array)`` batch into one Consent dict per patient; a third item, when there,
    holds each patient's FHIR Patient id (None where unknown), carried through the join
    (:data:`transforms.ledger_join.PATIENT_IDS`).

    ``checked_at`` is taken as checked: :class:`BuildConsent` validated it (and the template) once.
    """

    def __init__(self, checked_at: str, key: KeySource, sample_validate: int = 1) -> None:
        self._checked_at = checked_at
        self._key_source = key
        self._sample_validate = sample_validate
        self._built = Metrics.counter(METRICS_NAMESPACE, Counter.CONSENTS_BUILT)

    def setup(self) -> None:
        self._to_validate = self._sample_validate
        self._key: IdKey = self._key_source.load()

    def process(self, batch: tuple[str, np.ndarray] | tuple[str, np.ndarray, Sequence[str | None]]
                ) -> Iterator[dict[str, Any]]:
        status, numbers = batch[0], batch[1]
        checked_at = self._checked_at
        ids = batch[2] if len(batch) > 2 else [None] * len(numbers)  # type: ignore[misc]
        consent_id = self._key.consent_id
        for number, patient_id in zip(shardlib.to_strings(numbers), ids):
            consent = build_consent(number, status, checked_at, patient_id, consent_id=consent_id(number))
            if self._to_validate > 0:
                self._to_validate -= 1
                validate_consent(consent)
            yield consent
        self._built.inc(len(numbers))


class BuildConsent(beam.PTransform):
    """Classified batches -> Consent dicts (per patient from here on: the FHIR leg is per patient)."""

    def __init__(self, checked_at: str, key: KeySource, sample_validate: int = 1) -> None:
        super().__init__()
        self._checked_at = check_checked_at(checked_at)
        self._key = key
        self._sample_validate = sample_validate

    def expand(self, batches: pvalue.PCollection) -> pvalue.PCollection:
        fn = BuildConsentFn(self._checked_at, self._key, self._sample_validate)
        return batches | "BuildConsentDicts" >> beam.ParDo(fn)

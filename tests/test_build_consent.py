"""BuildConsent: the NDOP Consent shape, validated with fhir.resources.R4B."""
from __future__ import annotations

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.testing.util import assert_that, equal_to
from fhir.resources.R4B.consent import Consent

from pipeline.core import nhs
from tests.beam_util import local_pipeline
from transforms import shards
from tests.helpers import consent_id, key_source_for_tests
from transforms.build_consent import (
    IDENTIFIER_SYSTEM,
    BuildConsent,
    build_consent,
    check_checked_at,
    validate_consent,
)
from transforms.vocabulary import NOT_OPTED_OUT, OPTED_OUT

CHECKED_AT = "2024-11-26T10:15:00Z"


def test_consent_has_the_ndop_shape_and_is_valid_r4():
    number = nhs.synthetic_numbers(1, seed=7)[0].as_py()
    consent = Consent.model_validate(build_consent(number, OPTED_OUT, CHECKED_AT, consent_id=consent_id(number)))
    assert consent.status == "active"
    assert consent.scope.coding[0].code == "patient-privacy"
    assert consent.category[0].coding[0].code == "INFA"
    assert consent.patient.identifier.system == nhs.NHS_NUMBER_SYSTEM and consent.patient.identifier.value == number
    assert consent.dateTime.isoformat().startswith("2024-11-26T10:15:00")
    assert consent.policy[0].authority == "https://www.gov.uk/"
    assert consent.provision.type == "deny"
    assert consent.provision.action[0].coding[0].code == "disclose"
    assert consent.provision.purpose[0].code == "370856009"
    assert consent.identifier[0].system == IDENTIFIER_SYSTEM and consent.identifier[0].value == consent.id


def test_consents_do_not_share_mutable_parts():
    first = build_consent("9990000018", OPTED_OUT, CHECKED_AT, consent_id=consent_id("9990000018"))
    first["provision"]["action"].clear()
    assert build_consent("9990000018", OPTED_OUT, CHECKED_AT, consent_id=consent_id("9990000018"))["provision"]["action"]


@pytest.mark.parametrize("bad", [None, "", "2024-11-26", "2024-11-26T10:15:00", "yesterday"])
def test_checked_at_needs_a_time_with_zone(bad):
    with pytest.raises(ValueError):
        check_checked_at(bad)


def test_validate_consent_rejects_a_wrong_shape():
    consent = build_consent("9990000018", "rejected", CHECKED_AT, consent_id=consent_id("9990000018"))
    with pytest.raises(ValueError, match="status must be active/inactive"):
        validate_consent(consent)
    consent = build_consent("9990000018", OPTED_OUT, CHECKED_AT, consent_id=consent_id("9990000018"))
    consent["provision"]["purpose"] = [{"coding": consent["provision"]["purpose"]}]  # R5's shape, not R4's
    with pytest.raises(ValueError, match="not valid FHIR R4"):
        validate_consent(consent)


def test_build_consent_one_per_patient_through_beam():
    numbers = nhs.synthetic_numbers(30, seed=9).to_pylist()
    batches = [(OPTED_OUT, shards.to_int64(pa.array(numbers[:10]))), (NOT_OPTED_OUT, shards.to_int64(pa.array(numbers[10:])))]
    with local_pipeline() as p:
        consents = p | beam.Create(batches) | BuildConsent(CHECKED_AT, key_source_for_tests(), sample_validate=3)
        got = consents | beam.Map(lambda c: (c["patient"]["identifier"]["value"], c["status"], c["id"], c["dateTime"]))
        expected = [(n, OPTED_OUT if i < 10 else NOT_OPTED_OUT, consent_id(n), CHECKED_AT) for i, n in enumerate(numbers)]
        assert_that(got, equal_to(expected))
    for status, ints in batches:  # every Consent the transform builds is valid R4
        for number in shards.to_strings(ints):
            Consent.model_validate(build_consent(number, status, CHECKED_AT, consent_id=consent_id(number)))

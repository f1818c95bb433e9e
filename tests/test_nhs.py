"""NHS number rules: the scalar checks, the column-wise checks, and their agreement."""
from __future__ import annotations

import nhs_number
import numpy as np
import pyarrow as pa
import pytest

from pipeline.core import nhs


def _with_check_digit_10() -> str:
    """A nine-digit stem in the 999 range whose Modulus 11 check digit would be 10."""
    for stem in range(999000000, 999001000):
        if nhs_number.calculate_checksum(str(stem)) == 10:
            return str(stem)
    raise AssertionError("no stem found")


STEM_10 = _with_check_digit_10()


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("9434765919", None),
        ("943 476 5919", None),
        ("943-476-5919", None),
        ("  9434765919 ", None),
        ("9434765918", nhs.REASON_CHECK_DIGIT),
        (STEM_10 + "0", nhs.REASON_CHECK_DIGIT),
        (STEM_10 + "9", nhs.REASON_CHECK_DIGIT),
        ("943476591", nhs.REASON_LENGTH),
        ("94347659190", nhs.REASON_LENGTH),
        ("94347659I9", nhs.REASON_CHARACTERS),
        ("abc", nhs.REASON_CHARACTERS),
        ("9434765919,", nhs.REASON_CHARACTERS),
    ],
)
def test_scalar_and_columnwise_agree_on_each_rule(raw: str, reason: str | None) -> None:
    assert nhs.invalid_reason(nhs.normalise(raw)) == reason
    normalised, reasons = nhs.validate_array(pa.array([raw]))
    assert reasons.to_pylist() == [reason]
    if reason is None:
        assert normalised.to_pylist() == ["9434765919"]


def test_blank_is_its_own_reason() -> None:
    _, reasons = nhs.validate_array(pa.array(["", "   ", None]))
    assert reasons.to_pylist() == [nhs.REASON_BLANK] * 3


def test_columnwise_matches_the_nhs_number_package_on_random_numbers() -> None:
    rng = np.random.default_rng(7)
    raw = [str(n) for n in rng.integers(4_000_000_000, 9_999_999_999, size=20_000)]
    _, reasons = nhs.validate_array(pa.array(raw))
    ours = [r is None for r in reasons.to_pylist()]
    theirs = [nhs_number.is_valid(n) for n in raw]
    assert ours == theirs
    assert 0 < sum(ours) < len(ours)  # both kinds were exercised


def test_synthetic_numbers_are_valid_distinct_and_in_the_999_range() -> None:
    numbers = nhs.synthetic_numbers(5000, seed=3).to_pylist()
    assert len(set(numbers)) == 5000
    assert all(n.startswith("999") and nhs_number.is_valid(n) for n in numbers)
    assert nhs.synthetic_numbers(10, seed=3).to_pylist() == nhs.synthetic_numbers(10, seed=3).to_pylist()


def test_synthetic_range_capacity_is_enforced() -> None:
    with pytest.raises(ValueError, match="999 range"):
        nhs.synthetic_numbers(2_000_000)


def test_mask_hides_all_but_last_four() -> None:
    assert nhs.mask("9434765919") == "******5919"
    assert nhs.mask("12") == "12"


def test_redact_masks_number_like_runs_in_foreign_text() -> None:
    assert nhs.redact("Consent?identifier=x|9990000018 failed") == "Consent?identifier=x|******0018 failed"
    assert nhs.redact('Expected 2 columns, got 1: "943 476 5919') == 'Expected 2 columns, got 1: "******5919'
    assert nhs.redact("HTTP 404 in 12 s") == "HTTP 404 in 12 s"

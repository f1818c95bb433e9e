"""pipeline.core.settings: a number of days from an option or the environment, or one clear error."""
from __future__ import annotations

import pytest

from pipeline.core.errors import EXIT_BAD_INPUT, InputError
from pipeline.core.settings import days_setting


def test_option_wins_then_environment_then_default(monkeypatch) -> None:
    monkeypatch.setenv("NDOP_TEST_DAYS", "7.5")
    assert days_setting(3, "NDOP_TEST_DAYS", 21) == 3
    assert days_setting(None, "NDOP_TEST_DAYS", 21) == 7.5
    monkeypatch.setenv("NDOP_TEST_DAYS", " ")
    assert days_setting(None, "NDOP_TEST_DAYS", 21) == 21
    assert days_setting(None, "NDOP_TEST_DAYS", None) is None


@pytest.mark.parametrize("text, whole, words", [("soon", False, "is not a number of days"),
                                                ("2.5", True, "is not a whole number of days"),
                                                ("-1", False, "out of range: give a number of days from 0 to 3650")])
def test_bad_days_are_one_line_and_exit_2(monkeypatch, text, whole, words) -> None:
    monkeypatch.setenv("NDOP_TEST_DAYS", text)
    with pytest.raises(InputError, match=words) as caught:
        days_setting(None, "NDOP_TEST_DAYS", 30, whole=whole)
    assert caught.value.exit_code == EXIT_BAD_INPUT and "\n" not in str(caught.value)
    assert "NDOP_TEST_DAYS" in str(caught.value)

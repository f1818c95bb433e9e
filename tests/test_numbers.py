"""Numbers that are not numbers: every number from an option, the environment or a config file goes through one
parser with a finite range (pipeline/core/settings.py); anything else is one line and exit 2, before anything is sent or
written."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import cli
from pipeline.core import nhs
from pipeline.core.errors import EXIT_BAD_INPUT, InputError
from pipeline.core.settings import DAYS, POLL_INTERVAL, WHOLE_DAYS, Range, parse_number
from tests.fixtures.mesh import OUR_MAILBOX, Mesh

NOT_NUMBERS = ["nan", "NaN", "inf", "-inf", "Infinity", "1e300", "1e12", "-1", "ten", "", " ", "0x10", "1e10"]


def ndop(capsys, monkeypatch, env: dict[str, str], *args: str) -> tuple[int, str]:
    """``ndop ARGS`` in this process with ``env`` set; an escaping exception (a traceback) fails the test."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = cli.main(list(args))
    return code, capsys.readouterr().err


# The ten settings issue 20 found giving a traceback (or polling forever), and the pass-through pipeline numbers.
CASES = [
    ({"NDOP_OVERDUE_DAYS": "inf"}, ["status"], "NDOP_OVERDUE_DAYS"),
    ({"NDOP_OVERDUE_DAYS": "1e12"}, ["status"], "NDOP_OVERDUE_DAYS"),
    ({"NDOP_RESEND_AFTER_HOURS": "1e300"}, ["status"], "NDOP_RESEND_AFTER_HOURS"),
    ({"NDOP_STALE_DAYS": "nan"}, ["status"], "NDOP_STALE_DAYS"),
    ({"NDOP_STALE_DAYS": "inf"}, ["status"], "NDOP_STALE_DAYS"),
    ({"NDOP_RETENTION_DAYS": "nan"}, ["purge"], "NDOP_RETENTION_DAYS"),
    ({"NDOP_RETENTION_DAYS": "inf"}, ["purge"], "NDOP_RETENTION_DAYS"),
    ({}, ["purge", "--older-than", "nan"], "--older-than"),
    ({}, ["purge", "--older-than", "1e10"], "--older-than"),
    ({}, ["status", "--overdue-days", "nan"], "--overdue-days"),
    ({}, ["status", "--stale-days", "-1"], "--stale-days"),
    ({}, ["poll", "--interval", "nan"], "--interval"),
    ({}, ["poll", "--wait", "nan"], "--wait"),
    ({}, ["poll", "--wait", "inf"], "--wait"),
    ({"NDOP_PROGRESS_SECONDS": "nan"}, ["run"], "NDOP_PROGRESS_SECONDS"),
    ({"NDOP_STALE_DAYS": "nan"}, ["run"], "NDOP_STALE_DAYS"),
    ({"NDOP_REFRESH_DAYS": "2.5"}, ["run"], "NDOP_REFRESH_DAYS"),
    ({}, ["run", "--refresh_days=-1"], "--refresh_days"),
    ({}, ["run", "--refresh-days", "1e20"], "--refresh-days"),
    ({}, ["run", "--batch_size=0"], "--batch_size"),
    ({}, ["run", "--shards", "nan"], "--shards"),
]


@pytest.mark.parametrize("env, args, named", CASES, ids=[" ".join([*e, *a]) for e, a, _ in CASES])
def test_a_bad_number_is_one_line_and_exit_2_before_anything_is_sent(
        env, args, named, capsys, monkeypatch, tmp_path: Path, mesh: Mesh) -> None:
    cohort = tmp_path / "cohort.txt"
    cohort.write_text("\n".join(nhs.synthetic_numbers(5, seed=2001).to_pylist()) + "\n")
    work = tmp_path / "work"
    extra = ["--cohort", str(cohort), "--runner=FnApiRunner"] if args[0] == "run" else []
    code, err = ndop(capsys, monkeypatch, {**mesh.env(), **env}, *args, *extra, "--work-dir", str(work))
    assert code == EXIT_BAD_INPUT, err
    assert err.count("\n") == 1 and "Traceback" not in err and named in err, err
    assert not (work / "requests").exists()  # nothing built, so nothing sent
    assert mesh.requests_to("POST", f"/messageexchange/{OUR_MAILBOX}/outbox") == []


def test_polling_a_real_mesh_faster_than_five_minutes_is_refused(capsys, monkeypatch, tmp_path: Path) -> None:
    env = {"MESH_URL": "https://mesh.example.invalid", "MESH_MAILBOX": OUR_MAILBOX, "MESH_PASSWORD": "x",
           "MESH_SHARED_KEY": "k"}
    for args in (["poll", "--interval", "60"], ["run", "--interval", "299", "--cohort", "x.txt"]):
        code, err = ndop(capsys, monkeypatch, env, *args, "--work-dir", str(tmp_path / "work"))
        assert code == EXIT_BAD_INPUT and err.count("\n") == 1, err
        assert "at most once every 300 seconds (5 minutes)" in err
    assert not (tmp_path / "work" / "requests").exists()


@pytest.mark.parametrize("text", NOT_NUMBERS)
def test_not_a_number_in_range_is_input_error(text: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_number(text, "NDOP_X", DAYS if text not in ("-1",) else POLL_INTERVAL)
    assert caught.value.exit_code == EXIT_BAD_INPUT and "NDOP_X" in str(caught.value)


# Bounded for CI; NDOP_HYPOTHESIS_EXAMPLES=3000 for a deeper local search.
@settings(max_examples=int(os.environ.get("NDOP_HYPOTHESIS_EXAMPLES", 300)), deadline=None)
@given(text=st.one_of(st.text(max_size=30), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                      st.integers().map(str)),
       low=st.integers(-10, 10), span=st.integers(0, 10_000), whole=st.booleans())
def test_the_parser_gives_a_finite_number_in_range_or_one_line_input_error(text, low, span, whole) -> None:
    allowed = Range(low, low + span, "units", whole=whole)
    try:
        number = parse_number(text, "SETTING", allowed)
    except InputError as err:
        assert "\n" not in str(err) and str(err).startswith("SETTING=")
        return
    assert math.isfinite(number) and allowed.low <= number <= allowed.high
    assert not whole or float(number).is_integer()


def test_a_good_number_still_works(capsys, monkeypatch, tmp_path: Path) -> None:
    assert parse_number(" 7.5 ", "X", DAYS) == 7.5 and parse_number("30", "X", WHOLE_DAYS) == 30
    code, err = ndop(capsys, monkeypatch, {"NDOP_OVERDUE_DAYS": "2.5"}, "status", "--stale-days", "0",
                     "--work-dir", str(tmp_path / "work"))
    assert code == 0, err

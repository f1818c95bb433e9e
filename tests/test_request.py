"""The request step: cohort formats, the exact files it writes, numbering, modes, and failures."""
from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.helpers import REPO_ROOT, cli
from pipeline.core import nhs
from pipeline.core.errors import InputError
from pipeline.request.build import RequestSettings, build_request
from pipeline.lifecycle.state import WorkDir

ROOT = REPO_ROOT
NOV = datetime(2026, 11, 24, 9, 30, tzinfo=timezone.utc)
VALID = nhs.synthetic_numbers(6, seed=11).to_pylist()
BAD_CHECK = VALID[0][:9] + str((int(VALID[0][9]) + 1) % 10)


def settings(**kw) -> RequestSettings:
    return RequestSettings(mailbox="X26ABC1", **kw)


def write_text(path: Path, lines: list[str], ending: str = "\n") -> Path:
    path.write_text(ending.join(lines) + ending)
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return cli(*args, cwd=cwd)


def test_text_cohort_normalises_skips_blanks_rejects_and_deduplicates(tmp_path, work_dir) -> None:
    a, b, c = VALID[:3]
    cohort = write_text(tmp_path / "cohort.txt", [
        f"{a[:3]} {a[3:6]} {a[6:]}", f"{b[:3]}-{b[3:6]}-{b[6:]}", "", c, a, BAD_CHECK, "12345", "99900000AB",
    ])
    record = build_request(cohort, work_dir, settings(), now=NOV)
    assert record["counts"] == {"read": 7, "blank": 1, "valid": 4, "invalid": 3, "duplicates": 1, "sent": 3}
    folder = work_dir.request_dir(record["request_id"])
    assert (folder / "X26ABC1-241126-0001.dat").read_bytes() == f"{a},\r\n{b},\r\n{c},\r\n".encode()
    assert pq.read_table(folder / "manifest.parquet").column("nhs_number").to_pylist() == [a, b, c]
    assert pq.read_schema(folder / "manifest.parquet").field("nhs_number").type == pa.string()
    rejects = pacsv.read_csv(folder / "rejects.csv", convert_options=pacsv.ConvertOptions(
        column_types={"value": pa.string()})).to_pylist()
    assert rejects == [
        {"line": 6, "value": BAD_CHECK, "reason": nhs.REASON_CHECK_DIGIT},
        {"line": 7, "value": "12345", "reason": nhs.REASON_LENGTH},
        {"line": 8, "value": "99900000AB", "reason": nhs.REASON_CHARACTERS},
    ]


@pytest.mark.parametrize("ending, expected", [("crlf", b",\r\n"), ("lf", b",\n")])
def test_dat_bytes_for_each_line_ending(tmp_path, work_dir, ending, expected) -> None:
    cohort = write_text(tmp_path / "c.txt", VALID[:3], ending="\r\n")
    record = build_request(cohort, work_dir, settings(line_ending=ending), now=NOV)
    body = (work_dir.request_dir(record["request_id"]) / record["files"]["dat"]).read_bytes()
    assert body == b"".join(n.encode() + expected for n in VALID[:3])
    assert record["dat_bytes"] == len(body)
    import hashlib
    assert record["dat_sha256"] == hashlib.sha256(body).hexdigest()


def test_csv_and_parquet_cohorts_with_default_and_named_columns(tmp_path, work_dir) -> None:
    csv = tmp_path / "c.csv"
    csv.write_text("patient,nhs_number\np1," + VALID[0] + "\np2,\np3," + BAD_CHECK + "\n")
    record = build_request(csv, work_dir, settings(), now=NOV)
    assert record["counts"]["sent"] == 1 and record["counts"]["blank"] == 1
    rejects = (work_dir.request_dir(record["request_id"]) / "rejects.csv").read_text()
    assert f'4,"{BAD_CHECK}"' in rejects  # header is line 1, so the third data row is line 4

    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"nhs": VALID[:4]}), parquet)
    record = build_request(parquet, work_dir, settings(column="nhs"), now=NOV)
    assert record["counts"]["sent"] == 4 and record["cohort"]["format"] == "parquet"


def test_patient_id_column_rides_in_the_manifest_beside_each_kept_number(tmp_path, work_dir) -> None:
    csv = tmp_path / "c.csv"
    rows = [("p0", VALID[0]), ("p1", BAD_CHECK), ("", VALID[1]), ("p0-again", VALID[0]), ("p2", VALID[2])]
    csv.write_text("patient,nhs_number\n" + "".join(f"{pid},{number}\n" for pid, number in rows))
    record = build_request(csv, work_dir, settings(patient_id_column="patient"), now=NOV)
    manifest = pq.read_table(work_dir.request_dir(record["request_id"]) / "manifest.parquet")
    # invalid dropped, duplicate keeps its first row's id, an empty cell is "" (unknown)
    assert manifest.to_pydict() == {"nhs_number": [VALID[0], VALID[1], VALID[2]], "patient_id": ["p0", "", "p2"]}
    plain = build_request(csv, work_dir, settings(), now=NOV)
    assert pq.read_schema(work_dir.request_dir(plain["request_id"]) / "manifest.parquet").names == ["nhs_number"]
    with pytest.raises(InputError, match="no column 'pid'"):
        build_request(csv, work_dir, settings(patient_id_column="pid"), now=NOV)
    with pytest.raises(InputError, match="text cohort has no columns"):
        build_request(write_text(tmp_path / "c.txt", VALID[:2]), work_dir, settings(patient_id_column="x"), now=NOV)


def test_control_file_fields(tmp_path, work_dir) -> None:
    record = build_request(write_text(tmp_path / "c.txt", VALID[:2]), work_dir, settings(), now=NOV)
    ctl = work_dir.request_dir(record["request_id"]) / record["files"]["ctl"]
    root = ET.parse(ctl).getroot()
    fields = {child.tag: (child.text or "") for child in root}
    assert root.tag == "DTSControl"
    assert fields == {
        "Version": "1.0", "AddressType": "DTS", "MessageType": "Data", "From_DTS": "X26ABC1",
        "To_DTS": "X26HC065", "Subject": record["subject"], "LocalId": record["local_id"], "DTSId": "",
        "PartnerId": "", "Compress": "Y", "Encrypted": "N", "WorkflowId": "SPINE_NTT_UPHOLDING",
        "ProcessId": "", "DataChecksum": "", "IsCompressed": "N",
    }
    for text in (record["subject"], record["local_id"]):
        assert ":" not in text and not re.search(r"\d{10}", text)
        assert record["request_id"] in text


def test_sequence_counts_per_mailbox_per_month(tmp_path, work_dir) -> None:
    cohort = write_text(tmp_path / "c.txt", VALID[:2])
    ids = [build_request(cohort, work_dir, settings(), now=NOV)["request_id"] for _ in range(3)]
    ids.append(build_request(cohort, work_dir, RequestSettings(mailbox="X26ABC2"), now=NOV)["request_id"])
    ids.append(build_request(cohort, work_dir, settings(), now=datetime(2026, 11, 30, tzinfo=timezone.utc))["request_id"])
    ids.append(build_request(cohort, work_dir, settings(), now=datetime(2026, 12, 1, tzinfo=timezone.utc))["request_id"])
    assert ids == [
        "X26ABC1-241126-0001", "X26ABC1-241126-0002", "X26ABC1-241126-0003",
        "X26ABC2-241126-0001", "X26ABC1-301126-0004", "X26ABC1-011226-0001",
    ]


def test_files_holding_nhs_numbers_are_private(tmp_path, work_dir) -> None:
    record = build_request(write_text(tmp_path / "c.txt", VALID[:2] + ["bad"]), work_dir, settings(), now=NOV)
    folder = work_dir.request_dir(record["request_id"])
    for name in (record["files"]["dat"], "manifest.parquet", "rejects.csv", "request.json", record["files"]["ctl"]):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_request_record(tmp_path, work_dir) -> None:
    record = build_request(write_text(tmp_path / "c.txt", VALID[:2]), work_dir, settings(), now=NOV)
    on_disk = json.loads((work_dir.request_dir(record["request_id"]) / "request.json").read_text())
    assert on_disk == record
    assert on_disk["state"] == "created" and on_disk["created_at"] == "2026-11-24T09:30:00Z"
    assert on_disk["mailbox"] == "X26ABC1" and on_disk["ndop_mailbox"] == "X26HC065"
    assert on_disk["workflow_id"] == "SPINE_NTT_UPHOLDING"


def test_logs_mask_numbers(tmp_path, work_dir, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    build_request(write_text(tmp_path / "c.txt", VALID + [BAD_CHECK]), work_dir, settings(), now=NOV)
    assert caplog.text and not re.search(r"\d{10}", caplog.text)


def _assert_nothing_left(work_dir: WorkDir) -> None:
    leftovers = list(work_dir.requests.iterdir()) if work_dir.requests.exists() else []
    assert leftovers == []


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.txt", r"missing\.txt: no such file"),
        (lambda d: d, r": not a file"),
        (lambda d: write_text(d / "c.xlsx", ["x"]), r"c\.xlsx: unknown cohort format '\.xlsx'"),
        (lambda d: (d / "c.csv").write_text("patient,nhs\np1,9434765919\n") and d / "c.csv",
         r"c\.csv:1: no column 'nhs_number' in the header \(found: patient, nhs\)"),
        (lambda d: (d / "c.csv").write_text(f"{VALID[0]},x\n{VALID[1]},y\n") and d / "c.csv",
         r"c\.csv:1: no column 'nhs_number' in the header \(found: \*{6}\d{4}, x\)"),
        (lambda d: pq.write_table(pa.table({VALID[0]: ["x"]}), d / "c.parquet") or d / "c.parquet",
         r"c\.parquet: no column 'nhs_number' in the Parquet schema \(found: \*{6}\d{4}\)"),
        (lambda d: write_text(d / "c.txt", ["abc", "", "9434765918"]),
         r"c\.txt: no valid NHS number in the cohort \(2 read, 2 invalid; line 1: .*; line 3: invalid check digit"),
        (lambda d: (d / "c.txt").write_text("") or d / "c.txt", r"c\.txt: no valid NHS number"),
        (lambda d: write_text(d / "c.parquet", ["not parquet at all"]),
         r"c\.parquet: cannot read as parquet"),
    ],
    ids=["missing", "directory", "unknown-format", "csv-no-column", "csv-no-header", "parquet-numbered-column", "no-valid", "empty", "corrupt-parquet"],
)
def test_bad_input_one_line_exit_2_nothing_left(tmp_path, make, message) -> None:
    src = tmp_path / "in"
    src.mkdir()
    cohort = make(src)
    work = tmp_path / "work"
    done = run_cli("request", "--work-dir", str(work), "--cohort", str(cohort), "--mailbox", "X26ABC1", cwd=tmp_path)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and re.search(message, errors[0]), done.stderr
    assert not re.search(r"\d{10}", done.stderr)
    _assert_nothing_left(WorkDir(work))


def test_unreadable_file_is_named(tmp_path, monkeypatch) -> None:
    cohort = write_text(tmp_path / "c.txt", VALID[:1])
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # we run as root in CI, where chmod 000 reads fine
    with pytest.raises(InputError, match=r"c\.txt: cannot read file"):
        build_request(cohort, WorkDir(tmp_path / "w"), settings(), now=NOV)


def test_crash_while_writing_leaves_no_request(tmp_path, work_dir, monkeypatch) -> None:
    import pipeline.request.build as request_module

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(request_module.pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        build_request(write_text(tmp_path / "c.txt", VALID[:2]), work_dir, settings(), now=NOV)
    _assert_nothing_left(work_dir)
    monkeypatch.undo()
    assert build_request(write_text(tmp_path / "c.txt", VALID[:2]), work_dir, settings(), now=NOV)["request_id"] \
        == "X26ABC1-241126-0001"


def test_cli_request_succeeds_and_prints_the_folder(tmp_path) -> None:
    cohort = write_text(tmp_path / "c.txt", VALID[:3])
    done = run_cli("request", "--work-dir", str(tmp_path / "w"), "--cohort", str(cohort), "--mailbox", "x26abc1",
                   "--line-ending", "lf", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.match(r"request X26ABC1-\d{6}-0001: 3 read, 0 invalid, 0 duplicates, 3 to send", done.stdout)
    assert not re.search(r"\d{10}", done.stdout + done.stderr)


def test_cli_lists_subcommands() -> None:
    done = run_cli("--help", cwd=ROOT)
    assert done.returncode == 0 and "request" in done.stdout

"""The whole process pipeline against the real FHIR server (sekmet), and ``ndop process`` end to end."""
from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.request import datfile
from pipeline.core import nhs
from pipeline.core.errors import NdopError
from pipeline.beam.graph import DEAD_LETTERS, SUMMARY, run
from pipeline.lifecycle.state import PROCESSED, REPLIED, WorkDir
from tests.helpers import cli, consents_for_patient, force_state
from tests.helpers import consent_id
from tests.fixtures.fhir_proxy import FaultProxy

T1 = "2024-11-26T10:15:00Z"
T2 = "2024-12-17T09:00:00Z"


def _inputs(folder: Path, manifest: list[str], reply: list[str], extra_reply: bytes = b"") -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"nhs_number": pa.array(manifest, pa.string())}), folder / "manifest.parquet")
    (folder / "reply.dat").write_bytes(datfile.encode(pa.array(reply, pa.string()), "crlf") + extra_reply)
    return folder / "manifest.parquet", folder / "reply.dat"


def _run(folder: Path, fhir_url: str, checked_at: str = T1, *extra: str) -> dict:
    return run([
        "--runner=FnApiRunner", f"--manifest={folder / 'manifest.parquet'}", f"--reply={folder / 'reply.dat'}",
        f"--checked_at={checked_at}", f"--output_dir={folder}", f"--fhir_url={fhir_url}", "--fhir_auth=none",
        "--batch_size=7", "--shards=4", "--provenance_org=X26ABC1", *extra,
    ])


def _consents_of(fhir_url: str, number: str) -> list[dict]:
    return consents_for_patient(fhir_url, number)


def _numbers(count: int, seed: int) -> list[str]:
    return nhs.synthetic_numbers(count, seed=seed).to_pylist()


def test_write_rerun_and_read_back(tmp_path, fhir_server):
    numbers = _numbers(30, seed=9101)
    opted_out = set(numbers[::6])
    reply = [n for n in numbers if n not in opted_out]
    _inputs(tmp_path, numbers + numbers[:2], reply, extra_reply=b"\r\n")  # duplicates, a blank line
    body = (tmp_path / "reply.dat").read_bytes()
    (tmp_path / "reply.dat").write_bytes(b"NHS_NUMBER,\r\n" + body)  # and a header: tolerated

    first = _run(tmp_path, fhir_server)
    assert first["ok"], first
    c = first["counts"]
    assert (c["requested"], c["opted_out"], c["not_opted_out"], c["manifest_duplicates"]) == (30, 5, 25, 2)
    assert (c["created"], c["updated"], c["failed"], c["integrity_errors"], c["written"]) == (30, 0, 0, 0, 30)
    assert c["bundles_posted"] == 5  # 30 Consents in bundles of 7
    summary = json.loads((tmp_path / SUMMARY).read_text())
    assert summary["counts"] == c and summary["timings"]["pipeline_seconds"] > 0
    assert stat.S_IMODE((tmp_path / SUMMARY).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / DEAD_LETTERS).stat().st_mode) == 0o600
    assert (tmp_path / DEAD_LETTERS).read_text() == ""

    second = _run(tmp_path, fhir_server)  # a re-run updates the same resources, never duplicates
    assert second["ok"] and (second["counts"]["created"], second["counts"]["updated"]) == (0, 30)
    for number in numbers:
        found = _consents_of(fhir_server, number)
        assert len(found) == 1, number
        assert found[0]["id"] == consent_id(number)
        assert found[0]["status"] == ("active" if number in opted_out else "inactive")
        assert found[0]["dateTime"].startswith("2024-11-26T10:15:00")
        assert found[0]["provision"]["type"] == "deny"


def test_status_flip_updates_the_same_resource(tmp_path, fhir_server):
    numbers = _numbers(6, seed=9102)
    flipper = numbers[0]
    _inputs(tmp_path, numbers, numbers[1:])  # first check: opted out
    assert _run(tmp_path, fhir_server, T1, "--upsert=conditional", "--bundle_type=transaction")["ok"]
    before = _consents_of(fhir_server, flipper)
    assert [c["status"] for c in before] == ["active"]
    _inputs(tmp_path, numbers, numbers)  # next check: the opt-out was withdrawn
    assert _run(tmp_path, fhir_server, T2, "--upsert=conditional", "--bundle_type=transaction")["ok"]
    after = _consents_of(fhir_server, flipper)
    assert len(after) == 1 and after[0]["id"] == before[0]["id"]  # conditional PUT: the server's id, kept
    assert after[0]["identifier"][0]["value"] == consent_id(flipper)
    assert after[0]["status"] == "inactive" and after[0]["dateTime"].startswith("2024-12-17T09:00:00")


def test_empty_reply_means_everyone_opted_out(tmp_path, fhir_server):
    numbers = _numbers(5, seed=9103)
    _inputs(tmp_path, numbers, [])
    summary = _run(tmp_path, fhir_server)
    assert summary["ok"] and summary["counts"]["opted_out"] == 5 and summary["counts"]["written"] == 5
    assert all(_consents_of(fhir_server, n)[0]["status"] == "active" for n in numbers)


def test_integrity_error_writes_nothing(tmp_path, fhir_server):
    numbers = _numbers(12, seed=9104)
    manifest, stranger = numbers[:10], numbers[10:]
    _inputs(tmp_path, manifest, manifest[2:] + stranger, extra_reply=b"garbage line\r\n")
    summary = _run(tmp_path, fhir_server)
    c = summary["counts"]
    assert not summary["ok"] and summary["problems"][0].startswith("3 integrity errors")
    assert (c["integrity_errors"], c["reply_only"], c["reply_bad_lines"], c["written"], c["refused"]) == (3, 2, 1, 0, 10)
    assert all(_consents_of(fhir_server, n) == [] for n in manifest)
    path = tmp_path / DEAD_LETTERS
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    letters = [json.loads(line) for line in path.read_text().splitlines()]
    reasons = {r["nhs_number"]: r["reason"] for r in letters}
    assert set(stranger) <= set(reasons) and all("not in the request" in reasons[n] for n in stranger)
    assert reasons[None] == f"{tmp_path / 'reply.dat'}:11: not an NHSNUMBER, line"
    assert len(letters) == 3 and {r["consent_id"] for r in letters} == {None}  # never derived from a number NDOP alone sent


def test_invalid_numbers_reply_fails_clearly(tmp_path, fhir_server):
    _inputs(tmp_path, _numbers(3, seed=9105), [])
    (tmp_path / "reply.dat").write_bytes(datfile.INVALID_NUMBERS_REPLY.encode() + b"\r\n")
    with pytest.raises(NdopError, match="NDOP rejected the request"):
        _run(tmp_path, fhir_server)
    assert not (tmp_path / SUMMARY).exists()


def _replied_request(work_dir: WorkDir, request_id: str, manifest: list[str], reply: list[str], extra: bytes = b"") -> None:
    folder = work_dir.ensure().request_dir(request_id)
    _inputs(folder, manifest, reply, extra)
    work_dir.save({
        "request_id": request_id, "state": REPLIED, "checked_at": T1, "created_at": T1, "mailbox": "X26ABC1",
        "files": {"manifest": "manifest.parquet", "reply": "reply.dat"}, "history": [],
    })


def _ndop(work_dir: WorkDir, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return cli("process", "--work-dir", str(work_dir.root), *args, env=env)


def test_ndop_process_marks_processed(work_dir, fhir_server):
    numbers = _numbers(8, seed=9106)
    _replied_request(work_dir, "X26ABC1-241126-0001", numbers, numbers[3:])
    done = _ndop(work_dir, "--request-id", "X26ABC1-241126-0001", "--fhir-url", fhir_server, "--shards=3", "--no-ack")
    assert done.returncode == 0, done.stderr
    assert "3 opted out, 5 not opted out, 8 Consents written" in done.stdout
    record = work_dir.load("X26ABC1-241126-0001")
    assert record["state"] == PROCESSED and record["processing"]["ok"]
    assert (work_dir.request_dir("X26ABC1-241126-0001") / SUMMARY).is_file()
    again = _ndop(work_dir, "--request-id", "X26ABC1-241126-0001", "--fhir-url", fhir_server, "--no-ack")
    assert again.returncode == 0 and work_dir.load("X26ABC1-241126-0001")["state"] == PROCESSED


def test_ndop_process_integrity_error_exits_1_and_stays_replied(work_dir, fhir_server):
    numbers = _numbers(8, seed=9107)
    _replied_request(work_dir, "X26ABC1-241126-0002", numbers[:6], numbers[:6] + numbers[6:])
    done = _ndop(work_dir, "--request-id", "X26ABC1-241126-0002", "--fhir-url", fhir_server, "--no-ack")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ndop process: error: request X26ABC1-241126-0002: 2 integrity errors")
    assert last.endswith(f"see {work_dir.request_dir('X26ABC1-241126-0002') / DEAD_LETTERS}")
    assert not any(n in done.stderr for n in numbers)  # no full NHS number in any log line
    record = work_dir.load("X26ABC1-241126-0002")
    assert record["state"] == REPLIED and not record["processing"]["ok"]


def test_ndop_process_needs_a_replied_request(work_dir):
    _replied_request(work_dir, "X26ABC1-241126-0003", _numbers(2, seed=9108), [])
    force_state(work_dir, "X26ABC1-241126-0003", "sent")
    done = _ndop(work_dir, "--request-id", "X26ABC1-241126-0003", "--no-ack")
    assert done.returncode == 2 and "process needs a 'replied' request" in done.stderr


def test_module_entry_point_refuses_missing_options(capsys):
    from pipeline.beam.graph import main

    assert main(["--runner=FnApiRunner", "--reply=r.dat"]) == 2
    assert "missing --manifest, --checked_at, --output_dir" in capsys.readouterr().err


def test_ndop_process_acknowledges_the_reply_through_mesh(work_dir, fhir_server, mesh, tmp_path):
    """Request -> send -> poll against the sandbox's NDOP, then `ndop process` writes and acknowledges."""
    from pipeline.mesh.driver import MeshDriver
    from pipeline.request.build import RequestSettings, build_request
    from pipeline.lifecycle.state import ACKNOWLEDGED

    numbers = _numbers(6, seed=9109)
    (tmp_path / "cohort.txt").write_text("\n".join(numbers) + "\n")
    (tmp_path / "opted-out.txt").write_text(numbers[0] + "\n")
    mesh.plugin(opted_out_file=str(tmp_path / "opted-out.txt"))
    rid = build_request(tmp_path / "cohort.txt", work_dir, RequestSettings(mailbox="X26ABC1"))["request_id"]
    with MeshDriver(mesh.config(), work_dir) as driver:
        driver.send()
        driver.poll(wait=10, interval=0.1)
    assert mesh.inbox() != []  # the reply waits, unacknowledged, until the Consents are stored
    done = _ndop(work_dir, "--request-id", rid, "--fhir-url", fhir_server, env=mesh.env())
    assert done.returncode == 0, done.stderr
    assert "1 opted out, 5 not opted out, 6 Consents written" in done.stdout
    assert work_dir.load(rid)["state"] == ACKNOWLEDGED
    assert mesh.inbox() == []


def test_pipeline_failure_line_never_quotes_an_nhs_number():
    """A worker's error (say pydantic quoting the Consent it refused) becomes the CLI's error line: masked."""
    from pipeline.beam.graph import _root_message

    number = _numbers(1, seed=9109)[0]
    try:
        try:
            raise ValueError(f"Consent abc is not valid FHIR R4: input_value={{'value': '{number}'}}")
        except ValueError as inner:
            raise RuntimeError("Pipeline failed in stage BuildConsent") from inner
    except RuntimeError as err:
        line = _root_message(err)
    assert number not in line and nhs.mask(number) in line


def test_fhir_server_down_fails_fast_before_any_write(work_dir):
    import socket

    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/fhir"
    _replied_request(work_dir, "X26ABC1-241126-0009", _numbers(4, seed=9110), [])
    done = _ndop(work_dir, "--request-id", "X26ABC1-241126-0009", "--fhir-url", closed, "--no-ack",
                 env={"FHIR_AUTH": "none"})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        "ndop process: error: FHIR server check failed: no answer from the FHIR server")
    assert work_dir.load("X26ABC1-241126-0009")["state"] == REPLIED
    assert not (work_dir.request_dir("X26ABC1-241126-0009") / SUMMARY).exists()


# --- FHIR_AUTH=basic: a store that takes only HTTP Basic (FaultProxy require_basic in front of the real sekmet) ---

BASIC_USER, BASIC_PASSWORD = "ndop-basic", "pa55-\u20ac-basic"  # noqa: S105 (a test value)


def test_basic_auth_pipeline_writes_consents_through_a_basic_only_store(tmp_path, fhir_server):
    numbers = _numbers(12, seed=9111)
    _inputs(tmp_path, numbers, numbers[4:])
    secret = tmp_path / "fhir.password"
    secret.write_text(BASIC_PASSWORD + "\n")
    secret.chmod(0o600)
    with FaultProxy(fhir_server, require_basic=(BASIC_USER, BASIC_PASSWORD)) as proxy:
        summary = _run(tmp_path, proxy.url, T1, "--fhir_auth=basic", f"--fhir_username={BASIC_USER}",
                       f"--fhir_password_file={secret}")
    assert summary["ok"], summary
    assert (summary["counts"]["written"], summary["counts"]["opted_out"]) == (12, 4)
    assert proxy.refused == 0 and proxy.authorized >= 3  # the server check, then Bundles (batches of 7)
    for number in numbers:  # read back from the store itself, behind the proxy
        assert [c["status"] for c in _consents_of(fhir_server, number)] == [
            "active" if number in numbers[:4] else "inactive"], number


def test_ndop_process_basic_with_a_wrong_password_fails_fast_in_one_line(work_dir, fhir_server):
    _replied_request(work_dir, "X26ABC1-241126-0010", _numbers(4, seed=9112), [])
    with FaultProxy(fhir_server, require_basic=(BASIC_USER, BASIC_PASSWORD)) as proxy:
        done = _ndop(work_dir, "--request-id", "X26ABC1-241126-0010", "--fhir-url", proxy.url, "--no-ack",
                     "--fhir-username", BASIC_USER, env={"FHIR_AUTH": "basic", "FHIR_PASSWORD": "wrong-pa55"})
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 1 and len(errors) == 1, done.stderr
    assert errors[0].startswith("ndop process: error: the FHIR server") and "refused the 'basic' credentials (401)" \
        in errors[0] and f"user name '{BASIC_USER}'" in errors[0]  # the CLI's --fhir-username reached the check
    assert "wrong-pa55" not in done.stdout + done.stderr
    assert (proxy.refused, proxy.authorized) == (2, 0)  # the server check and its one retry; no Bundle was sent
    assert work_dir.load("X26ABC1-241126-0010")["state"] == REPLIED


@pytest.mark.parametrize("url, env, message", [
    ("http://fhir.example.org/fhir", {"FHIR_USERNAME": "u", "FHIR_PASSWORD": "p"},
     "only over https or to this machine (loopback), not to http://fhir.example.org/fhir"),
    ("https://fhir.example.org/fhir", {"FHIR_PASSWORD": "p"}, "needs a user name: set FHIR_USERNAME"),
    ("https://fhir.example.org/fhir", {"FHIR_USERNAME": "u"}, "needs a password: set FHIR_PASSWORD_FILE"),
])
def test_ndop_process_refuses_a_basic_setting_in_one_line_exit_2(work_dir, url, env, message):
    _replied_request(work_dir, "X26ABC1-241126-0011", _numbers(2, seed=9113), [])
    done = cli("process", "--work-dir", str(work_dir.root), "--request-id", "X26ABC1-241126-0011", "--no-ack",
               env={"FHIR_URL": url, "FHIR_AUTH": "basic", **env}, drop_fhir=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr
    assert work_dir.load("X26ABC1-241126-0011")["state"] == REPLIED
    assert not (work_dir.request_dir("X26ABC1-241126-0011") / SUMMARY).exists()

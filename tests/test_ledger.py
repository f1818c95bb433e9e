"""The Consent ledger: write only what changed, refresh evenly, and agree with the store after a crash.

Writes are counted on the real FHIR server (sekmet keeps every version) by each Consent's
``meta.versionId``. The 40-day refresh spread runs through the pure ``decide()``; a few real pipeline
days check that the pipeline applies the same rule.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.request import datfile
from pipeline.core import nhs
from pipeline.ledger import versions as ledger_dirs
from pipeline.core.errors import InputError
from pipeline.core.faults import EXIT_CODE, FAULT_ENV
from pipeline.fhir.config import FhirClientConfig
from pipeline.fhir.search import iter_search
from pipeline.fhir.sessions import open_session
from pipeline.beam.graph import run
from pipeline.lifecycle.state import PROCESSED, REPLIED, WorkDir
from transforms import ledger_join as ledger
from transforms import shards
from tests.helpers import TEST_KEY, consent_id, key_source_for_tests
from transforms.join import classify

REPO_ROOT = Path(__file__).resolve().parent.parent
DAY0 = datetime(2026, 3, 1, 10, 15, tzinfo=timezone.utc)


def _at(day: int) -> str:
    return (DAY0 + timedelta(days=day)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _numbers(count: int, seed: int) -> list[str]:
    return nhs.synthetic_numbers(count, seed=seed).to_pylist()


def _classified(cohort: list[str], opted_out: set[str]):
    numbers = shards.to_int64(pa.array(cohort, pa.string()))
    reply = shards.to_int64(pa.array([n for n in cohort if n not in opted_out], pa.string()))
    return classify(numbers, reply)


# -- decide(): the rule, without Beam -------------------------------------------------------------------


def test_decide_writes_new_changed_and_due_and_keeps_who_left() -> None:
    people = _numbers(10, seed=9801)
    first = ledger.decide(_classified(people[:8], {people[0]}), ledger.empty_ledger(), _at(0), "R1", TEST_KEY, refresh_days=0)
    assert first.counts["to_write"] == 8 and first.counts["new_patients"] == 8 and first.ledger.num_rows == 8
    # people[1] opts out, people[0] withdraws, people[7] leaves, people[8] is new
    now = _classified(people[:7] + [people[8]], {people[1]})
    second = ledger.decide(now, first.ledger, _at(1), "R2", TEST_KEY, refresh_days=0)
    assert second.counts == {"to_write": 3, "new_patients": 1, "newly_opted_out": 1, "opt_out_withdrawn": 1,
                             "refreshed": 0, "unchanged": 5, "left_cohort": 1, "superseded": 0}
    written = set(shards.to_strings(np.concatenate([second.write_opted_out, second.write_not_opted_out])))
    assert written == {people[0], people[1], people[8]}
    rows = {f"{r['nhs_number']:010d}": r for r in second.ledger.to_pylist()}
    assert len(rows) == 9
    left_before = next(r for r in first.ledger.to_pylist() if f"{r['nhs_number']:010d}" == people[7])
    assert rows[people[7]] == left_before  # the patient who left: untouched
    assert rows[people[1]]["status"] == "active" and rows[people[1]]["request_id"] == "R2"
    assert rows[people[2]]["request_id"] == "R1" and rows[people[2]]["written_at"] == DAY0.replace(minute=15)
    assert rows[people[2]]["checked_at"].date() == (DAY0 + timedelta(days=1)).date()  # confirmed, not written
    assert rows[people[2]]["status_since"] == rows[people[2]]["written_at"]
    assert all(rows[n]["consent_id"] == consent_id(n) for n in rows)
    full = ledger.decide(now, second.ledger, _at(1), "R3", TEST_KEY, refresh_days=0, full_refresh=True)
    assert full.counts["to_write"] == 8 and full.counts["unchanged"] == 0


def test_an_older_answer_never_overwrites_a_newer_one() -> None:
    people = _numbers(6, seed=9802)
    newer = ledger.decide(_classified(people, {people[0]}), ledger.empty_ledger(), _at(2), "B", TEST_KEY, refresh_days=0)
    # An older request's answer (day 1), processed after the newer one: people[1] opted out then, people[0] not.
    older = ledger.decide(_classified(people[:5], {people[1]}), newer.ledger, _at(1), "A", TEST_KEY, refresh_days=0)
    assert older.counts["superseded"] == 5 and older.counts["to_write"] == 0 and older.counts["left_cohort"] == 1
    assert len(older.write_opted_out) == len(older.write_not_opted_out) == 0
    assert sorted(older.ledger.to_pylist(), key=lambda r: r["nhs_number"]) == sorted(
        newer.ledger.to_pylist(), key=lambda r: r["nhs_number"])  # every row exactly as the newer answer left it
    same_time = ledger.decide(_classified(people, {people[1]}), newer.ledger, _at(2), "C", TEST_KEY, refresh_days=0)
    assert same_time.counts["superseded"] == 0 and same_time.counts["newly_opted_out"] == 1  # as new: applies


def test_refresh_spread_over_40_days() -> None:
    """1,500 patients, no change, --refresh_days 30, a check a day for 40 days after a full load."""
    cohort, days = 1500, 30
    classified = _classified(_numbers(cohort, seed=9802), set(_numbers(cohort, seed=9802)[::7]))
    state = ledger.decide(classified, ledger.empty_ledger(), _at(0), "R0", TEST_KEY, refresh_days=days).ledger
    per_day, times_written = [], np.zeros(cohort, int)
    for day in range(1, 41):
        decision = ledger.decide(classified, state, _at(day), f"R{day}", TEST_KEY, refresh_days=days)
        again = ledger.decide(classified, decision.ledger, _at(day), f"R{day}b", TEST_KEY, refresh_days=days)
        assert again.counts["to_write"] == 0  # a second run the same day refreshes nobody twice
        state = decision.ledger
        per_day.append(decision.counts["refreshed"])
        if day <= 30:
            times_written += np.isin(np.sort(state.column("nhs_number").to_numpy()),
                                     np.concatenate([decision.write_opted_out, decision.write_not_opted_out]))
        lag = state.column("checked_at").to_numpy() - state.column("written_at").to_numpy()
        assert lag.max() < np.timedelta64(days, "D")  # no dateTime more than 30 days behind the check
    assert per_day[0] > 0  # spread from the first day on
    assert max(per_day) <= 2 * cohort / days, per_day
    assert (times_written == 1).mean() > 0.95  # most patients rewritten once in the first 30 days


def test_offsets_are_deterministic_and_even() -> None:
    numbers = shards.to_int64(nhs.synthetic_numbers(30000, seed=9803))
    offsets = ledger.refresh_offset(numbers, 30)
    assert np.array_equal(offsets, ledger.refresh_offset(numbers.copy(), 30))
    counts = np.bincount(offsets, minlength=30)
    assert counts.min() > 0.8 * 1000 and counts.max() < 1.2 * 1000


def test_composites_join_decide_write_and_read_back(tmp_path) -> None:
    """JoinWithLedger, WriteLedgerShards and ReadLedger in a TestPipeline (no FHIR: the write is not here)."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from tests.beam_util import local_pipeline

    people = _numbers(12, seed=9804)
    first = ledger.decide(_classified(people[:10], set()), ledger.empty_ledger(), _at(0), "R1", TEST_KEY, refresh_days=0)
    previous = tmp_path / "in"
    previous.mkdir()
    pq.write_table(first.ledger, previous / "part-00000.parquet")
    manifest = shards.to_int64(pa.array(people[2:], pa.string()))  # 0, 1 left; 10, 11 new
    reply = shards.to_int64(pa.array(people[3:], pa.string()))  # 2 opts out
    with local_pipeline() as p:
        joined = {
            "manifest": p | "M" >> beam.Create(list(shards.split_by_shard(manifest, 3))),
            "reply": p | "R" >> beam.Create(list(shards.split_by_shard(reply, 3))),
            ledger.LEDGER: p | "L" >> ledger.ReadLedger(str(previous), 3),
        } | ledger.JoinWithLedger(_at(1), "R2", key_source_for_tests(), refresh_days=0)
        written = joined.to_write | beam.FlatMap(lambda batch: [(batch[0], n) for n in shards.to_strings(batch[1])])
        assert_that(written, equal_to([("active", people[2]), ("inactive", people[10]), ("inactive", people[11])]))
        joined[ledger.LEDGER] | ledger.WriteLedgerShards(str(tmp_path / "out"))
    rows = _ledger_rows(tmp_path / "out")
    assert len(rows) == 12 and len(list((tmp_path / "out").glob("*.parquet"))) <= 3
    assert rows[people[0]]["request_id"] == "R1" and rows[people[2]]["status"] == "active"



def _by_number(table: pa.Table) -> list[dict]:
    return sorted(ledger._conform(table).to_pylist(), key=lambda row: row["nhs_number"])


def test_a_one_shard_ledger_file_moves_as_its_path_and_reads_back_the_same(tmp_path) -> None:
    """Issue 24 (a): a file WriteLedgerShards wrote (one shard's rows, read with the same --shards) goes through the
    join as its path, not its rows; a file spanning shards still moves as Arrow blocks. Either way the shard's rows
    read back are the file's."""
    people = _numbers(60, seed=9805)
    rows = ledger.decide(_classified(people, set(people[::4])), ledger.empty_ledger(), _at(0), "R1", TEST_KEY,
                         refresh_days=0).ledger
    keys = shards.shard_of(rows.column("nhs_number").to_numpy(), 3)
    one = tmp_path / "part-00001.parquet"
    pq.write_table(rows.filter(pa.array(keys == 1)), one, row_group_size=7)  # several row groups, one shard
    mixed = tmp_path / "mixed.parquet"
    pq.write_table(rows, mixed, row_group_size=25)

    read = ledger.ReadLedgerFileFn(3)
    [(shard, block)] = list(read.process(str(one)))
    assert shard == 1 and len(block) < 200 and block.startswith(ledger.file_block(""))
    assert _by_number(ledger.from_bytes([block])) == _by_number(rows.filter(pa.array(keys == 1)))

    blocks = list(read.process(str(mixed)))
    assert {s for s, _ in blocks} == {0, 1, 2} and not any(b.startswith(ledger.file_block("")) for _, b in blocks)
    for s in range(3):
        got = ledger.from_bytes([b for k, b in blocks if k == s])
        assert _by_number(got) == _by_number(rows.filter(pa.array(keys == s)))

def test_decide_writes_each_shards_ledger_file_and_an_integrity_error_removes_them(tmp_path) -> None:
    """Issue 24 (a): with ``ledger_out`` DecideShard writes each shard's file as it decides it (the runner never
    holds the new ledger); WriteLedgerShards keeps those files, or removes them all when the run has integrity
    errors (nothing was written to the store: no ledger either)."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from tests.beam_util import local_pipeline

    people = _numbers(12, seed=9806)
    manifest = shards.to_int64(pa.array(people[:10], pa.string()))
    parts = sorted(set(shards.shard_of(manifest, 3).tolist()))
    for errors in (False, True):
        reply = people[2:10] + (people[11:] if errors else [])  # people[11] is not in the request
        out = tmp_path / f"out-{errors}"
        with local_pipeline() as p:
            joined = {
                "manifest": p | "M" >> beam.Create(list(shards.split_by_shard(manifest, 3))),
                "reply": p | "R" >> beam.Create(list(shards.split_by_shard(
                    shards.to_int64(pa.array(reply, pa.string())), 3))),
                ledger.LEDGER: p | "L" >> ledger.ReadLedger(None, 3),
            } | ledger.JoinWithLedger(_at(0), "R1", key_source_for_tests(), refresh_days=0, ledger_out=str(out))
            count = joined[ledger.JoinWithLedger.INTEGRITY_ERRORS] | beam.combiners.Count.Globally()
            files = joined[ledger.LEDGER] | ledger.WriteLedgerShards(str(out), count)
            assert_that(files, equal_to([] if errors else [ledger.part_path(str(out), s) for s in parts]))
        if errors:
            assert not list(out.glob("*.parquet"))
        else:
            rows = _ledger_rows(out)
            assert len(list(out.glob("*.parquet"))) == len(parts) and sorted(rows) == sorted(people[:10])
            assert {n for n, r in rows.items() if r["status"] == "active"} == set(people[:2])


# -- the pipeline against the real FHIR server -----------------------------------------------------------


def _inputs(folder: Path, cohort: list[str], opted_out: set[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"nhs_number": pa.array(cohort, pa.string())}), folder / "manifest.parquet")
    reply = [n for n in cohort if n not in opted_out]
    (folder / "reply.dat").write_bytes(datfile.encode(pa.array(reply, pa.string()), "crlf"))


def _process(folder: Path, fhir_url: str, checked_at: str, *extra: str) -> dict:
    return run([
        "--runner=FnApiRunner", f"--manifest={folder / 'manifest.parquet'}", f"--reply={folder / 'reply.dat'}",
        f"--checked_at={checked_at}", f"--output_dir={folder}", f"--fhir_url={fhir_url}", "--fhir_auth=none",
        "--batch_size=50", "--shards=4", f"--request_id={folder.name}", "--provenance_org=X26ABC1", *extra,
    ])


def _versions(fhir_url: str, numbers: list[str]) -> dict[str, tuple[int, str, str]]:
    """(versionId, status, dateTime) of each patient's Consent that is in the store."""
    wanted = {consent_id(n): n for n in numbers}
    found = {}
    with open_session(FhirClientConfig.from_env(env={}, base_url=fhir_url, auth="none")) as session:
        for consent in iter_search(session, fhir_url, "Consent", {"_count": 1000}):
            if consent["id"] in wanted:
                found[wanted[consent["id"]]] = (int(consent["meta"]["versionId"]), consent["status"],
                                                consent["dateTime"])
    return found


def _ledger_rows(folder: Path) -> dict[str, dict]:
    table = pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.parquet"))])
    return {f"{r['nhs_number']:010d}": r for r in table.to_pylist()}


def test_second_run_writes_exactly_what_changed(tmp_path, fhir_server) -> None:
    everyone = _numbers(340, seed=9811)
    cohort1, opted1 = everyone[:300], set(everyone[:300:5])
    first_dir, ledger1 = tmp_path / "R1", tmp_path / "ledger1"
    _inputs(first_dir, cohort1, opted1)
    first = _process(first_dir, fhir_server, _at(0), f"--ledger_out={ledger1}", "--refresh_days=0")
    assert first["ok"] and first["changes"]["new_patients"] == 300 and first["counts"]["written"] == 300
    assert set(_versions(fhir_server, cohort1).values()) >= {(1, "active", _at(0))}
    assert {v[0] for v in _versions(fhir_server, cohort1).values()} == {1}  # everybody written once
    meta = json.loads((ledger1 / ledger_dirs.META).read_text())
    assert meta["fhir_base_url"] == fhir_server and meta["rows"] == 300
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in ledger1.iterdir())
    assert stat.S_IMODE(ledger1.stat().st_mode) == 0o700

    gone, stay, new = cohort1[:30], cohort1[30:], everyone[300:]
    flipped = stay[:25]
    opted2 = (opted1 - set(flipped)) | {n for n in flipped if n not in opted1}
    cohort2 = stay + new
    second_dir, ledger2 = tmp_path / "R2", tmp_path / "ledger2"
    _inputs(second_dir, cohort2, opted2 & set(cohort2))
    second = _process(second_dir, fhir_server, _at(3), f"--ledger_in={ledger1}", f"--ledger_out={ledger2}",
                      "--refresh_days=0")
    assert second["ok"], second["problems"]
    c = second["changes"]
    assert (c["to_write"], c["new_patients"], c["left_cohort"], c["unchanged"]) == (65, 40, 30, 245)
    assert c["newly_opted_out"] + c["opt_out_withdrawn"] == 25 and c["refreshed"] == 0
    assert second["counts"]["written"] == 65 and second["counts"]["bundles_posted"] == 2
    versions = _versions(fhir_server, everyone)
    assert all(versions[n][0] == 2 and versions[n][2] == _at(3) for n in flipped)
    assert all(versions[n] == (1, "active" if n in opted2 else "inactive", _at(3)) for n in new)
    assert all(versions[n][0] == 1 and versions[n][2] == _at(0) for n in gone + stay[25:])  # untouched
    rows = _ledger_rows(ledger2)
    assert len(rows) == 340 and all(rows[n]["request_id"] == "R1" for n in gone)

    third_dir, ledger3 = tmp_path / "R3", tmp_path / "ledger3"
    _inputs(third_dir, cohort2, opted2 & set(cohort2))
    third = _process(third_dir, fhir_server, _at(3), f"--ledger_in={ledger2}", f"--ledger_out={ledger3}",
                     "--full_refresh")
    assert third["ok"] and third["counts"]["written"] == 310
    after = _versions(fhir_server, everyone)
    assert all(after[n][0] == versions[n][0] + 1 for n in cohort2)  # everyone in the cohort once more
    assert all(after[n] == versions[n] for n in gone)


def test_pipeline_days_refresh_what_decide_says(tmp_path, fhir_server) -> None:
    cohort = _numbers(300, seed=9812)
    opted = set(cohort[::4])
    previous = None
    expected_state = ledger.empty_ledger()
    classified = _classified(cohort, opted)
    for day in (0, 1, 2, 2):
        folder, out = tmp_path / f"D{day}-{previous is None}", tmp_path / f"L{day}-{len(str(previous))}"
        _inputs(folder, cohort, opted)
        args = [f"--ledger_out={out}", "--refresh_days=30"] + ([f"--ledger_in={previous}"] if previous else [])
        summary = _process(folder, fhir_server, _at(day), *args)
        expected = ledger.decide(classified, expected_state, _at(day), folder.name, TEST_KEY, refresh_days=30)
        assert summary["ok"] and summary["counts"]["written"] == expected.counts["to_write"], (day, summary["changes"])
        assert summary["changes"]["refreshed"] == expected.counts["refreshed"]
        expected_state, previous = expected.ledger, out
    assert summary["counts"]["written"] == 0  # the second run of day 2


def test_ledger_refused_unless_full_refresh(tmp_path, fhir_server) -> None:
    cohort = _numbers(20, seed=9813)
    folder, out = tmp_path / "R", tmp_path / "out"
    _inputs(folder, cohort, set())
    other = tmp_path / "other"
    other.mkdir()
    (other / ledger_dirs.META).write_text(json.dumps({"fhir_base_url": "http://127.0.0.1:1/fhir"}))
    with pytest.raises(InputError, match="describes FHIR server http://127.0.0.1:1/fhir"):
        _process(folder, fhir_server, _at(0), f"--ledger_in={other}", f"--ledger_out={out}")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / ledger_dirs.META).write_text(json.dumps({"fhir_base_url": fhir_server,
                                                       ledger_dirs.KEY_FINGERPRINT: TEST_KEY.fingerprint}))
    (broken / "part-00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="part-00000.parquet: ledger file cannot be read"):
        _process(folder, fhir_server, _at(0), f"--ledger_in={broken}", f"--ledger_out={out}")
    assert _versions(fhir_server, cohort) == {} and not out.exists()  # nothing written
    summary = _process(folder, fhir_server, _at(0), f"--ledger_in={broken}", f"--ledger_out={out}", "--full_refresh")
    assert summary["ok"] and summary["counts"]["written"] == 20 and (out / ledger_dirs.META).is_file()


def test_a_stray_or_damaged_ledger_part_is_found_and_full_refresh_gets_past_it(tmp_path, fhir_server) -> None:
    """Issue 19 item 7: ledger.json names its parts with their SHA-256; a stray duplicate part or a damaged one
    stops the run (exit 2, nothing written) instead of being used, and --full-refresh starts a new ledger."""
    cohort = _numbers(20, seed=9814)
    folder, first = tmp_path / "R", tmp_path / "L1"
    _inputs(folder, cohort, set())
    assert _process(folder, fhir_server, _at(0), f"--ledger_out={first}")["ok"]
    meta = json.loads((first / ledger_dirs.META).read_text())
    parts = sorted(first.glob("*.parquet"))
    assert sorted(meta["sha256"]) == sorted(meta["files"]) == [p.name for p in parts]
    before = _versions(fhir_server, cohort)

    stray = first / "zz-copy.parquet"
    shutil.copy(parts[0], stray)  # a patient twice, as a stray copy left by hand would make
    with pytest.raises(InputError, match="zz-copy.parquet not part of it"):
        _process(folder, fhir_server, _at(1), f"--ledger_in={first}", f"--ledger_out={tmp_path / 'L2'}")
    stray.unlink()
    damaged = bytearray(parts[0].read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    parts[0].write_bytes(bytes(damaged))
    with pytest.raises(InputError, match=f"{parts[0].name}: ledger file damaged"):
        _process(folder, fhir_server, _at(1), f"--ledger_in={first}", f"--ledger_out={tmp_path / 'L3'}")
    assert _versions(fhir_server, cohort) == before  # nothing written by the refused runs
    shutil.copy(parts[0], stray)
    rebuilt = _process(folder, fhir_server, _at(1), f"--ledger_in={first}", f"--ledger_out={tmp_path / 'L4'}",
                       "--full_refresh")
    assert rebuilt["ok"] and rebuilt["counts"]["written"] == 20
    assert pq.read_table(sorted((tmp_path / "L4").glob("*.parquet"))).num_rows == 20


# -- ndop process: the work dir's ledger, a crash in the middle of the writes ---------------------------


def _replied_request(work_dir: WorkDir, request_id: str, cohort: list[str], opted_out: set[str],
                     checked_at: str) -> None:
    folder = work_dir.ensure().request_dir(request_id)
    _inputs(folder, cohort, opted_out)
    work_dir.save({"request_id": request_id, "state": REPLIED, "checked_at": checked_at, "mailbox": "X26ABC1",
                   "created_at": checked_at, "files": {"manifest": "manifest.parquet", "reply": "reply.dat"},
                   "history": []})


def _ndop(work_dir: WorkDir, fhir_url: str, request_id: str, *extra: str, fault: str | None = None):
    env = {k: v for k, v in os.environ.items()
           if k != FAULT_ENV and (not k.startswith(("FHIR_", "NDOP_")) or k == "NDOP_ID_KEY_FILE")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "process", "--work-dir", str(work_dir.root), "--request-id", request_id,
         "--no-ack", "--fhir-url", fhir_url, "--runner=FnApiRunner", "--batch_size=10", "--shards=2", *extra],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)


def test_crash_mid_write_then_rerun_store_and_ledger_agree(tmp_path, fhir_server) -> None:
    work_dir = WorkDir(tmp_path / "work")
    cohort = _numbers(120, seed=9814)
    _replied_request(work_dir, "R1", cohort, set(cohort[::3]), _at(0))
    done = _ndop(work_dir, fhir_server, "R1")
    assert done.returncode == 0, done.stderr
    first_ledger = ledger_dirs.current(work_dir).resolve()
    assert stat.S_IMODE(ledger_dirs.root(work_dir).stat().st_mode) == 0o700

    flipped = set(cohort[::3]) ^ set(cohort[:60])  # 60 statuses change
    _replied_request(work_dir, "R2", cohort, flipped, _at(2))
    crashed = _ndop(work_dir, fhir_server, "R2", "--refresh-days=0", fault="after-first-bundle")
    assert crashed.returncode == EXIT_CODE, crashed.stderr
    assert ledger_dirs.current(work_dir).resolve() == first_ledger  # the previous ledger still in force
    assert work_dir.load("R2")["state"] == REPLIED
    status = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", "--work-dir", str(work_dir.root)],
                            cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True,
                            text=True, timeout=60)
    assert f"ledger: 120 patients, oldest checked_at {_at(0)[:10]}" in status.stdout, status.stdout

    rerun = _ndop(work_dir, fhir_server, "R2", "--refresh-days=0")
    assert rerun.returncode == 0, rerun.stderr
    assert work_dir.load("R2")["state"] == PROCESSED
    summary = json.loads((work_dir.request_dir("R2") / "summary.json").read_text())
    assert summary["changes"]["to_write"] == 60 and summary["counts"]["written"] == 60  # the same delta again
    rows = _ledger_rows(ledger_dirs.current(work_dir).resolve())
    stored = _versions(fhir_server, cohort)
    assert set(rows) == set(stored) == set(cohort)
    for number in cohort:
        version, status_now, date_time = stored[number]
        row = rows[number]
        assert row["status"] == status_now == ("active" if number in flipped else "inactive"), nhs.mask(number)
        assert row["written_at"].strftime("%Y-%m-%dT%H:%M:%SZ") == date_time, nhs.mask(number)
    assert not list(ledger_dirs.root(work_dir).glob(".pending-*"))

    _replied_request(work_dir, "R3", cohort, flipped, _at(3))
    refused = _ndop(work_dir, fhir_server.replace("127.0.0.1", "localhost"), "R3")
    errors = [line for line in refused.stderr.splitlines() if "error" in line.lower()]
    assert refused.returncode == 2 and len(errors) == 1 and "describes FHIR server" in errors[0], refused.stderr
    assert work_dir.load("R3")["state"] == REPLIED and ledger_dirs.current(work_dir).resolve().name == "v-R2"


def test_staged_ledger_for_remote_workers(tmp_path, fhir_server, mem_fs) -> None:
    """``--stage-dir mem://...``: the ledger goes out beside the inputs and its successor comes back."""
    from pipeline.orchestration.process_request import process_request

    work_dir = WorkDir(tmp_path / "work")
    cohort = _numbers(30, seed=9815)
    args = ["--runner=FnApiRunner", "--shards=2", "--fhir_auth=none", "--refresh_days=0"]
    _replied_request(work_dir, "S1", cohort, set(cohort[:5]), _at(0))
    first = process_request(work_dir, "S1", fhir_server, args, stage_dir="mem://bucket/ndop")
    assert first["processing"]["counts"]["written"] == 30
    assert any(p.startswith("mem://bucket/ndop/S1/ledger/out/part-") for p in mem_fs)
    _replied_request(work_dir, "S2", cohort, set(cohort[:8]), _at(1))
    second = process_request(work_dir, "S2", fhir_server, args, stage_dir="mem://bucket/ndop")
    assert second["processing"]["counts"]["written"] == 3 and second["state"] == PROCESSED
    assert any(p.startswith("mem://bucket/ndop/S2/ledger/in/part-") for p in mem_fs)
    rows = _ledger_rows(ledger_dirs.current(work_dir).resolve())
    assert len(rows) == 30 and sum(r["status"] == "active" for r in rows.values()) == 8
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in ledger_dirs.current(work_dir).resolve().iterdir())

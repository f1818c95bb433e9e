"""``ndop filter`` on real files against the ledger of real ``ndop run``s (mesh-sandbox playing NDOP, the FHIR server).

Expectations come from what the FHIR store holds after each run (each patient's Consent status), not from the
list the NDOP plugin was given.
"""
from __future__ import annotations

import csv
import json
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.lifecycle import audit
from pipeline.core import nhs
from pipeline.privacy import purposes
from pipeline.core.errors import InputError
from pipeline.lifecycle.state import WorkDir
from tests.helpers import cli
from tests.test_run import ndop_run, statuses
from transforms.apply_opt_outs import FhirSource

TODAY = datetime.now(timezone.utc).date()


def _filter(work_dir: WorkDir, *args: str, env: dict | None = None):
    return cli("filter", "--work-dir", str(work_dir.root), "--runner=FnApiRunner", *args, env=env, timeout=180,
               drop_fhir=True)


def _opted_out(fhir: str, numbers: list[str]) -> set[str]:
    held = statuses(fhir, numbers)
    assert all(len(v) == 1 for v in held.values())
    return {n for n, v in held.items() if v == ["active"]}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _one_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.slow  # stage 2 of the test command (run_tests.sh --all)
def test_filter_applies_the_ledger_of_real_runs(tmp_path, work_dir, mesh, fhir_server) -> None:
    cohort = nhs.synthetic_numbers(60, seed=2310).to_pylist()
    outsider = nhs.synthetic_numbers(61, seed=2310).to_pylist()[-1]  # valid, never checked
    cohort_file = tmp_path / "cohort.txt"
    cohort_file.write_text("\n".join(cohort) + "\n")
    opted = tmp_path / "opted-out.txt"
    opted.write_text("\n".join(cohort[:10]) + "\n")
    mesh.plugin(opted_out_file=str(opted))
    env = {**mesh.env(), "FHIR_URL": fhir_server}
    first_run = ndop_run(work_dir, env, "--cohort", str(cohort_file))
    assert first_run.returncode == 0, first_run.stderr
    first = _opted_out(fhir_server, cohort)
    between = datetime.now(timezone.utc)
    opted.write_text("\n".join(cohort[5:15]) + "\n")  # 0-4 withdraw, 10-14 opt out
    second_run = ndop_run(work_dir, env, "--cohort", str(cohort_file), "--new-request")
    assert second_run.returncode == 0, second_run.stderr
    second = _opted_out(fhir_server, cohort)
    assert first != second and len(second - first) == 5

    # A CSV as a data manager has it: duplicates, a typed number, an outsider, an invalid number, a blank.
    rows = [{"nhs_number": n, "value": str(i)} for i, n in enumerate(cohort)]
    rows += [{"nhs_number": f"{cohort[20][:3]} {cohort[20][3:6]} {cohort[20][6:]}", "value": "typed"},
             {"nhs_number": cohort[12], "value": "again"}, {"nhs_number": outsider, "value": "outsider"},
             {"nhs_number": "1234567890", "value": "invalid"}, {"nhs_number": "", "value": "blank"}]
    source = tmp_path / "extract.csv"
    with open(source, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["nhs_number", "value"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out" / "extract.csv"
    out.parent.mkdir()
    done = _filter(work_dir, "--input", str(source), "--output", str(out), "--fhir-url", fhir_server)
    assert done.returncode == 0, done.stderr

    def allowed(number: str, opted_out: set[str]) -> bool:
        normal = nhs.normalise(number)
        return normal in cohort and normal not in opted_out

    expected = [r for r in rows if allowed(r["nhs_number"], second)]
    assert _read_csv(out) == expected  # values exactly as they came, in input order
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    removed = sum(1 for r in rows if nhs.normalise(r["nhs_number"]) in second)
    assert (manifest["rows_in"], manifest["kept"], manifest["removed_opted_out"], manifest["removed_unknown"],
            manifest["removed_invalid"]) == (len(rows), len(expected), removed, 1, 2)
    assert manifest["ledger"]["version"] == work_dir.all()[-1]["request_id"] and manifest["purpose"] is None
    assert manifest["ledger"]["oldest_checked_at"] and manifest["ledger"]["fhir_base_url"] == fhir_server
    event = [e for e in audit.read_events(work_dir.root) if e["event"] == "disclosure"][-1]
    assert event["kept"] == len(expected) and event["output"] == str(out)
    assert not any(n in (work_dir.root / "audit.jsonl").read_text() for n in cohort)

    # --as-of a moment between the runs: the statuses the first run left in the store.
    as_of = tmp_path / "as-of.csv"
    done = _filter(work_dir, "--input", str(source), "--output", str(as_of), "--as-of", between.isoformat())
    assert done.returncode == 0, done.stderr
    assert _read_csv(as_of) == [r for r in rows if allowed(r["nhs_number"], first)]

    # Parquet with an integer column, --unknown keep: the outsider stays.
    table = pa.table({"nhs": pa.array([int(n) for n in cohort + [outsider]], pa.int64()),
                      "x": pa.array(range(61), pa.int32())})
    pq.write_table(table, tmp_path / "extract.parquet", row_group_size=16)
    kept = tmp_path / "kept.parquet"
    done = _filter(work_dir, "--input", str(tmp_path / "extract.parquet"), "--output", str(kept), "--column", "nhs",
                   "--unknown", "keep")
    assert done.returncode == 0, done.stderr
    assert pq.read_table(kept).to_pydict() == table.filter(
        pa.array([n not in second for n in cohort + [outsider]])).to_pydict()

    # --removed-since the first run: exactly those who opted out in the second, numbers only, 0600.
    since = tmp_path / "removed.txt"
    done = _filter(work_dir, "--removed-since", between.isoformat(), "--output", str(since))
    assert done.returncode == 0, done.stderr
    assert set(since.read_text().split()) == second - first and stat.S_IMODE(since.stat().st_mode) == 0o600

    # Fail closed: another store, an old ledger, an unknown or expired purpose: one line, exit 2, no output.
    refused = tmp_path / "refused.csv"
    other = fhir_server.replace("127.0.0.1", "localhost")
    assert "not " + other in _one_error(_filter(work_dir, "--input", str(source), "--output", str(refused),
                                                "--fhir-url", other))
    assert "more than the limit of 0 days" in _one_error(_filter(work_dir, "--input", str(source), "--output",
                                                                 str(refused), "--max-age", "0"))
    purposes_file = tmp_path / "purposes.toml"
    purposes_file.write_text(f"""
[purposes.old-study]
legal_basis = "COPI regulation 3"
keep_opted_out = true
expires = {TODAY - timedelta(days=1)}

[purposes.surveillance]
legal_basis = "COPI regulation 3"
keep_opted_out = true
expires = {TODAY + timedelta(days=30)}
reference = "test notice"
""")
    for name, why in (("old-study", "expired on"), ("nobody", "no purpose 'nobody'")):
        assert why in _one_error(_filter(work_dir, "--input", str(source), "--output", str(refused), "--purpose",
                                         name, "--purposes", str(purposes_file)))
    assert not refused.exists() and not list(tmp_path.glob(".refused.csv*"))

    # An exempt purpose keeps the opted-out patients (and still removes what is not a checked number).
    exempt = tmp_path / "exempt.csv"
    done = _filter(work_dir, "--input", str(source), "--output", str(exempt), "--purpose", "surveillance",
                   env={"NDOP_PURPOSES_FILE": str(purposes_file)})
    assert done.returncode == 0, done.stderr
    assert _read_csv(exempt) == [r for r in rows if r["value"] not in ("invalid", "blank")]
    manifest = json.loads(Path(f"{exempt}.manifest.json").read_text())
    assert manifest["purpose"]["name"] == "surveillance" and manifest["kept_opted_out_by_exemption"] == removed

    # The FHIR store as the source of truth agrees with the ledger (on this cohort: other tests share the server).
    index = FhirSource(fhir_server, page_size=25).load(FhirSource(fhir_server).version())
    ours = set(cohort)
    assert {f"{n:010d}" for n, o in zip(index.numbers.tolist(), index.opted_out.tolist()) if o} & ours == second


def test_purposes_file_rules(tmp_path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[purposes.audit]\nlegal_basis = "section 251"\nkeep_opted_out = true\nexpires = 2099-01-01\n')
    with pytest.raises(InputError, match="opt-outs apply under section 251"):
        purposes.load(str(path))
    path.write_text('[purposes.audit]\nlegal_basis = "section 251"\nexpires = 2099-01-01\n')
    chosen = purposes.choose("audit", str(path), TODAY)
    assert chosen is not None and not chosen.keep_opted_out
    assert purposes.choose(None, None, TODAY) is None
    with pytest.raises(InputError, match="no purposes file"):
        purposes.choose("audit", None, TODAY)


def test_filter_reads_and_writes_through_filesystems(tmp_path, mem_fs) -> None:
    """Ledger, input and output on ``mem://`` (only Beam's FileSystems can reach it), on the local runner."""
    from apache_beam.io.filesystems import FileSystems

    from pipeline.beam.filtering import FilterSettings, run_filter
    from tests.test_apply_opt_outs import ledger_table, write_ledger

    people = nhs.synthetic_numbers(6, seed=2311).to_pylist()
    now = datetime.now(timezone.utc)
    local = write_ledger(tmp_path / "ledger", ledger_table([(n, i < 2, now, now) for i, n in enumerate(people[:5])]),
                         now)
    for path in local.iterdir():
        with FileSystems.create(f"mem://bucket/ledger/{path.name}") as handle:
            handle.write(path.read_bytes())
    data = pa.table({"nhs_number": people, "row": list(range(6))})
    with FileSystems.create("mem://bucket/in/data.parquet") as handle:
        pq.write_table(data, handle)
    settings = FilterSettings(input="mem://bucket/in/data.parquet", output="mem://bucket/out/data.parquet")
    manifest = run_filter(WorkDir(tmp_path / "work"), settings, ledger="mem://bucket/ledger",
                          beam_args=["--runner=FnApiRunner"])
    with FileSystems.open("mem://bucket/out/data.parquet") as handle:
        assert pq.read_table(handle).column("row").to_pylist() == [2, 3, 4]
    assert (manifest["kept"], manifest["removed_opted_out"], manifest["removed_unknown"]) == (3, 2, 1)
    assert "mem://bucket/out/data.parquet.manifest.json" in mem_fs
    assert not [p for p in mem_fs if ".parts-" in p]  # the temporary parts are gone


@pytest.mark.prism
def test_filter_on_prism(tmp_path) -> None:
    """The same filter on Beam's Prism runner: RecordBatches cross the runner's coders and Reshuffle."""
    from dev.prism import prism_args
    from tests.test_apply_opt_outs import ledger_table, write_ledger

    people = nhs.synthetic_numbers(300, seed=2312).to_pylist()
    now = datetime.now(timezone.utc)
    ledger = write_ledger(tmp_path / "ledger", ledger_table([(n, i % 4 == 0, now, now)
                                                             for i, n in enumerate(people[:250])]), now)
    data = pa.table({"nhs_number": people, "row": list(range(300))})
    pq.write_table(data, tmp_path / "data.parquet", row_group_size=64)
    work_dir = WorkDir(tmp_path / "work")
    done = cli("filter", "--work-dir", str(work_dir.root), "--ledger", str(ledger), "--input",
               str(tmp_path / "data.parquet"), "--output", str(tmp_path / "out.parquet"), *prism_args(),
               timeout=180, drop_fhir=True)
    assert done.returncode == 0, done.stderr
    expected = [i for i in range(250) if i % 4]
    assert pq.read_table(tmp_path / "out.parquet").column("row").to_pylist() == expected  # in input order
    manifest = json.loads((tmp_path / "out.parquet.manifest.json").read_text())
    assert (manifest["kept"], manifest["removed_opted_out"], manifest["removed_unknown"]) == (len(expected), 63, 50)


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    """In this process (pipeline.cli.main): nothing here needs the pipeline to start."""
    from pipeline.cli import main

    from tests.test_apply_opt_outs import ledger_table, write_ledger

    now = datetime.now(timezone.utc)
    people = nhs.synthetic_numbers(3, seed=2313).to_pylist()
    ledger = write_ledger(tmp_path / "ledger", ledger_table([(n, False, now, now) for n in people]), now)
    source = tmp_path / "in.csv"
    source.write_text("nhs_number,v\n" + "".join(f"{n},1\n" for n in people))
    work_dir = WorkDir(tmp_path / "work")
    out = str(tmp_path / "out.csv")
    cases = [
        ((), "no Consent ledger yet"),
        (("--ledger", str(ledger), "--column", "nhs"), "no column 'nhs'"),
        (("--ledger", str(ledger), "--as-of", "2026-13-01"), "is not a date"),
        (("--ledger", str(ledger), "--as-of", str(TODAY + timedelta(days=2))), "is in the future"),
        (("--ledger", str(ledger), "--format", "parquet"), "cannot be read as parquet"),
    ]
    for extra, why in cases:
        code = main(["filter", "--work-dir", str(work_dir.root), "--input", str(source), "--output", out, *extra])
        lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert code == 2 and len(lines) == 1 and why in lines[0], (extra, lines)
    assert not Path(out).exists()

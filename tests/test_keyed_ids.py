"""Issue 21 items 1-2: keyed Consent ids, the key's handling, and moving a store written with the old ids.

The old ids were UUIDv5 of the NHS number under a published namespace: enumerating the 999 range reversed any of
them. The brute-force test runs that attack against what a real run wrote and finds nothing; ``ndop rekey`` moves a
store written the old way (sekmet and HAPI) so that no old id resolves and every patient has one Consent.
"""
from __future__ import annotations

import json
import os
import pickle
import stat

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from pipeline.request import datfile
from pipeline.core import nhs
from pipeline.ledger import versions as ledger_dirs
from pipeline.fhir.config import FhirClientConfig
from pipeline.fhir.search import iter_search, post_bundle
from pipeline.fhir.sessions import open_session
from pipeline.lifecycle.state import REPLIED, WorkDir
from tests.helpers import TEST_KEY, cli
from transforms import ledger_join as ledger
from transforms import shards
from transforms.build_consent import build_consent
from transforms.consent_ids import (
    IdKey,
    KeyError_,
    KeySource,
    generate_key,
    parse_key,
    read_key_file,
    unkeyed_consent_id,
)
from transforms.join import classify
from transforms.provenance import build_provenance
from transforms.vocabulary import NOT_OPTED_OUT, OPTED_OUT
from transforms.write_consents import build_bundle

CHECKED_AT = "2026-11-30T06:00:00Z"


# -- the id rule and the key, without a server ------------------------------------------------------------


def test_ids_are_keyed_uuids_and_the_key_never_shows() -> None:
    number = "9990000018"
    other = parse_key(generate_key(), "k2")
    cid = TEST_KEY.consent_id(number)
    assert cid == TEST_KEY.consent_id(number) != other.consent_id(number)  # stable under a key, another key: other
    assert cid != unkeyed_consent_id(number) and cid[14] == "8" and cid[19] in "89ab" and len(cid) == 36
    assert TEST_KEY.consent_id("9990000026") != cid
    assert "7e57" not in repr(TEST_KEY) and TEST_KEY.fingerprint in repr(TEST_KEY)
    with pytest.raises(TypeError):
        pickle.dumps(TEST_KEY)  # a key never rides in a pipeline graph: workers get a KeySource


def test_key_files_must_be_private_and_well_formed(tmp_path) -> None:
    path = tmp_path / "k"
    path.write_text(generate_key())
    os.chmod(path, 0o644)
    with pytest.raises(KeyError_, match="must be private"):
        read_key_file(path)
    os.chmod(path, 0o600)
    assert isinstance(read_key_file(path), IdKey)
    path.write_text("not hex at all")
    with pytest.raises(KeyError_, match="not a Consent id key") as err:
        read_key_file(path)
    assert "not hex" not in str(err.value)  # the file's content is never echoed


def test_a_worker_with_another_key_stops(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OTHER_KEY", generate_key())
    with pytest.raises(KeyError_, match="expected " + TEST_KEY.fingerprint):
        KeySource("env:OTHER_KEY", TEST_KEY.fingerprint).load()
    monkeypatch.setenv("SAME_KEY", "7e57" * 16)
    assert KeySource("env:SAME_KEY", TEST_KEY.fingerprint).load().fingerprint == TEST_KEY.fingerprint


def test_a_secret_manager_source_names_the_secret_and_checks_what_it_gets(monkeypatch) -> None:
    """Offline (no Google project here): the gcp-secret source asks for exactly the named version, and a worker
    refuses a secret that is not the launcher's key."""
    from transforms import consent_ids

    asked = []
    name = "projects/p1/secrets/ndop-id-key/versions/3"
    monkeypatch.setattr(consent_ids, "_read_gcp_secret", lambda n: asked.append(n) or "7e57" * 16)
    assert KeySource(f"gcp-secret:{name}", TEST_KEY.fingerprint).load().fingerprint == TEST_KEY.fingerprint
    assert asked == [name]
    monkeypatch.setattr(consent_ids, "_read_gcp_secret", lambda n: generate_key())
    with pytest.raises(KeyError_, match="another key would write other ids"):
        KeySource(f"gcp-secret:{name}", TEST_KEY.fingerprint).load()


def test_keygen_writes_a_private_key_once(tmp_path) -> None:
    out = tmp_path / "id.key"
    made = cli("keygen", "--out", str(out), "--work-dir", str(tmp_path / "w"))
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key = read_key_file(out)
    assert key.fingerprint in made.stdout and out.read_text().strip() not in made.stdout + made.stderr
    again = cli("keygen", "--out", str(out), "--work-dir", str(tmp_path / "w"))
    assert again.returncode == 2 and "never overwritten" in again.stderr
    assert read_key_file(out).fingerprint == key.fingerprint


def test_without_a_key_a_remote_store_is_refused_before_anything_is_sent(tmp_path) -> None:
    env = {"NDOP_ID_KEY_FILE": "", "FHIR_URL": "https://fhir.example.org/fhir"}
    for command in (["run", "--cohort", str(tmp_path / "cohort.txt")], ["process", "--request-id", "R1", "--no-ack"]):
        done = cli(*command, "--work-dir", str(tmp_path / "w"), env=env)
        assert done.returncode == 2, done.stderr
        assert "no Consent id key: make one with `ndop keygen" in done.stderr
        assert not (tmp_path / "w").exists()  # nothing built, nothing sent


def test_one_resolver_names_the_key_source_in_order(tmp_path, monkeypatch) -> None:
    """pipeline/privacy/keys.resolve_key_source, what every command uses: the option, then NDOP_ID_KEY_SOURCE,
    NDOP_ID_KEY_FILE, NDOP_ID_KEY, then the work dir's own key (loopback FHIR only, made only with create)."""
    from pipeline.core.errors import InputError
    from pipeline.privacy.keys import resolve_key_source

    local, remote, work = "http://127.0.0.1:8092/fhir", "https://fhir.example.org/fhir", tmp_path / "w"
    work.mkdir()
    for name in ("NDOP_ID_KEY_SOURCE", "NDOP_ID_KEY_FILE", "NDOP_ID_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NDOP_ID_KEY", "7e57" * 16)
    assert resolve_key_source(None, work, remote, create=True) == "env:NDOP_ID_KEY"
    monkeypatch.setenv("NDOP_ID_KEY_FILE", "k.key")
    assert resolve_key_source(None, work, remote, create=True) == f"file:{os.path.abspath('k.key')}"
    monkeypatch.setenv("NDOP_ID_KEY_SOURCE", "env:WORKER_KEY")
    assert resolve_key_source(None, None, None, create=False) == "env:WORKER_KEY"
    assert resolve_key_source("file:/run/secrets/k", work, local, create=True) == "file:/run/secrets/k"
    for name in ("NDOP_ID_KEY_SOURCE", "NDOP_ID_KEY_FILE", "NDOP_ID_KEY"):
        monkeypatch.delenv(name)
    assert resolve_key_source(None, work, local, create=False) is None  # the work dir's, not made by a check
    assert not (work / "id.key").exists()
    for url, folder in ((remote, work), (None, work), (local, None)):  # never the work dir's key for a remote store
        with pytest.raises(InputError, match="make one with `ndop keygen"):
            resolve_key_source(None, folder, url, create=True)
    assert not (work / "id.key").exists()
    made = resolve_key_source(None, work, local, create=True)
    assert made == f"file:{(work / 'id.key').resolve()}" and stat.S_IMODE((work / "id.key").stat().st_mode) == 0o600
    assert resolve_key_source(None, work, local, create=False) == made  # made once, then the same key


def test_the_key_check_reads_the_pipeline_option_and_the_work_dirs_key(tmp_path) -> None:
    """Before anything is sent: ``--id_key_source`` among the pipeline arguments counts (it used to be ignored, so
    a remote store with the key only there was refused), and a work dir key that is not private is refused."""
    env = {"NDOP_ID_KEY_FILE": "", "FHIR_URL": "https://fhir.example.org/fhir", "WORKER_KEY": "7e57" * 16}
    done = cli("process", "--request-id", "R1", "--no-ack", "--id_key_source=env:WORKER_KEY",
               "--work-dir", str(tmp_path / "w"), env=env)
    assert done.returncode == 2 and "ndop keygen" not in done.stderr and "R1" in done.stderr, done.stderr
    work = tmp_path / "w2"
    work.mkdir(mode=0o700)
    (work / "id.key").write_text(generate_key())
    os.chmod(work / "id.key", 0o644)
    done = cli("run", "--cohort", str(tmp_path / "cohort.txt"), "--work-dir", str(work),
               env={"NDOP_ID_KEY_FILE": "", "FHIR_URL": "http://127.0.0.1:9/fhir"})
    assert done.returncode == 2 and "must be private" in done.stderr, done.stderr
    assert not (work / "requests").exists()  # nothing built, nothing sent


# -- a real run: the ids it wrote, attacked ---------------------------------------------------------------


def all_valid_999_numbers() -> list[str]:
    """Every valid NHS number in the synthetic 999 range (about 909,000): what an attacker enumerates."""
    body = np.arange(9_990_000_00, 9_999_999_99 + 1, dtype=np.int64)  # the first nine digits
    digits = np.stack([(body // 10 ** (8 - i)) % 10 for i in range(9)])
    check = 11 - (np.tensordot(np.arange(10, 1, -1), digits, axes=1) % 11)
    check[check == 11] = 0
    valid = check != 10
    return [str(n) for n in (body[valid] * 10 + check[valid]).tolist()]


def _replied_request(work_dir: WorkDir, request_id: str, cohort: list[str], opted_out: set[str]) -> None:
    folder = work_dir.ensure().request_dir(request_id)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"nhs_number": pa.array(cohort, pa.string())}), folder / "manifest.parquet")
    reply = [n for n in cohort if n not in opted_out]
    (folder / "reply.dat").write_bytes(datfile.encode(pa.array(reply, pa.string()), "crlf"))
    work_dir.save({"request_id": request_id, "state": REPLIED, "checked_at": CHECKED_AT, "mailbox": "X26ABC1",
                   "created_at": CHECKED_AT, "files": {"manifest": "manifest.parquet", "reply": "reply.dat"},
                   "history": []})


def _process(work_dir: WorkDir, fhir_url: str, request_id: str, env: dict[str, str] | None = None):
    return cli("process", "--work-dir", str(work_dir.root), "--request-id", request_id, "--no-ack",
               "--fhir-url", fhir_url, "--runner=FnApiRunner", "--batch_size=50", "--shards=2", env=env,
               timeout=240)


def _consents_by_patient(fhir_url: str, cohort: list[str]) -> dict[str, list[str]]:
    wanted = set(cohort)
    found: dict[str, list[str]] = {n: [] for n in cohort}
    with open_session(FhirClientConfig.from_env(env={}, base_url=fhir_url, auth="none")) as session:
        for consent in iter_search(session, fhir_url, "Consent", {"_count": 1000}):
            number = ((consent.get("patient") or {}).get("identifier") or {}).get("value")
            if number in wanted:
                found[number].append(consent["id"])
    return found


def test_brute_forcing_the_999_range_finds_no_id_a_real_run_wrote(tmp_path, fhir_server) -> None:
    work_dir = WorkDir(tmp_path / "work")
    cohort = nhs.synthetic_numbers(150, seed=21001).to_pylist()
    _replied_request(work_dir, "K1", cohort, set(cohort[::4]))
    done = _process(work_dir, fhir_server, "K1")
    assert done.returncode == 0, done.stderr
    stored = _consents_by_patient(fhir_server, cohort)
    ids = {cid for found in stored.values() for cid in found}
    assert len(ids) == len(cohort)

    attack = {unkeyed_consent_id(n): n for n in all_valid_999_numbers()}  # the published rule, every number
    assert set(map(unkeyed_consent_id, cohort)) <= set(attack)  # the attack would reverse the old ids...
    assert not ids & set(attack)  # ...and reverses none of the ids written now
    assert ids == {TEST_KEY.consent_id(n) for n in cohort}
    meta = json.loads((ledger_dirs.current(work_dir) / ledger_dirs.META).read_text())
    assert meta[ledger_dirs.KEY_FINGERPRINT] == TEST_KEY.fingerprint and "7e57" * 4 not in json.dumps(meta)


def test_a_loopback_store_without_a_key_gets_the_work_dirs_own(tmp_path, fhir_server) -> None:
    work_dir = WorkDir(tmp_path / "work")
    cohort = nhs.synthetic_numbers(20, seed=21002).to_pylist()
    _replied_request(work_dir, "K2", cohort, set())
    done = _process(work_dir, fhir_server, "K2", env={"NDOP_ID_KEY_FILE": ""})
    assert done.returncode == 0, done.stderr
    key_file = work_dir.root / "id.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    own = read_key_file(key_file)
    assert own.fingerprint != TEST_KEY.fingerprint
    assert sorted(sum(_consents_by_patient(fhir_server, cohort).values(), [])) == sorted(map(own.consent_id, cohort))


def test_a_run_with_another_key_stops_before_writing(tmp_path, fhir_server) -> None:
    work_dir = WorkDir(tmp_path / "work")
    cohort = nhs.synthetic_numbers(20, seed=21003).to_pylist()
    _replied_request(work_dir, "K3", cohort, set())
    assert _process(work_dir, fhir_server, "K3").returncode == 0
    _replied_request(work_dir, "K4", cohort, set(cohort[:5]))
    other = tmp_path / "other.key"
    other.write_text(generate_key())
    os.chmod(other, 0o600)
    refused = _process(work_dir, fhir_server, "K4", env={"NDOP_ID_KEY_FILE": str(other)})
    assert refused.returncode == 2, refused.stderr
    assert f"written under Consent id key {TEST_KEY.fingerprint}" in refused.stderr and "ndop rekey" in refused.stderr
    assert all(len(found) == 1 for found in _consents_by_patient(fhir_server, cohort).values())
    assert work_dir.load("K4")["state"] == REPLIED


# -- ndop rekey: a store written with the old ids, moved --------------------------------------------------


class _Unkeyed:
    """The old id rule in the shape decide() takes a key: how today's stores were written."""

    consent_id = staticmethod(unkeyed_consent_id)


def _old_store(work_dir: WorkDir, fhir_url: str, cohort: list[str], opted_out: set[str]) -> str:
    """Consents (and a Provenance over them) under the old unkeyed ids, and a ledger without a key fingerprint."""
    consents = [build_consent(n, OPTED_OUT if n in opted_out else NOT_OPTED_OUT, CHECKED_AT,
                              consent_id=unkeyed_consent_id(n)) for n in cohort]
    provenance = build_provenance([f"Consent/{c['id']}" for c in consents[:10]], recorded=CHECKED_AT,
                                  checked_at=CHECKED_AT, organisation="X26ABC1", request_id="OLD1")
    with open_session(FhirClientConfig.from_env(env={}, base_url=fhir_url, auth="none")) as session:
        bundle = build_bundle(consents, "batch", "id")
        bundle["entry"].append({"resource": provenance, "request": {"method": "PUT",
                                                                     "url": f"Provenance/{provenance['id']}"}})
        assert post_bundle(session, fhir_url, bundle).status_code == 200
    numbers = shards.to_int64(pa.array(cohort, pa.string()))
    replied = shards.to_int64(pa.array([n for n in cohort if n not in opted_out], pa.string()))
    decided = ledger.decide(classify(numbers, replied), ledger.empty_ledger(), CHECKED_AT, "OLD1",
                            _Unkeyed(), refresh_days=0)  # type: ignore[arg-type]
    pending = ledger_dirs.pending_folder(work_dir.ensure(), "OLD1")
    ledger_dirs.write_part(pending, "part-00000.parquet", decided.ledger)
    ledger_dirs.finish(str(pending), {"request_id": "OLD1", "checked_at": CHECKED_AT,
                                      "counts": {"ledger_rows": len(cohort)}}, fhir_url, None)
    ledger_dirs.promote(work_dir, "OLD1")
    return provenance["id"]


def test_rekey_reads_a_batchs_old_and_new_ids_in_one_bundle(fhir_server) -> None:
    """pipeline/privacy/rekey._write_batch on sekmet: one batch Bundle of GETs (the old ids, then the new ones,
    answers split by position), then one of PUTs; each patient's case comes out right."""
    from pipeline.privacy.rekey import RekeyResult, _write_batch

    old_only, new_only, both, neither = cohort = nhs.synthetic_numbers(4, seed=21011).to_pylist()
    rows = [{"consent_id": unkeyed_consent_id(n), "new_id": TEST_KEY.consent_id(n), "nhs_number": n,
             "status": OPTED_OUT, "written_at": 1_764_482_400} for n in cohort]
    posted: list[int] = []
    with open_session(FhirClientConfig.from_env(env={}, base_url=fhir_server, auth="none")) as session:
        for number, cid in ((old_only, unkeyed_consent_id(old_only)), (new_only, TEST_KEY.consent_id(new_only)),
                            (both, unkeyed_consent_id(both)), (both, TEST_KEY.consent_id(both))):
            put = session.put(f"{fhir_server}/Consent/{cid}", json=build_consent(number, NOT_OPTED_OUT, CHECKED_AT,
                                                                                 consent_id=cid))
            assert put.status_code in (200, 201), put.text
        session.hooks["response"].append(
            lambda r, *a, **k: posted.append(len(json.loads(r.request.body)["entry"])) if r.request.method == "POST"
            else None)
        result = RekeyResult()
        to_delete = _write_batch(session, fhir_server, rows, result)
    assert posted == [8, 2]  # 4 old + 4 new ids read in one Bundle; old_only moved, neither restored, in one
    assert sorted(to_delete) == sorted(unkeyed_consent_id(n) for n in (old_only, both))
    assert (result.already, result.restored, result.failed) == (1, 1, [])
    status = {n: requests.get(f"{fhir_server}/Consent/{TEST_KEY.consent_id(n)}", timeout=30).json()["status"]
              for n in (old_only, neither)}
    assert status == {old_only: NOT_OPTED_OUT, neither: OPTED_OUT}  # the stored one moved; the lost one rebuilt


def test_rekey_moves_an_old_store_once_resumably(tmp_path, fhir_store) -> None:
    work_dir = WorkDir(tmp_path / "work")
    cohort = nhs.synthetic_numbers(60, seed=21004 + len(fhir_store) % 7).to_pylist()
    opted_out = set(cohort[::5])
    provenance_id = _old_store(work_dir, fhir_store, cohort, opted_out)

    # A run against the old store stops: a second Consent per patient would follow.
    _replied_request(work_dir, "K5", cohort, opted_out)
    refused = _process(work_dir, fhir_store, "K5")
    assert refused.returncode == 2 and "old unkeyed ones" in refused.stderr, refused.stderr

    # An earlier rekey was interrupted: 5 patients already moved; and the store lost one Consent.
    with open_session(FhirClientConfig.from_env(env={}, base_url=fhir_store, auth="none")) as session:
        for number in cohort[10:15]:  # (not named by the Provenance: a store may refuse to delete what it names)
            old = session.get(f"{fhir_store}/Consent/{unkeyed_consent_id(number)}").json()
            moved = {**old, "id": TEST_KEY.consent_id(number),
                     "identifier": [{"system": old["identifier"][0]["system"], "value": TEST_KEY.consent_id(number)}]}
            moved.pop("meta", None)
            assert session.put(f"{fhir_store}/Consent/{moved['id']}", json=moved).status_code in (200, 201)
            assert session.delete(f"{fhir_store}/Consent/{unkeyed_consent_id(number)}").status_code < 300
        assert session.delete(f"{fhir_store}/Consent/{unkeyed_consent_id(cohort[17])}").status_code < 300

    done = cli("rekey", "--work-dir", str(work_dir.root), "--fhir-url", fhir_store, timeout=240)
    assert done.returncode == 0, done.stderr
    assert f"{len(cohort)} patients; {len(cohort) - 6} moved, 5 already under the new ids, 1 restored" in done.stdout

    for number in cohort:  # no old id resolves
        assert requests.get(f"{fhir_store}/Consent/{unkeyed_consent_id(number)}", timeout=30).status_code in (404, 410)
    found = _consents_by_patient(fhir_store, cohort)
    assert all(ids == [TEST_KEY.consent_id(n)] for n, ids in found.items()), found  # exactly one, the keyed one
    statuses = {n: requests.get(f"{fhir_store}/Consent/{TEST_KEY.consent_id(n)}", timeout=30).json()["status"]
                for n in cohort}
    assert statuses == {n: OPTED_OUT if n in opted_out else NOT_OPTED_OUT for n in cohort}
    targets = requests.get(f"{fhir_store}/Provenance/{provenance_id}", timeout=30).json()["target"]
    assert [t["reference"] for t in targets] == [f"Consent/{TEST_KEY.consent_id(n)}" for n in cohort[:10]]
    meta = json.loads((ledger_dirs.current(work_dir) / ledger_dirs.META).read_text())
    assert meta[ledger_dirs.KEY_FINGERPRINT] == TEST_KEY.fingerprint

    again = cli("rekey", "--work-dir", str(work_dir.root), "--fhir-url", fhir_store, timeout=120)
    assert again.returncode == 0 and f"0 moved, {len(cohort)} already" in again.stdout, again.stdout + again.stderr
    rerun = _process(work_dir, fhir_store, "K5")  # the moved store is used as usual
    assert rerun.returncode == 0, rerun.stderr
    assert all(len(ids) == 1 for ids in _consents_by_patient(fhir_store, cohort).values())

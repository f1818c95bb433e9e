"""``ndop rekey``: move a store's Consents to the ids of the current Consent id key, once (transforms/consent_ids.py).

A store written with the old unkeyed ids (UUIDv5 of the NHS number: reversible) or under another key is moved
patient by patient, from the ledger, which holds every Consent's id:

1. read the old and the new ids back, both in one batch Bundle of GETs per batch of patients (answered entry by
   entry, as ``ndop verify`` reads);
2. PUT the Consent under its new id (the stored Consent with its id and identifier changed, so nothing else moves;
   rebuilt from the ledger if the store has lost it: counted as restored), each entry's answer checked;
3. rewrite every Provenance whose target names an old id (a store may refuse to delete what is still referenced);
4. DELETE the old id, only once the new one is stored;
5. a new ledger version with the new ids and the new key's fingerprint, swapped in like a run's.

Resumable and idempotent: a patient already moved (new id stored, old gone) is left alone, so after a crash the
same command carries on; the ledger changes only at the end, when every patient is moved. Until then a run
stops with exit 2 (the ledger still names the old key). A FHIR server may keep deleted versions in its history
(HAPI does, until ``$expunge``): docs/privacy.md says how to clear them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import pyarrow as pa

from pipeline.ledger import versions as ledger_dirs
from pipeline.core.errors import InputError, NdopError
from pipeline.fhir.config import FhirClientConfig
from pipeline.fhir.search import iter_search, post_batch
from pipeline.fhir.answers import FhirError, read_entries
from pipeline.fhir.sessions import open_session
from pipeline.core.clock import utcnow
from pipeline.lifecycle.state import WorkDir
from pipeline.ledger.verify import READ_BATCH, _when, ledger_rows, read_consents
from transforms.build_consent import build_consent
from transforms.consent_ids import IdKey
from transforms.vocabulary import IDENTIFIER_SYSTEM

_LOGGER = logging.getLogger(__name__)


@dataclass
class RekeyResult:
    patients: int = 0
    moved: int = 0
    already: int = 0  # moved by an earlier, interrupted rekey
    restored: int = 0  # neither id in the store: rebuilt from the ledger under the new id
    provenances: int = 0
    failed: list[str] = field(default_factory=list)  # one reason per patient not moved

    def counts(self) -> dict[str, int]:
        return {"patients": self.patients, "moved": self.moved, "already": self.already, "restored": self.restored,
                "provenances": self.provenances, "failed": len(self.failed)}


def _moved(stored: dict[str, Any], new_id: str) -> dict[str, Any]:
    """The stored Consent under its new id: the same resource, id and our identifier changed, server meta dropped."""
    consent = {k: v for k, v in stored.items() if k != "meta"}
    consent["id"] = new_id
    others = [i for i in consent.get("identifier") or [] if i.get("system") != IDENTIFIER_SYSTEM]
    consent["identifier"] = [{"system": IDENTIFIER_SYSTEM, "value": new_id}, *others]
    return consent


def _post_checked(session: Any, base_url: str, entries: list[dict[str, Any]], what: str) -> list[tuple[int, str]]:
    try:
        answered = post_batch(session, base_url, entries, f"rekey: {what}")
    except FhirError as err:
        raise NdopError(f"{err}; nothing lost, run `ndop rekey` again") from None
    return read_entries({"entry": answered}, len(entries))


def _write_batch(session: Any, base_url: str, rows: Sequence[dict[str, Any]], result: RekeyResult) -> list[str]:
    """Store each patient's Consent under its new id; returns the old ids still in the store whose patient's new
    id is stored (to delete once the Provenances point at the new ids)."""
    ids = [r["consent_id"] for r in rows] + [r["new_id"] for r in rows]
    stored = list(read_consents(session, base_url, ids, per_bundle=max(len(ids), 1)))  # one Bundle: old, then new
    olds, news = dict(stored[:len(rows)]), dict(stored[len(rows):])
    writes: list[tuple[dict[str, Any], dict[str, Any], bool]] = []
    stored_new = set()
    for row in rows:
        old, new = olds.get(row["consent_id"]), news.get(row["new_id"])
        if new is not None:
            stored_new.add(row["new_id"])
            result.already += old is None
        elif old is not None:
            writes.append((row, _moved(old, row["new_id"]), False))
        else:
            writes.append((row, build_consent(row["nhs_number"], row["status"], _when(row["written_at"]),
                                              consent_id=row["new_id"]), True))
    if writes:
        answers = _post_checked(session, base_url, [
            {"resource": consent, "request": {"method": "PUT", "url": f"Consent/{row['new_id']}"}}
            for row, consent, _ in writes], "writing Consents under their new ids")
        for (row, _, restored), (code, reason) in zip(writes, answers):
            if 200 <= code < 300:
                stored_new.add(row["new_id"])
                result.restored += restored
            else:
                result.failed.append(f"Consent {row['new_id']}: {reason or f'HTTP {code}'}")
    return [row["consent_id"] for row in rows if row["new_id"] in stored_new and olds.get(row["consent_id"])]


def _delete_old(session: Any, base_url: str, old_ids: Sequence[str], result: RekeyResult) -> None:
    for start in range(0, len(old_ids), READ_BATCH):
        batch = old_ids[start:start + READ_BATCH]
        answers = _post_checked(session, base_url, [
            {"request": {"method": "DELETE", "url": f"Consent/{cid}"}} for cid in batch], "deleting the old ids")
        for cid, (code, reason) in zip(batch, answers):
            if 200 <= code < 300 or code in (404, 410):
                result.moved += 1
            else:
                result.failed.append(f"deleting an old Consent id: {reason or f'HTTP {code}'}")


def _retarget(provenance: dict[str, Any], new_ids: dict[str, str]) -> bool:
    """Point a Provenance's targets at the new ids; True when one changed."""
    changed = False
    for target in provenance.get("target") or []:
        ref = target.get("reference") or ""
        if ref.startswith("Consent/") and ref[len("Consent/"):] in new_ids:
            target["reference"] = f"Consent/{new_ids[ref[len('Consent/'):]]}"
            changed = True
        ident = target.get("identifier") or {}
        if ident.get("system") == IDENTIFIER_SYSTEM and ident.get("value") in new_ids:
            ident["value"] = new_ids[ident["value"]]
            changed = True
    return changed


def _rewrite_provenances(session: Any, base_url: str, new_ids: dict[str, str], result: RekeyResult) -> None:
    changed = []
    for provenance in iter_search(session, base_url, "Provenance", {"_count": 500}):
        if _retarget(provenance, new_ids):
            changed.append({k: v for k, v in provenance.items() if k != "meta"})
    for start in range(0, len(changed), READ_BATCH):
        batch = changed[start:start + READ_BATCH]
        answers = _post_checked(session, base_url, [
            {"resource": p, "request": {"method": "PUT", "url": f"Provenance/{p['id']}"}} for p in batch],
            "rewriting Provenance targets")
        for provenance, (code, reason) in zip(batch, answers):
            if 200 <= code < 300:
                result.provenances += 1
            else:
                result.failed.append(f"Provenance {provenance['id']}: {reason or f'HTTP {code}'}")


def _new_ledger(work_dir: WorkDir, new_ids: dict[str, str], key: IdKey) -> None:
    def with_new_ids(table: pa.Table) -> pa.Table:
        index = table.schema.get_field_index("consent_id")
        ids = [new_ids.get(cid, cid) for cid in table.column("consent_id").to_pylist()]
        return table.set_column(index, table.schema.field(index), pa.array(ids, pa.string()))

    ledger_dirs.rewrite_current(work_dir, f"rekey-{utcnow():%Y%m%dT%H%M%S}", with_new_ids,
                                key_fingerprint=key.fingerprint)


def rekey(work_dir: WorkDir, config: FhirClientConfig, key: IdKey, batch: int = READ_BATCH) -> RekeyResult:
    """Move every Consent the ledger names to ``key``'s ids (see the module docstring)."""
    found = ledger_dirs.current(work_dir)
    if found is None:
        raise InputError(f"{work_dir.root}: no ledger (no request processed): nothing to move; "
                         "a first run writes keyed ids")
    folder = str(found.resolve())
    meta = ledger_dirs.read_meta(folder)
    ledger_dirs.check_same_store(meta, config.base_url, folder, "nothing moved")
    rows = ledger_rows(work_dir)
    result = RekeyResult(patients=len(rows))
    if meta.get(ledger_dirs.KEY_FINGERPRINT) == key.fingerprint:
        result.already = len(rows)
        return result
    for row in rows:
        row["new_id"] = key.consent_id(row["nhs_number"])
    new_ids = {row["consent_id"]: row["new_id"] for row in rows}
    with open_session(config) as session:  # new ids first, then Provenances, then the old ids (a store refuses to
        old_ids: list[str] = []            # delete a Consent a Provenance still names: HAPI answers 409)
        for start in range(0, len(rows), batch):
            old_ids += _write_batch(session, config.base_url, rows[start:start + batch], result)
        if not result.failed:
            _rewrite_provenances(session, config.base_url, new_ids, result)
        if not result.failed:
            _delete_old(session, config.base_url, old_ids, result)
    if result.failed:
        for reason in result.failed[:5]:
            _LOGGER.error("rekey: %s", reason)
        raise NdopError(f"rekey: {len(result.failed)} not moved (first: {result.failed[0]}); the ledger still names "
                        "the old ids: run `ndop rekey` again")
    _new_ledger(work_dir, new_ids, key)
    _LOGGER.info("rekey: %s", ", ".join(f"{k} {v}" for k, v in result.counts().items()))
    return result

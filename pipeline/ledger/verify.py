"""``ndop verify``: the ledger checked against the FHIR store, so drift made behind the tool's back is found.

The ledger says what the store holds (pipeline/ledger/versions.py); a Consent deleted or changed in the store directly
would otherwise be believed for up to ``--refresh-days``. Verify reads Consents back by id, in batch Bundles of
GETs (a read answered entry by entry, checked like a write: pipeline/fhir/answers.answer_problem), and compares
id, status and ``dateTime`` with the ledger's row. A mismatch is:

- repaired now with ``--repair``: the ledger's Consent is written again (PUT by id, the same builder);
- otherwise queued: the patient's row leaves the ledger (a new ledger version, swapped in like a run's), so the next
  process step writes that Consent as for a new patient.

Consents written with ``--upsert conditional`` have ids the server chose: verify needs the default ``--upsert id``.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.ledger import versions as ledger_dirs
from pipeline.core import nhs
from pipeline.core.errors import InputError, NdopError
from pipeline.fhir.answers import status_code
from pipeline.fhir.config import FhirClientConfig
from pipeline.fhir.search import post_batch
from pipeline.fhir.sessions import open_session
from pipeline.core.clock import isoformat, utcnow
from pipeline.lifecycle.state import WorkDir
from transforms.build_consent import build_consent
from transforms.ledger_join import _status_codes, ledger_files
from transforms.vocabulary import NOT_OPTED_OUT, OPTED_OUT
from transforms.write_consents import build_bundle

_LOGGER = logging.getLogger(__name__)

READ_BATCH = 200  # GETs per batch Bundle
COLUMNS = ["nhs_number", "status", "written_at", "consent_id"]


@dataclass(frozen=True)
class Mismatch:
    consent_id: str
    nhs_number: str
    kind: str  # missing | status | dateTime
    ledger: str
    store: str


@dataclass
class VerifyResult:
    checked: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    repaired: int = 0
    queued: int = 0

    def counts(self) -> dict[str, int]:
        kinds = {kind: sum(m.kind == kind for m in self.mismatches) for kind in ("missing", "status", "dateTime")}
        return {"checked": self.checked, "mismatches": len(self.mismatches), **kinds, "repaired": self.repaired,
                "queued": self.queued}


def ledger_rows(work_dir: WorkDir, sample: int | None = None, seed: int | None = None) -> list[dict[str, Any]]:
    """The ledger in force (every row, or a random ``sample`` of them): number, status, written_at, Consent id."""
    found = ledger_dirs.current(work_dir)
    if found is None:
        raise InputError(f"{work_dir.root}: no ledger yet (no request processed): nothing to verify")
    tables = [pq.read_table(path, columns=COLUMNS) for path in ledger_files(str(found.resolve()))]
    table = pa.concat_tables(tables) if tables else pa.table({c: [] for c in COLUMNS})
    if sample is not None and sample < table.num_rows:
        picked = sorted(random.Random(seed).sample(range(table.num_rows), sample))
        table = table.take(pa.array(picked, pa.int64()))
    statuses: Any = _status_codes(table.column("status")) if table.num_rows else []
    written = pc.cast(table.column("written_at"), pa.timestamp("s", tz="UTC")).cast(pa.int64()).to_pylist()
    return [{"nhs_number": f"{number:010d}", "status": OPTED_OUT if code else NOT_OPTED_OUT,
             "written_at": stamp, "consent_id": cid}
            for number, code, stamp, cid in zip(table.column("nhs_number").to_pylist(), statuses, written,
                                                table.column("consent_id").to_pylist())]


def read_consents(session: Any, base_url: str, ids: Sequence[str],
                  per_bundle: int = READ_BATCH) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """(id, the stored Consent or None when the store has none), in order, in batch Bundles of ``per_bundle``
    GETs by id."""
    for start in range(0, len(ids), per_bundle):
        batch = list(ids[start:start + per_bundle])
        entries = post_batch(session, base_url, [{"request": {"method": "GET", "url": f"Consent/{cid}"}}
                                                 for cid in batch], "reading Consents back")
        for cid, entry in zip(batch, entries):
            code = status_code((entry.get("response") or {}).get("status"))
            if code in (404, 410):
                yield cid, None
            elif 200 <= code < 300 and isinstance(entry.get("resource"), dict):
                yield cid, entry["resource"]
            else:
                raise NdopError(f"verify: reading Consent {cid} answered HTTP {code}")


def compare(row: dict[str, Any], stored: dict[str, Any] | None) -> Mismatch | None:
    """What differs between a ledger row and the stored Consent (None: they agree)."""
    cid, number, expected = row["consent_id"], row["nhs_number"], _when(row["written_at"])
    if stored is None:
        return Mismatch(cid, number, "missing", row["status"], "-")
    if stored.get("status") != row["status"]:
        return Mismatch(cid, number, "status", row["status"], str(stored.get("status")))
    if _epoch(stored.get("dateTime")) != row["written_at"]:
        return Mismatch(cid, number, "dateTime", expected, str(stored.get("dateTime")))
    return None


def verify(work_dir: WorkDir, config: FhirClientConfig, sample: int | None = None, repair: bool = False,
           seed: int | None = None) -> VerifyResult:
    """Check the ledger (or a sample of it) against the store; repair or queue what differs."""
    rows = ledger_rows(work_dir, sample, seed)
    found = ledger_dirs.current(work_dir)
    if found is not None:
        ledger_dirs.check_same_store(ledger_dirs.read_meta(str(found.resolve())), config.base_url, str(found),
                                     "nothing verified")
    result = VerifyResult(checked=len(rows))
    by_id = {row["consent_id"]: row for row in rows}
    with open_session(config) as session:
        for cid, stored in read_consents(session, config.base_url, list(by_id)):
            mismatch = compare(by_id[cid], stored)
            if mismatch is not None:
                result.mismatches.append(mismatch)
        wrong = [by_id[m.consent_id] for m in result.mismatches]
        if wrong and repair:
            result.repaired = _rewrite(session, config.base_url, wrong)
    if wrong and not repair:
        result.queued = queue_for_rewrite(work_dir, {int(row["nhs_number"]) for row in wrong})
    for m in result.mismatches[:5]:
        _LOGGER.warning("Consent %s (%s): %s: ledger %s, store %s", m.consent_id, nhs.mask(m.nhs_number), m.kind,
                        m.ledger, m.store)
    return result


def _rewrite(session: Any, base_url: str, rows: list[dict[str, Any]]) -> int:
    """PUT the ledger's Consents again (the pipeline's own builder); count what the store's answer says stored."""
    stored = 0
    for start in range(0, len(rows), READ_BATCH):
        batch = rows[start:start + READ_BATCH]
        consents = [build_consent(r["nhs_number"], r["status"], _when(r["written_at"]), consent_id=r["consent_id"])
                    for r in batch]
        entries = post_batch(session, base_url, build_bundle(consents, "batch", "id")["entry"],
                             f"verify --repair: writing {len(batch)} Consents")
        stored += sum(200 <= status_code(e["response"].get("status")) < 300 for e in entries)
    return stored


def queue_for_rewrite(work_dir: WorkDir, numbers: set[int]) -> int:
    """A new ledger version without these patients' rows, swapped in like a run's: the next process step writes
    their Consents as for new patients."""
    return ledger_dirs.rewrite_current(work_dir, f"verify-{utcnow():%Y%m%dT%H%M%S}",
                                       lambda table: ledger_dirs.without_patients(table, numbers))


def _when(epoch: int) -> str:
    return isoformat(datetime.fromtimestamp(epoch, timezone.utc))


def _epoch(text: Any) -> int | None:
    try:
        return int(datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp())
    except ValueError:
        return None

"""The ledger's history: an append-only change log beside the ledger, so ``ndop filter --as-of`` can say what
status was held at a past moment.

The ledger keeps one row per patient (its current status and ``status_since``); the schema stays as it is. Each
time a new ledger is promoted, the rows whose status started with that run (new patients, changed statuses:
``status_since`` equal to the run's ``checked_at``) are appended as one Parquet file
``WORK/ledger/history/<request id>.parquet`` (``nhs_number``, ``status``, ``status_since``; 0600 in a 0700 folder).
The first time, when there is no history yet, the whole ledger in force is written as the base. A patient's status
at a moment is the last history row for that number with ``status_since`` at or before it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.files import atomic_writer, private_dir
from pipeline.core.clock import utcnow
from pipeline.lifecycle.state import WorkDir
from transforms.ledger_join import HISTORY_COLUMNS as COLUMNS
from transforms.ledger_join import read_history
from transforms.ledger_join import SCHEMA, ledger_files

_LOGGER = logging.getLogger(__name__)

HISTORY = "history"


def history_folder(work_dir: WorkDir) -> Path:
    return work_dir.root / "ledger" / HISTORY


def _read_ledger(folder: Path) -> pa.Table:

    schema = pa.schema([SCHEMA.field(name) for name in COLUMNS])
    tables = [pq.read_table(path, columns=COLUMNS) for path in ledger_files(str(folder))]
    tables = [t.cast(schema) if not t.schema.equals(schema) else t for t in tables if t.num_rows]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def record(work_dir: WorkDir, ledger: Path, request_id: str, checked_at: str | None) -> Path | None:
    """Append the changes the ledger ``ledger`` (just promoted for ``request_id``) brought; returns the file."""
    folder = history_folder(work_dir)
    base = not folder.is_dir() or not any(folder.glob("*.parquet"))
    table = _read_ledger(ledger)
    if not base:
        if not checked_at:
            return None
        since = pc.cast(table.column("status_since"), pa.int64())
        moment = pa.scalar(checked_at.replace("Z", "+00:00")).cast(pa.timestamp("s", tz="UTC")).cast(pa.int64())
        table = table.filter(pc.greater_equal(since, moment))
    private_dir(folder)
    path = folder / f"{request_id}.parquet"
    with atomic_writer(path) as handle:
        pq.write_table(table, handle, compression="zstd")
    _LOGGER.info("ledger history: %d %s rows for %s", table.num_rows, "base" if base else "changed", request_id)
    return path


def compact(work_dir: WorkDir, cutoff: int, in_ledger: pa.Array, dry_run: bool = False) -> tuple[int, list[str]]:
    """The retention period applied to the history (``ndop purge``): rows that started before ``cutoff`` (epoch
    seconds) are dropped except each patient's last one, the status held at ``cutoff``, and that only while the
    patient is in the ledger (``in_ledger``: its numbers). Every ``--as-of`` at or after ``cutoff`` still answers
    as before. Returns the rows dropped and the files replaced; the new file is written before the old go, so a
    crash between leaves rows twice (harmless: the same statuses), never none."""
    folder = history_folder(work_dir)
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    history = read_history(str(folder)) if files else None
    if history is None:
        return 0, []
    since = history.column("status_since").cast(pa.timestamp("s", tz="UTC")).cast(pa.int64()).to_numpy()
    recent = history.filter(pa.array(since >= cutoff))
    old = history.filter(pa.array(since < cutoff))
    order = pc.sort_indices(old, [("nhs_number", "ascending"), ("status_since", "ascending")])
    old = old.take(order)
    numbers = old.column("nhs_number").to_numpy()
    last = np.ones(len(numbers), bool)
    last[:-1] = numbers[1:] != numbers[:-1]
    held = old.filter(pa.array(last & pc.is_in(old.column("nhs_number"), value_set=in_ledger).to_numpy(
        zero_copy_only=False)))
    kept = pa.concat_tables([recent, held.cast(recent.schema)]) if held.num_rows else recent
    dropped = history.num_rows - kept.num_rows
    if not dropped or dry_run:
        return dropped, [p.name for p in files]
    path = folder / f"compacted-{utcnow():%Y%m%dT%H%M%S}.parquet"
    with atomic_writer(path) as handle:
        pq.write_table(kept, handle, compression="zstd")
    for old_file in files:
        if old_file != path:
            old_file.unlink()
    _LOGGER.info("ledger history: %d rows older than the retention period dropped", dropped)
    return dropped, [p.name for p in files]

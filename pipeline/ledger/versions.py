"""The Consent ledger's folders: checked before a run, described by ``ledger.json``, swapped in atomically.

A ledger folder holds ``*.parquet`` (rows in :data:`transforms.ledger_join.SCHEMA`) and ``ledger.json``,
which records the FHIR base URL the rows describe, the request that made it and its row count. A folder
without ``ledger.json`` is not a ledger (a run that failed wrote it only part-way).

For the CLI the ledgers live under ``WORK/ledger/`` (0700, files 0600)::

    WORK/ledger/current -> v-<request id>     the ledger in force (a symlink, swapped with os.replace)
    WORK/ledger/v-<request id>/               the previous one is kept until the next swap
    WORK/ledger/.pending-<request id>/        where a run writes its new ledger

The new ledger becomes ``current`` only once every Consent of the run is stored (``summary["ok"]``),
and before the request is marked processed; see the crash contract in :mod:`pipeline.lifecycle.state`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.core.errors import InputError
from pipeline.fhir.config import same_base_url, without_userinfo
from pipeline.core.files import atomic_writer, fsync_dir, private_dir, write_json
from pipeline.core.settings import days_setting
from pipeline.core.clock import isoformat, utcnow
from pipeline.lifecycle.state import WorkDir
from transforms.ledger_join import COUNTERS, SCHEMA, ledger_files

_LOGGER = logging.getLogger(__name__)

META = "ledger.json"
CURRENT = "current"
REFRESH_ENV = "NDOP_REFRESH_DAYS"
KEY_FINGERPRINT = "id_key_fingerprint"  # ledger.json: the Consent id key its Consents were written under


def _local(path: str) -> bool:
    return "://" not in path


def read_meta(folder: str) -> dict[str, Any]:
    path = FileSystems.join(folder, META)
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            meta = json.loads(handle.read())
    except (OSError, ValueError) as err:  # Beam raises BeamIOError (an IOError) for a missing file
        raise InputError(f"{path}: cannot read the ledger's description ({type(err).__name__}); "
                         "give --full-refresh to rewrite the store and start a new ledger") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("fhir_base_url"), str):
        raise InputError(f"{path}: not a ledger description (no fhir_base_url)")
    # a ledger written before issue 21 may hold user:password@: never compared, printed or copied with it
    meta["fhir_base_url"] = without_userinfo(meta["fhir_base_url"])
    return meta


def check_same_store(meta: dict[str, Any], fhir_base_url: str, where: str, then: str) -> None:
    """One line (exit 2) when a ledger describes another FHIR store than ``fhir_base_url`` (userinfo ignored,
    and never printed)."""
    if not same_base_url(meta["fhir_base_url"], fhir_base_url):
        raise InputError(f"{where}: the ledger describes FHIR server {without_userinfo(meta['fhir_base_url'])}, "
                         f"not {without_userinfo(fhir_base_url)}; {then}")


def check_ledger(folder: str | None, fhir_base_url: str, key_fingerprint: str | None,
                 full_refresh: bool = False) -> str | None:
    """The ledger folder a run may read, or ``None`` (a first load, or ``--full-refresh`` over a bad one).

    Raises :class:`InputError` (one line, exit 2) before anything is written when the ledger cannot be
    read or describes another FHIR base URL, unless ``full_refresh``; and, even then, when its Consents
    were written under another Consent id key (a second Consent per patient would follow: ``ndop rekey``).
    ``key_fingerprint`` None: the caller uses no Consent id (``ndop filter``), the key is not checked.
    """
    if not folder:
        return None
    if full_refresh:  # every Consent is written again: the new ledger is built from what the store now holds
        _check_key(folder, key_fingerprint)  # even so: another key would put a second Consent beside each one
        _LOGGER.warning("full refresh: the previous ledger %s is not read; a new one starts from this run", folder)
        return None
    meta = read_meta(folder)
    check_same_store(meta, fhir_base_url, folder, "give --full-refresh to rewrite this store and start a new ledger")
    if key_fingerprint is not None:
        check_fingerprint(folder, meta.get(KEY_FINGERPRINT), key_fingerprint)
    found = ledger_files(folder)
    _check_files(folder, meta, found)
    for path in found:
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                names = set(pq.ParquetFile(handle).schema_arrow.names)
        except Exception as err:  # noqa: BLE001 (pyarrow raises several kinds for a damaged file)
            raise InputError(f"{path}: ledger file cannot be read ({type(err).__name__}); {_REBUILD}") from None
        if not set(SCHEMA.names) <= names:
            missing = ", ".join(sorted(set(SCHEMA.names) - names))
            raise InputError(f"{path}: not a ledger file (columns {missing} missing); {_REBUILD}")
    return folder


_REBUILD = "give --full-refresh to rewrite the store and start a new ledger"


def check_fingerprint(ledger: str, recorded: str | None, fingerprint: str) -> None:
    """A ledger's Consents were written under the key it records; another key would write a second Consent per
    patient beside each one. ``recorded`` None: a ledger from before keyed ids (UUIDv5 ids)."""
    if recorded == fingerprint:
        return
    if recorded is None:
        raise InputError(f"{ledger}: the store's Consent ids are the old unkeyed ones; move them once with "
                         f"`ndop rekey` (docs/privacy.md)")
    raise InputError(f"{ledger}: the store's Consents were written under Consent id key {recorded}, this key is "
                     f"{fingerprint}: use that key, or move the store to this one with `ndop rekey`")


def _check_key(folder: str, key_fingerprint: str | None) -> None:
    if key_fingerprint is None:
        return
    try:
        meta = read_meta(folder)
    except InputError:
        return  # an unreadable description: the checks below (or --full-refresh) deal with it
    check_fingerprint(folder, meta.get(KEY_FINGERPRINT), key_fingerprint)


def _digest(path: str) -> str:
    """SHA-256 of one ledger file, streamed through ``FileSystems``."""
    digest = hashlib.sha256()
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        for block in iter(lambda: handle.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_files(folder: str, meta: dict[str, Any], found: list[str]) -> None:
    """The folder holds exactly the files ``ledger.json`` names, each with its recorded SHA-256 (older ledgers
    without checksums: the names only): a stray, missing or damaged part is found here, never used."""
    names = {_name(p): p for p in found}
    listed = meta.get("files")
    if isinstance(listed, list):
        stray, missing = sorted(set(names) - set(listed)), sorted(set(listed) - set(names))
        if stray or missing:
            what = f"{', '.join(stray)} not part of it" if stray else f"{', '.join(missing)} missing"
            raise InputError(f"{folder}: the ledger does not match its ledger.json ({what}); {_REBUILD}")
    for name, expected in (meta.get("sha256") or {}).items():
        if name in names and _digest(names[name]) != expected:
            raise InputError(f"{names[name]}: ledger file damaged (its SHA-256 is not the one in ledger.json); "
                             f"{_REBUILD}")


def _name(path: str) -> str:
    return Path(path).name if _local(path) else path.rsplit("/", 1)[-1]


def finish(folder: str, summary: dict[str, Any], fhir_base_url: str, key_fingerprint: str | None) -> None:
    """Describe a new ledger (``ledger.json``) once its run stored every Consent (under the key named by its
    fingerprint, never the key)."""
    meta = {
        "fhir_base_url": without_userinfo(fhir_base_url).rstrip("/"),
        KEY_FINGERPRINT: key_fingerprint,
        "request_id": summary.get("request_id"),
        "checked_at": summary.get("checked_at"),
        "rows": summary["counts"].get("ledger_rows", 0),
        "files": [_name(p) for p in ledger_files(folder)],
        "sha256": {_name(p): _digest(p) for p in ledger_files(folder)},
        "written_at": isoformat(utcnow()),
    }
    path = FileSystems.join(folder, META)
    if _local(path):
        write_json(path, meta)
    else:
        with FileSystems.create(path, mime_type="application/json") as handle:
            handle.write((json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


# -- the work dir's ledger (the CLI) --------------------------------------------------------------------


def root(work_dir: WorkDir) -> Path:
    return work_dir.root / "ledger"


def current(work_dir: WorkDir) -> Path | None:
    link = root(work_dir) / CURRENT
    return link if link.exists() else None


def _pending(work_dir: WorkDir, request_id: str) -> Path:
    return root(work_dir) / f".pending-{request_id}"


def pending_folder(work_dir: WorkDir, version: str) -> Path:
    """An empty private folder where a new ledger version is written before :func:`promote` swaps it in."""
    private_dir(root(work_dir))
    folder = _pending(work_dir, version)
    shutil.rmtree(folder, ignore_errors=True)
    private_dir(folder)
    return folder


def without_patients(table: Any, numbers: set[int]) -> Any:
    """``table`` (ledger rows) without the rows of ``numbers``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return table.filter(pc.invert(pc.is_in(table.column("nhs_number"), pa.array(sorted(numbers), pa.int64()))))


def drop_patients(folder: str, numbers: set[int]) -> int:
    """Remove these patients' rows from a ledger being written (any ``FileSystems`` path); the rows dropped."""
    dropped = 0
    for path in ledger_files(folder):
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            table = pq.read_table(handle)
        kept = without_patients(table, numbers)
        if kept.num_rows == table.num_rows:
            continue
        dropped += table.num_rows - kept.num_rows
        if _local(path):
            with atomic_writer(path) as out:
                pq.write_table(kept, out)
        else:
            with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as out:
                pq.write_table(kept, out)
    return dropped


def write_part(folder: Path, name: str, table: Any) -> None:
    """One ledger part (0600, written atomically)."""
    with atomic_writer(folder / name) as handle:
        pq.write_table(table, handle)


def _copy(source: str, target: str) -> None:
    """One ledger file, through ``FileSystems``; a local target is 0600 in a 0700 folder."""
    with FileSystems.open(source, compression_type=CompressionTypes.UNCOMPRESSED) as src:
        if _local(target):
            private_dir(Path(target).parent)
            opened = atomic_writer(target)
        else:
            opened = FileSystems.create(target, compression_type=CompressionTypes.UNCOMPRESSED)
        with opened as out:
            shutil.copyfileobj(src, out, 8 << 20)


def _ledger_and_meta(folder: str) -> list[str]:
    meta = FileSystems.join(folder, META)
    return ledger_files(folder) + ([meta] if FileSystems.exists(meta) else [])


def _staged(stage_dir: str, request_id: str) -> tuple[str, str]:
    base = FileSystems.join(stage_dir, request_id, "ledger")
    return FileSystems.join(base, "in"), FileSystems.join(base, "out")


def pipeline_args(work_dir: WorkDir, request_id: str, stage_dir: str | None = None) -> list[str]:
    """``--ledger_in`` (the ledger in force, if any) and an emptied ``--ledger_out`` for this request.

    With ``stage_dir`` (remote workers cannot read the work dir) the ledger in force is copied to
    ``<stage_dir>/<request id>/ledger/in`` and the new one written to ``.../ledger/out``.
    """
    private_dir(root(work_dir))
    pending = _pending(work_dir, request_id)
    shutil.rmtree(pending, ignore_errors=True)  # a crashed run's partial ledger: never read
    found = current(work_dir)
    if not stage_dir:
        return ([f"--ledger_in={found.resolve()}"] if found is not None else []) + [f"--ledger_out={pending}"]
    staged_in, staged_out = _staged(stage_dir, request_id)
    for folder in (staged_in, staged_out):
        stale = _ledger_and_meta(folder)
        if stale:
            FileSystems.delete(stale)
    if found is None:
        return [f"--ledger_out={staged_out}"]
    for path in _ledger_and_meta(str(found.resolve())):
        _copy(path, FileSystems.join(staged_in, os.path.basename(path)))
    return [f"--ledger_in={staged_in}", f"--ledger_out={staged_out}"]


def promote(work_dir: WorkDir, request_id: str, stage_dir: str | None = None, keep_previous: bool = True) -> Path:
    """Swap the request's new ledger in: rename it into place, then replace the ``current`` link atomically.

    A crash before the link swap leaves the previous ledger in force; the older ledger is removed last (and the
    previous one too, without ``keep_previous``: a purge's rows must not live on in it).
    A staged ledger (``stage_dir``) is first copied back into the pending folder.
    """
    base = root(work_dir)
    pending = _pending(work_dir, request_id)
    if stage_dir:
        shutil.rmtree(pending, ignore_errors=True)
        for path in _ledger_and_meta(_staged(stage_dir, request_id)[1]):
            _copy(path, str(pending / path.rsplit("/", 1)[-1]))
    if not (pending / META).is_file():
        raise InputError(f"{pending}: no complete ledger to promote")
    target = base / f"v-{request_id}"
    link = base / CURRENT
    previous = link.resolve() if link.exists() else None
    if target.exists() and target != previous:
        shutil.rmtree(target)
    elif target == previous:  # re-processing the same request: keep a name the link does not point at
        target = base / f"v-{request_id}-{utcnow():%Y%m%dT%H%M%S}"
    os.rename(pending, target)
    os.chmod(target, 0o700)
    tmp = base / f".{CURRENT}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target.name, tmp)
    os.replace(tmp, link)
    fsync_dir(base)
    for old in base.iterdir():  # keep the ledger in force and the one before it
        if old.name.startswith("v-") and old != target and (old != previous or not keep_previous):
            shutil.rmtree(old, ignore_errors=True)
    _LOGGER.info("ledger: %s now in force", target)
    return target


def rewrite_current(work_dir: WorkDir, version: str, change: Callable[[Any], Any], keep_previous: bool = True,
                    key_fingerprint: str | None = None) -> int:
    """A new ledger version of the current one, each part passed through ``change`` (table -> table: a filter, or
    new Consent ids with ``key_fingerprint``, the key they were written under), described and swapped in like a
    run's (:func:`promote`); returns the rows dropped. When nothing changed, nothing is written."""
    found = current(work_dir)
    if found is None:
        return 0
    folder = str(found.resolve())
    meta = read_meta(folder)
    pending, dropped, changed = pending_folder(work_dir, version), 0, False
    for path in ledger_files(folder):  # one part at a time: a 10M-row ledger is never whole in memory
        table = pq.read_table(path)
        new = change(table)
        dropped += table.num_rows - new.num_rows
        changed = changed or not new.equals(table)
        write_part(pending, _name(path), new)
    if not changed and key_fingerprint is None:
        shutil.rmtree(pending)
        return 0
    finish(str(pending), {"request_id": meta.get("request_id"), "checked_at": meta.get("checked_at"),
                          "counts": {"ledger_rows": int(meta.get("rows", 0)) - dropped}}, meta["fhir_base_url"],
           key_fingerprint or meta.get(KEY_FINGERPRINT))
    promote(work_dir, version, keep_previous=keep_previous)
    return dropped


def status_line(work_dir: WorkDir) -> str | None:
    """For ``ndop status``: the ledger's size and its oldest ``checked_at``."""
    found = current(work_dir)
    if found is None:
        return None
    rows, oldest = 0, None
    try:
        for path in ledger_files(str(found.resolve())):
            metadata = pq.ParquetFile(path).metadata
            rows += metadata.num_rows
            index = metadata.schema.to_arrow_schema().get_field_index("checked_at")
            for group in range(metadata.num_row_groups):
                stats = metadata.row_group(group).column(index).statistics
                if stats is not None and stats.has_min_max:
                    oldest = stats.min if oldest is None else min(oldest, stats.min)
    except Exception as err:  # noqa: BLE001 (status must still print the requests)
        return f"ledger {found}: cannot be read ({type(err).__name__})"
    when = oldest.strftime("%Y-%m-%d") if oldest is not None else "-"
    return f"ledger: {rows} patients, oldest checked_at {when} ({found.resolve().name})"


def cli_args(refresh_days: int | None, full_refresh: bool) -> list[str]:
    """What ``--refresh-days``/``--full-refresh`` (and ``NDOP_REFRESH_DAYS``) pass to the pipeline."""
    days = days_setting(refresh_days, REFRESH_ENV, None, whole=True)
    args = [] if days is None else [f"--refresh_days={int(days)}"]
    return args + (["--full_refresh"] if full_refresh else [])


def counts(summary_counts: dict[str, int]) -> dict[str, int]:
    """The ledger's change counts out of a summary's counts (for the run report)."""
    return {key: summary_counts[key] for key in COUNTERS if key in summary_counts}


__all__: Sequence[str] = ("check_ledger", "finish", "pipeline_args", "promote", "status_line", "cli_args", "counts")

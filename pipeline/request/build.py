"""The request step: a cohort in; a validated ``.dat``, its MESH ``.ctl`` and a manifest out.

One invalid number makes NDOP reject the whole file, so nothing invalid is ever written to the
``.dat``; rejects go to ``rejects.csv`` with their source line. The request folder is built under
a dot-name and renamed into place last (what a crash leaves: pipeline/lifecycle/state.py).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.request import datfile
from pipeline.core import nhs
from pipeline.request.cohort import DEFAULT_COLUMN, Cohort, read_cohort
from pipeline.core.errors import InputError
from pipeline.core.faults import fault_point
from pipeline.core.files import atomic_writer, fsync_dir, write_bytes, write_json
from pipeline.core.clock import isoformat, utcnow
from pipeline.lifecycle.state import WorkDir, initial_state

_LOGGER = logging.getLogger(__name__)

NDOP_MAILBOX = "X26HC065"  # POS on live MESH (docs/ndop-and-mesh.md); X26OT154 on INT
WORKFLOW_ID = "SPINE_NTT_UPHOLDING"
MANIFEST = "manifest.parquet"
MANIFEST_NUMBER = "nhs_number"
MANIFEST_PATIENT_ID = "patient_id"  # optional
REJECTS = "rejects.csv"
_MAILBOX = re.compile(r"^[A-Za-z0-9]{3,20}$")


@dataclass
class RequestSettings:
    mailbox: str
    ndop_mailbox: str = NDOP_MAILBOX
    workflow_id: str = WORKFLOW_ID
    line_ending: str = "crlf"
    column: str = DEFAULT_COLUMN
    format: str = "auto"
    patient_id_column: str | None = None


def control_file(*, from_dts: str, to_dts: str, subject: str, local_id: str, workflow_id: str) -> bytes:
    """The MESH client's ``DTSControl`` XML for a data message (fields in docs/ndop-and-mesh.md)."""
    root = ET.Element("DTSControl")
    for tag, text in (
        ("Version", "1.0"),
        ("AddressType", "DTS"),
        ("MessageType", "Data"),
        ("From_DTS", from_dts),
        ("To_DTS", to_dts),
        ("Subject", subject),
        ("LocalId", local_id),
        ("DTSId", ""),
        ("PartnerId", ""),
        ("Compress", "Y"),
        ("Encrypted", "N"),
        ("WorkflowId", workflow_id),
        ("ProcessId", ""),
        ("DataChecksum", ""),
        ("IsCompressed", "N"),
    ):
        ET.SubElement(root, tag).text = text
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def next_sequence(work_dir: WorkDir, mailbox: str, moment: datetime) -> int:
    """The 4-digit monthly sequence: one more than the highest this mailbox used this month."""
    month = moment.strftime("%m%y")
    used = [0]
    for record in work_dir.all():
        stem = Path(record["files"]["dat"]).stem
        parts = stem.rsplit("-", 2)
        if record.get("mailbox", "").upper() == mailbox.upper() and len(parts) == 3 and parts[1][2:] == month:
            used.append(int(parts[2]))
    sequence = max(used) + 1
    if sequence > 9999:
        raise InputError(f"{work_dir.root}: mailbox {mailbox} has used all 9999 request numbers this month")
    return sequence


def build_request(
    cohort_source: str | os.PathLike[str] | Cohort,
    work_dir: WorkDir,
    settings: RequestSettings,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Validate the cohort and write the request folder; return its ``request.json`` record.

    ``cohort_source`` is a file, or a :class:`Cohort` already read (e.g. from the FHIR store).
    """
    if not _MAILBOX.match(settings.mailbox or ""):
        raise InputError(f"mailbox id {settings.mailbox!r} is not a MESH mailbox id (set --mailbox or MESH_MAILBOX)")
    if settings.line_ending not in datfile.LINE_ENDINGS:
        raise InputError(f"line ending {settings.line_ending!r}: use crlf or lf")
    now = now or utcnow()
    if isinstance(cohort_source, Cohort):
        cohort, cohort_path, cohort_name = cohort_source, "FHIR store (Patient search)", cohort_source.format
    else:
        cohort_path, cohort_name = str(cohort_source), Path(cohort_source).name
        cohort = read_cohort(cohort_path, settings.column, settings.format, settings.patient_id_column)
    normalised, reason = nhs.validate_array(cohort.values)

    blank = pc.equal(pc.fill_null(reason, ""), nhs.REASON_BLANK)
    invalid = pc.and_(pc.is_valid(reason), pc.invert(blank))
    valid = pc.filter(normalised, pc.is_null(reason))
    first = nhs.first_indices(valid)
    unique = nhs.unique_in_order(valid)
    manifest = {MANIFEST_NUMBER: unique}
    if cohort.patient_ids is not None:  # an optional column: the Patient id of each number, "" if unknown
        manifest[MANIFEST_PATIENT_ID] = pc.take(pc.filter(cohort.patient_ids, pc.is_null(reason)), first)
    counts = {
        "read": len(cohort.values) - pc.sum(blank).as_py() if len(cohort.values) else 0,
        "blank": pc.sum(blank).as_py() or 0,
        "valid": len(valid),
        "invalid": pc.sum(invalid).as_py() or 0,
        "duplicates": len(valid) - len(unique),
        "sent": len(unique),
    }
    rejects = pa.table({
        "line": pc.filter(cohort.lines, invalid),
        "value": pc.filter(pc.fill_null(cohort.values, ""), invalid),
        "reason": pc.filter(reason, invalid),
    })
    if counts["sent"] == 0:
        examples = "; ".join(
            f"line {line}: {why}"
            for line, why in zip(rejects["line"][:3].to_pylist(), rejects["reason"][:3].to_pylist())
        )
        raise InputError(
            f"{cohort_path}: no valid NHS number in the cohort ({counts['read']} read, {counts['invalid']} invalid"
            + (f"; {examples}" if examples else "")
            + ")"
        )

    with work_dir.lock():
        work_dir.ensure()
        sequence = next_sequence(work_dir, settings.mailbox, now)
        stem = f"{settings.mailbox.upper()}-{now:%d%m%y}-{sequence:04d}"
        local_id = f"NDOP-{stem}-{secrets.token_hex(4)}"
        subject = f"NDOP opt-out check {stem}"
        building = work_dir.requests / f".building-{stem}-{os.getpid()}"
        final = work_dir.request_dir(stem)
        if final.exists():
            raise InputError(f"{final}: request folder already exists")
        building.mkdir(mode=0o700)
        try:
            body = datfile.encode(unique, settings.line_ending)
            write_bytes(building / f"{stem}.dat", body)
            fault_point("request-building")  # the crash tests' killed `ndop request` (pipeline/privacy/purge.py)
            write_bytes(
                building / f"{stem}.ctl",
                control_file(from_dts=settings.mailbox.upper(), to_dts=settings.ndop_mailbox.upper(), subject=subject,
                             local_id=local_id, workflow_id=settings.workflow_id),
            )
            with atomic_writer(building / MANIFEST) as handle:
                # Every number is distinct: dictionary encoding would only cost memory.
                pq.write_table(pa.table(manifest), handle, use_dictionary=False)
            with atomic_writer(building / REJECTS) as handle:
                pacsv.write_csv(rejects, handle)
            record = {
                "request_id": stem,
                "local_id": local_id,
                "subject": subject,
                "created_at": isoformat(now),
                "mailbox": settings.mailbox.upper(),
                "ndop_mailbox": settings.ndop_mailbox.upper(),
                "workflow_id": settings.workflow_id,
                "line_ending": settings.line_ending,
                "cohort": {"name": cohort_name, "format": cohort.format},
                "files": {"dat": f"{stem}.dat", "ctl": f"{stem}.ctl", "manifest": MANIFEST, "rejects": REJECTS},
                "counts": counts,
                "dat_sha256": hashlib.sha256(body).hexdigest(),
                "dat_bytes": len(body),
                **initial_state(now),
            }
            write_json(building / "request.json", record)
            os.rename(building, final)
            fsync_dir(work_dir.requests)
            work_dir.audit_state(record, None)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    _LOGGER.info(
        "request %s: %d read, %d invalid, %d duplicates, %d sent",
        stem, counts["read"], counts["invalid"], counts["duplicates"], counts["sent"],
    )
    return record

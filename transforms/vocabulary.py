"""The words the pipeline's modules share, defined once (a leaf module: it imports none of them).

Consent statuses, the Consent identifier system (the id rule itself: transforms/consent_ids.py), the Beam metrics
namespace and counter names (and which of them ``summary.json`` carries), and the integrity-error dead-letter record.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

OPTED_OUT = "active"  # Consent.status when an opt-out is in force
NOT_OPTED_OUT = "inactive"

IDENTIFIER_SYSTEM = "urn:ndop-sync:consent"

METRICS_NAMESPACE = "ndop"


class Counter:
    """Beam counter names (namespace :data:`METRICS_NAMESPACE`)."""

    REQUESTED = "requested"
    REPLIED = "replied"
    OPTED_OUT = "opted_out"
    NOT_OPTED_OUT = "not_opted_out"
    REPLY_ONLY = "reply_only"
    MANIFEST_ROWS = "manifest_rows"
    MANIFEST_DUPLICATES = "manifest_duplicates"
    REPLY_ROWS = "reply_rows"
    REPLY_DUPLICATES = "reply_duplicates"
    REPLY_BLANK_LINES = "reply_blank_lines"
    REPLY_HEADER_LINES = "reply_header_lines"
    REPLY_BAD_LINES = "reply_bad_lines"
    INTEGRITY_ERRORS = "integrity_errors"
    CONSENTS_BUILT = "consents_built"
    CONSENTS_CREATED = "consents_created"
    CONSENTS_UPDATED = "consents_updated"
    CONSENTS_FAILED = "consents_failed"
    CONSENTS_REFUSED = "consents_refused"
    BUNDLES_POSTED = "bundles_posted"
    DEAD_LETTERS = "dead_letters"
    PROVENANCES_WRITTEN = "provenances_written"
    PROVENANCE_TARGETS = "provenance_targets"
    PROVENANCES_FAILED = "provenances_failed"
    CONSENTS_STAGED = "consents_staged"  # written to NDJSON for a bulk import (not yet stored)
    PROVENANCES_STAGED = "provenances_staged"


# summary.json "counts" key -> the counter it is read from.
SUMMARY_COUNTERS = {
    "requested": Counter.REQUESTED,
    "replied": Counter.REPLIED,
    "opted_out": Counter.OPTED_OUT,
    "not_opted_out": Counter.NOT_OPTED_OUT,
    "created": Counter.CONSENTS_CREATED,
    "updated": Counter.CONSENTS_UPDATED,
    "failed": Counter.CONSENTS_FAILED,
    "refused": Counter.CONSENTS_REFUSED,
    "integrity_errors": Counter.INTEGRITY_ERRORS,
    "reply_only": Counter.REPLY_ONLY,
    "reply_bad_lines": Counter.REPLY_BAD_LINES,
    "manifest_rows": Counter.MANIFEST_ROWS,
    "manifest_duplicates": Counter.MANIFEST_DUPLICATES,
    "reply_rows": Counter.REPLY_ROWS,
    "reply_duplicates": Counter.REPLY_DUPLICATES,
    "reply_blank_lines": Counter.REPLY_BLANK_LINES,
    "reply_header_lines": Counter.REPLY_HEADER_LINES,
    "consents_built": Counter.CONSENTS_BUILT,
    "bundles_posted": Counter.BUNDLES_POSTED,
    "dead_letters": Counter.DEAD_LETTERS,
    "provenances": Counter.PROVENANCES_WRITTEN,
    "provenance_targets": Counter.PROVENANCE_TARGETS,
    "provenances_failed": Counter.PROVENANCES_FAILED,
    "staged": Counter.CONSENTS_STAGED,
    "provenances_staged": Counter.PROVENANCES_STAGED,
}


# The ledger join's counters (transforms.ledger_join): summary.json "changes" key -> counter name.
LEDGER_COUNTERS = {
    "to_write": "ledger_to_write",
    "new_patients": "ledger_new_patients",
    "newly_opted_out": "ledger_newly_opted_out",
    "opt_out_withdrawn": "ledger_opt_out_withdrawn",
    "refreshed": "ledger_refreshed",
    "unchanged": "ledger_unchanged",
    "left_cohort": "ledger_left_cohort",
    "superseded": "ledger_superseded",  # rows holding a newer NDOP answer than this request's: not written
    "ledger_rows": "ledger_rows",
}
SUMMARY_COUNTERS.update(LEDGER_COUNTERS)


def integrity_error(reason: str, nhs_number: str | None = None, consent_id: str | None = None) -> dict[str, Any]:
    """A dead-letter record for something that makes the whole reply suspect."""
    return {"nhs_number": nhs_number, "consent_id": consent_id, "status": None, "reason": reason,
            "at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}

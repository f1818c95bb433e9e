"""What a FHIR server says: the errors we raise, the status of a Bundle entry, an OperationOutcome's text, and
the JSON we send."""
from __future__ import annotations

import json
from typing import Any, Mapping

import requests

from pipeline.core.errors import NdopError

FHIR_JSON = "application/fhir+json"


class FhirError(NdopError):
    """The FHIR server answered with an error we cannot turn into data (e.g. a failed search)."""


class FhirAuthError(FhirError):
    """Credentials missing or refused even after one refresh."""


class FhirUnreachableError(FhirError):
    """The FHIR server stopped answering (connection refused, timeouts on consecutive bundles): writing
    more would only spend every bundle's retries; the run fails and the MESH reply stays unacknowledged."""


def status_code(status: str | int | None) -> int:
    """The number in ``Bundle.entry.response.status``: servers send "201" or "201 Created"."""
    text = str(status or "").strip()
    digits = text.split(" ", 1)[0]
    return int(digits) if digits.isdigit() else 0


def outcome_text(outcome: Mapping[str, Any] | None) -> str:
    """The human part of an OperationOutcome: each issue's diagnostics, else details.text, else code,
    followed by ``(at ELEMENT)`` when the issue names the element that failed (its ``expression``, else
    its ``location``; HAPI's ``Line[1] Col[90]`` positions are left out: they point into our own JSON)."""
    if not outcome:
        return ""
    parts = []
    for issue in outcome.get("issue") or []:
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code") or ""
        if text:
            where = _issue_elements(issue)
            parts.append(f"{text} (at {where})" if where else str(text))
    return "; ".join(parts)


def _issue_elements(issue: Mapping[str, Any]) -> str:
    paths = [str(p) for p in (issue.get("expression") or issue.get("location") or [])
             if p and not str(p).startswith("Line[")]
    return ", ".join(dict.fromkeys(paths))


def response_reason(response: requests.Response) -> str:
    """Why a whole request failed: the OperationOutcome text when the body is one, else the HTTP reason."""
    try:
        body = response.json()
    except ValueError:
        body = None
    text = outcome_text(body) if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome" else ""
    return text or f"HTTP {response.status_code} {response.reason or ''}".strip()


def encode(resource: Mapping[str, Any]) -> bytes:
    """Compact JSON for the wire (no spaces: bundles of 500 Consents are big enough)."""
    return json.dumps(resource, separators=(",", ":"), ensure_ascii=False).encode()


def answer_problem(status: int, body: Any, bundle_type: str, sent: int) -> str | None:
    """Why a bundle's answer does not say, entry by entry, what was stored; None when it does.

    Only a 200 whose body is a ``batch-response`` (``transaction-response`` for a transaction) Bundle with exactly
    one entry per entry sent, each with its own status, counts. A 201, 202 or 204 (a proxy or gateway that
    accepted the request but is not the store), a body that is not such a Bundle, or a short one says nothing of
    what the store holds: the bundle has failed (retried, then dead letters).
    """
    if status != 200:
        return f"HTTP {status} is not a {bundle_type}-response (only a 200 with a Bundle says what was stored)"
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        return "the answer to the bundle is not a FHIR Bundle"
    if body.get("type") != f"{bundle_type}-response":
        return f"the answer is a Bundle of type {body.get('type')!r}, not {bundle_type}-response"
    entries = body.get("entry") or []
    if len(entries) != sent:
        return f"the {bundle_type}-response has {len(entries)} entries for {sent} sent"
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or not status_code((entry.get("response") or {}).get("status")):
            return f"entry {number} of the {bundle_type}-response has no status"
    return None


def read_entries(response_bundle: Mapping[str, Any], count: int) -> list[tuple[int, str]]:
    """(status, reason) per entry of a batch/transaction-response (checked by :func:`answer_problem`), in request
    order."""
    entries = list(response_bundle.get("entry") or [])
    results = []
    for index in range(count):
        response = entries[index].get("response") or {}
        code = status_code(response.get("status"))
        reason = outcome_text(response.get("outcome")) if code >= 300 or code == 0 else ""
        results.append((code, reason or ("" if 200 <= code < 300 else f"HTTP {response.get('status')}")))
    return results

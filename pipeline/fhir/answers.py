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

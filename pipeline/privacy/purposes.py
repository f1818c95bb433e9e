"""The purposes file: which named purposes (projects) may keep patients who opted out, on what legal basis, until when.

The national data opt-out applies to confidential patient information used beyond individual care under section 251
support or COPI regulation 5; it does not apply where the legal basis is another (consent, a legal requirement, an
overriding public interest, anonymised data, COPI regulation 3 notices). Following OpenSAFELY, the exemptions live
in one version-controlled TOML file (``--purposes FILE``, env ``NDOP_PURPOSES_FILE``)::

    [purposes.covid-vaccine-safety]
    legal_basis = "COPI regulation 3"      # one of EXEMPT_BASES to keep opted-out patients
    keep_opted_out = true
    expires = 2027-03-31                   # the last day the exemption holds
    reference = "COPI notice 2020-03"      # who approved it, where it is recorded
    description = "..."

    [purposes.heart-failure-audit]
    legal_basis = "section 251"            # opt-outs apply: listed for the record, keeps nobody
    expires = 2027-12-31

Without ``--purpose`` opt-outs are applied. A purpose not in the file, past its expiry, or claiming to keep
opted-out patients under a basis where opt-outs apply is refused (one line, exit 2).
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass
from datetime import date
from typing import Any

from pipeline.core.errors import InputError

PURPOSES_ENV = "NDOP_PURPOSES_FILE"
APPLY_BASES = ("section 251", "COPI regulation 5")  # opt-outs apply
EXEMPT_BASES = ("consent", "legal requirement", "overriding public interest", "anonymised", "individual care",
                "COPI regulation 3")


@dataclass(frozen=True)
class Purpose:
    name: str
    legal_basis: str
    expires: str  # ISO date
    keep_opted_out: bool
    reference: str = ""
    description: str = ""

    def record(self) -> dict[str, Any]:
        """What the manifest and the audit line say about it."""
        return asdict(self)


def _entry(path: str, name: str, raw: Any) -> Purpose:
    where = f"{path}: purpose {name!r}"
    if not isinstance(raw, dict):
        raise InputError(f"{where}: not a table")
    unknown = set(raw) - {"legal_basis", "keep_opted_out", "expires", "reference", "description"}
    if unknown:
        raise InputError(f"{where}: unknown key {', '.join(sorted(unknown))}")
    basis = raw.get("legal_basis")
    if basis not in APPLY_BASES + EXEMPT_BASES:
        raise InputError(f"{where}: legal_basis must be one of {', '.join(APPLY_BASES + EXEMPT_BASES)}")
    expires = raw.get("expires")
    if not isinstance(expires, date):
        raise InputError(f"{where}: expires must be a date (expires = 2027-03-31)")
    keep = raw.get("keep_opted_out", False)
    if not isinstance(keep, bool):
        raise InputError(f"{where}: keep_opted_out must be true or false")
    if keep and basis in APPLY_BASES:
        raise InputError(f"{where}: opt-outs apply under {basis}: it cannot keep opted-out patients")
    return Purpose(name=name, legal_basis=str(basis), expires=expires.isoformat(), keep_opted_out=keep,
                   reference=str(raw.get("reference", "")), description=str(raw.get("description", "")))


def load(path: str) -> dict[str, Purpose]:
    """Every purpose in the file, checked; a bad file is one line naming it."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as err:
        raise InputError(f"{path}: cannot read the purposes file ({err.strerror or type(err).__name__})") from None
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{path}: not a TOML purposes file ({err})") from None
    table = data.get("purposes")
    if not isinstance(table, dict):
        raise InputError(f"{path}: no [purposes.NAME] tables")
    return {name: _entry(path, name, raw) for name, raw in table.items()}


def choose(name: str | None, path: str | None, today: date) -> Purpose | None:
    """The purpose ``--purpose`` names (None: no purpose, opt-outs apply); refused when unknown or expired."""
    if name is None:
        return None
    path = path or os.environ.get(PURPOSES_ENV) or None
    if not path:
        raise InputError(f"--purpose {name}: no purposes file (give --purposes FILE or set {PURPOSES_ENV})")
    purposes = load(path)
    if name not in purposes:
        raise InputError(f"{path}: no purpose {name!r} (known: {', '.join(sorted(purposes)) or 'none'})")
    purpose = purposes[name]
    if date.fromisoformat(purpose.expires) < today:
        raise InputError(f"{path}: purpose {name!r} expired on {purpose.expires}: renew it in the file first")
    return purpose

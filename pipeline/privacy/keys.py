"""Which Consent id key a command uses (the id rule itself: transforms/consent_ids.py), and ``ndop keygen``.

The key comes from the environment (``NDOP_ID_KEY_FILE``, a 0600 file; or ``NDOP_ID_KEY``; workers may be told
another source with ``NDOP_ID_KEY_SOURCE``), never from a command-line argument, and is never logged: only its
fingerprint is. Without one, a command writing to a FHIR server on this machine (a dev server) makes and keeps the
work dir's own key (``<work dir>/id.key``); against any other server it stops with one line naming ``ndop keygen``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, overload

from pipeline.core.errors import InputError
from pipeline.core.settings import is_loopback_url
from transforms.consent_ids import (
    KEY_FILE_ENV,
    IdKey,
    KeyError_,
    KeySource,
    configured_source,
    open_source,
    write_key_file,
)

_LOGGER = logging.getLogger(__name__)

WORK_DIR_KEY = "id.key"
NO_KEY = (f"no Consent id key: make one with `ndop keygen --out FILE` (keep it safe, 0600) and set "
          f"{KEY_FILE_ENV}=FILE; ids written without a key would give every patient's NHS number away")


@overload
def resolve_key_source(option: str | None, work_dir_root: None, fhir_url: str | None, *, create: bool) -> str: ...
@overload
def resolve_key_source(option: str | None, work_dir_root: Path | None, fhir_url: str | None, *,
                       create: Literal[True]) -> str: ...
@overload
def resolve_key_source(option: str | None, work_dir_root: Path | None, fhir_url: str | None, *,
                       create: bool) -> str | None: ...
def resolve_key_source(option: str | None, work_dir_root: Path | None, fhir_url: str | None, *,
                       create: bool) -> str | None:
    """Which Consent id key source this command uses, the one rule for every command, in this order:

    1. ``option`` (``--id_key_source``), when given;
    2. the environment: ``NDOP_ID_KEY_SOURCE``, else ``NDOP_ID_KEY_FILE``, else ``NDOP_ID_KEY``;
    3. the work dir's own key (``<work dir>/id.key``), only with a work dir and a FHIR server on this machine
       (loopback): made when missing if ``create``; without ``create`` a missing one is None (the command that
       writes will make it);
    4. otherwise one line naming ``ndop keygen`` (exit 2): ids without a key would give the numbers away.

    Only the source is named here; :func:`open_key` reads it.
    """
    spec = option or configured_source()
    if spec:
        return spec
    if fhir_url and work_dir_root is not None and is_loopback_url(fhir_url):
        path = work_dir_root / WORK_DIR_KEY
        if not path.exists():
            if not create:
                return None
            key = write_key_file(path)
            _LOGGER.info("no %s set: made the work dir's own Consent id key %s (fingerprint %s); fine for a FHIR "
                         "server on this machine only", KEY_FILE_ENV, path, key.fingerprint)
        return f"file:{path.resolve()}"
    raise InputError(NO_KEY)


def open_key(spec: str) -> tuple[IdKey, KeySource]:
    """The key and the source workers get; an unreadable key is one line (exit 2)."""
    try:
        return open_source(spec)
    except KeyError_ as err:
        raise InputError(str(err)) from None


def keygen(out: str) -> IdKey:
    """``ndop keygen --out FILE``: a new key in a new 0600 file (an existing file is never overwritten)."""
    path = Path(out)
    if path.exists():
        raise InputError(f"{path}: already exists; a key is never overwritten (a lost key means `ndop rekey`)")
    if not path.parent.is_dir():
        raise InputError(f"{path.parent}: no such folder")
    try:
        return write_key_file(path)
    except OSError as err:
        raise InputError(f"{path}: cannot write the key ({err.strerror})") from None

"""Crash-safe local files: write under a temporary name, fsync, rename.

Every file that holds NHS numbers is created 0600, and nothing half-written ever carries the
final name, so a reader (or the next run) sees either the old file or the whole new one.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from pipeline.core.errors import InputError, NdopError

PRIVATE = 0o600
# What a user can fix in the path they gave (exit 2); anything else (a full disk) is a failure (exit 1).
_BAD_PATH = {errno.ENOENT, errno.ENOTDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG,
             errno.ELOOP, errno.EINVAL}


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: int = PRIVATE) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``path`` only when the block ends without error."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = PRIVATE) -> None:
    with atomic_writer(path, mode) as handle:
        handle.write(data)


def write_json(path: str | os.PathLike[str], obj: Any, mode: int = PRIVATE) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folder_error(path: str | os.PathLike[str], err: OSError, what: str = "folder") -> NdopError:
    """One line for a folder that cannot be made: :class:`InputError` (exit 2) when the path is the problem."""
    cls = InputError if err.errno in _BAD_PATH else NdopError
    return cls(f"{path}: cannot create the {what}: {err.strerror or type(err).__name__}")


def check_folder(path: str | os.PathLike[str], what: str = "folder") -> Path:
    """The one check that ``path`` is a folder, or one this process could create, changing nothing.

    A path through a regular file, under ``/proc``, or without write permission raises one
    :func:`folder_error` line, before any step reads or writes; a folder that does not exist yet but could
    is fine (the steps create it when they first write)."""
    target = Path(path)
    if target.is_dir():
        return target
    if target.exists() or target.is_symlink():
        raise folder_error(path, NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)), what)
    parent = target.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():  # a path through a regular file
        raise folder_error(path, NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)), what)
    try:  # the honest test: make (and remove) a folder where the first missing one would go
        os.rmdir(tempfile.mkdtemp(prefix=".ndop-probe-", dir=parent))
    except OSError as err:
        raise folder_error(path, err, what) from None
    return target


def require_private(path: str | os.PathLike[str], what: str, error: type[Exception] = InputError) -> None:
    """The one check that a secret file is private: no group or other access (0600 or stricter), else ``error``
    (one line naming the file and its mode, never what it holds). An unreadable path raises :class:`OSError`."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise error(f"{path}: a {what} file must be private (chmod 600), it is {oct(mode & 0o777)}")


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and parents) readable by the owner only."""
    target = Path(path)
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    return target

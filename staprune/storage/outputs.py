"""Where commands write: output folders and files checked before any work.

A run that cannot write its results should say so at once, not after an hour of evaluation, and
in words (a read-only disk, a file where a folder should be, a folder where a picture should go).
"""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path

from ..core.errors import ExistingResultsError, OutputError, UsageError


def _reason(err: OSError) -> str:
    if err.errno == errno.EROFS:
        return "the file system is read-only"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if err.errno == errno.ENOSPC:
        return "no space left on the device"
    return err.strerror or str(err)


def writable_dir(path: str | Path, what: str = "--out") -> Path:
    """Check that ``path`` is, or can be created as, a folder files can be written in; nothing is
    left behind (the folder itself is created when the command first writes).

    Raises:
        OutputError: it (or the nearest existing folder above it) is a file, or cannot be written,
            with the reason.
    """
    path = Path(path).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{what} {path}: {existing} is a file; give a folder for the results")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".staprune-write-test-"):
            pass
    except OSError as err:
        raise OutputError(f"cannot write to {what} {path}: {_reason(err)}; choose another folder") from err
    return path


def writable_file(path: str | Path, what: str, suffixes: tuple[str, ...] | None = None, *,
                  replace: bool = False) -> Path:
    """Check that a file can be written at ``path`` (its folder is created), before the work; an
    existing file is replaced only when asked (``replace``: the command's ``--force``).

    Raises:
        OutputError: ``path`` is a folder, or its folder cannot be written.
        UsageError: a suffix outside ``suffixes`` (e.g. ``.txt`` for a picture).
        ExistingResultsError: the file exists and ``replace`` is False.
    """
    path = Path(path).expanduser()
    if path.is_file() and not replace:
        raise ExistingResultsError(f"{what} {path} already exists; pass --force to replace it, or choose another name")
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file name, e.g. {path / ('out' + (suffixes or ('',))[0])}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise UsageError(f"{what} {path}: unknown file type {path.suffix or '(none)'}; use one of {', '.join(suffixes)}")
    writable_dir(path.parent if str(path.parent) else Path("."), f"the folder of {what}")
    return path


def write_error(path: str | Path, err: OSError) -> OutputError:
    """The :class:`OutputError` for a write to ``path`` that failed with ``err``."""
    return OutputError(f"cannot write {path}: {_reason(err)}")


__all__ = ["writable_dir", "writable_file", "write_error"]

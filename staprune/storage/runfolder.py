"""Run folders: the files every long command writes as it goes, written one way.

Nothing is lost and nothing is mixed (docs/usage/commands.md#long-runs):

* **Documents** (``results.json``, ``meta.json``, ``summary.json``, weights) are replaced atomically
  through a temporary file (:func:`atomic_write`), so a reader never sees half of one.
* **Records** are JSON lines, appended and flushed one at a time (:class:`JsonlWriter`,
  :func:`append_jsonl`). A run killed mid-write leaves a torn last line: :func:`read_jsonl` skips
  lines that do not parse, and :func:`repair_tail` cuts the torn line before more are appended.
* **One writer per folder**: a long command holds :class:`RunLock` on its output folder while it
  writes; a second run into the same folder stops at once, naming the run that holds it. The lock
  is the operating system's (a POSIX record lock, ``lockf``), held by the process itself: it ends
  with that process however it ended, and forked decoding workers that outlive it a moment do not
  keep it.
* **Resuming** is allowed only into a folder whose recorded settings are the current ones:
  :func:`check_no_results` refuses a folder with results unless ``--resume`` is given, and
  :func:`differences` names what changed between the stored settings and the current ones.
* **Epoch files** of a fine-tuning run: ``epoch_NNN.safetensors`` (the weights),
  ``epoch_NNN.train.safetensors`` (optimizer state, RNG states) and ``epoch_NNN.train.json`` (the
  recipe and progress, written last). An epoch is complete when all three exist
  (:func:`latest_epoch`); the loader and the fine-tuning command use that one rule.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TextIO

from ..core.errors import BusyError, ExistingResultsError
from .outputs import writable_dir, write_error

_FSYNC_EVERY_S = 10.0
_FSYNC_EVERY_N = 32


# --- documents ------------------------------------------------------------------------------------
def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it over ``path``.

    Raises:
        OutputError: the file cannot be written (with the reason: read-only, no space, ...).
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_error(path, err) from err


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


# --- records --------------------------------------------------------------------------------------
def read_jsonl(paths: Path | Iterable[Path],
               on_bad: Callable[[Path, int, str], None] | None = None) -> Iterator[dict[str, Any]]:
    """The records (JSON objects) of one or more JSON-lines files, in order; files that do not exist
    are skipped, and so are lines that are not a record: the torn last line of a killed run, or a
    damaged one (bytes that are not UTF-8, text that is not JSON), each told to ``on_bad(path,
    line number, reason)`` but the torn last line."""
    for path in [paths] if isinstance(paths, Path) else paths:
        if not path.is_file():
            continue
        with path.open("rb") as f:  # bytes: one damaged line must not stop the others being read
            for number, raw in enumerate(f, start=1):
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    reason = "not UTF-8"
                except json.JSONDecodeError:
                    reason = "not JSON"
                else:
                    if isinstance(record, dict):
                        yield record
                    continue
                if on_bad is not None and raw.endswith(b"\n"):  # no newline: torn by a kill, nothing to tell
                    on_bad(path, number, reason)


def repair_tail(path: Path) -> None:
    """Cut a partial last line (a run killed mid-write) so appended records start on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append one record and make it durable (flush and fsync) before returning."""
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise write_error(path, err) from err


class JsonlWriter:
    """Appends records to one JSON-lines file: each flushed at once, fsynced every few records or
    seconds and on close (many small records: one fsync each would dominate)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.file: TextIO = path.open("a", encoding="utf-8")
        except OSError as err:
            raise write_error(path, err) from err
        self.unsynced, self.last_sync = 0, time.monotonic()

    def write(self, record: Mapping[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.unsynced += 1
        if self.unsynced >= _FSYNC_EVERY_N or time.monotonic() - self.last_sync > _FSYNC_EVERY_S:
            self.sync()

    def sync(self) -> None:
        os.fsync(self.file.fileno())
        self.unsynced, self.last_sync = 0, time.monotonic()

    def close(self) -> None:
        self.sync()
        self.file.close()


# --- one writer per folder ----------------------------------------------------------------------
LOCK_NAME = ".staprune.lock"


class RunLock:
    """Exclusive hold on an output folder for as long as a command writes into it.

    ``with RunLock(folder, "--out", command):`` creates the folder, takes the lock (``folder/.staprune.lock``,
    which records who holds it: process, host, command line, start time) or raises
    :class:`~staprune.core.errors.BusyError` naming the holder. Released on exit, and by the
    operating system when the process ends in any other way. POSIX locks do not exclude the process
    that holds them, so folders held in this process are tracked too. With ``command`` (``eval``,
    ``demo``, ...), a folder another command wrote is refused and the folder is marked as this
    command's (:func:`claim_folder`).
    """

    # Folders this process holds, with what their lock file says (never re-read while held: closing
    # any other descriptor of the file would release the process's lock).
    _held: ClassVar[dict[Path, str]] = {}

    def __init__(self, folder: Path, what: str = "--out", command: str | None = None) -> None:
        self.folder, self.what, self.command = Path(folder), what, command
        self._file = None

    def _busy(self, holder: str) -> BusyError:
        holder = holder or "another process"
        return BusyError(f"{self.what} {self.folder} is being written by another staprune run ({holder}); wait for it "
                         f"to finish or use another {self.what}")

    def __enter__(self) -> RunLock:
        writable_dir(self.folder, self.what)  # a file in the way, a read-only disk: said in words
        key = self.folder.resolve()
        if key in RunLock._held:
            raise self._busy(RunLock._held[key])
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle = (self.folder / LOCK_NAME).open("a+", encoding="utf-8")
        except OSError as err:
            raise write_error(self.folder, err) from err
        try:
            fcntl.lockf(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EACCES or EAGAIN: another process holds it
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise self._busy(holder) from None
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        command = " ".join(["staprune", *sys.argv[1:]])[:200]
        holder = f"pid {os.getpid()} on {socket.gethostname()}, `{command}`, since {started}"
        handle.write(holder + "\n")
        handle.flush()
        RunLock._held[key] = holder
        self._file = handle
        if self.command is not None:
            try:  # checked again now that no other run can write the folder, and marked as the command's
                claim_folder(self.folder, self.command, self.what)
            except BaseException:
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.truncate(0)  # held by no one: the file says nothing (and a refused run leaves it so)
            self._file.close()  # closing releases the process's lock
            self._file = None
            RunLock._held.pop(self.folder.resolve(), None)


# --- one kind of result per folder -----------------------------------------------------------------
KIND_NAME = ".staprune-command"


def _results_document(folder: Path) -> Any:
    try:
        return json.loads((folder / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# How each command's folder looks, for folders written before the marker file existed: eval, demo and
# ablate all write a results.json, each its own shape.
_SIGNS: dict[str, Callable[[Path], bool]] = {
    "eval": lambda f: any(f.glob("*/*/meta.json")) or isinstance(_results_document(f), list),
    "demo": lambda f: isinstance(doc := _results_document(f), dict) and "verdicts" in doc,
    "ablate": lambda f: (f / "rows.jsonl").is_file() or (isinstance(doc := _results_document(f), dict)
                                                          and "default_r" in doc),
    "finetune": lambda f: any(f.glob("epoch_*.train.json")),
}


def folder_kind(folder: Path) -> str | None:
    """The command whose results ``folder`` holds (its marker file, else what its files look like), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    try:
        marked = (folder / KIND_NAME).read_text(encoding="utf-8").strip()
    except OSError:
        marked = ""
    if marked:
        return marked
    return next((kind for kind, looks_like in _SIGNS.items() if looks_like(folder)), None)


def claim_folder(folder: Path, command: str, what: str = "--out") -> None:
    """Refuse ``folder`` when another command's results are in it (their files share names:
    results.json, the plot), and mark it as ``command``'s once it exists.

    Raises:
        ExistingResultsError: naming the command that wrote the folder and the way on.
    """
    folder = Path(folder)
    found = folder_kind(folder)
    if found is not None and found != command:
        raise ExistingResultsError(f"{what} {folder} holds the results of `staprune {found}`; `staprune {command}` "
                                   f"writes a folder of its own: use another {what}")
    if folder.is_dir() and found is None:
        try:
            (folder / KIND_NAME).write_text(command + "\n", encoding="utf-8")
        except OSError as err:
            raise write_error(folder / KIND_NAME, err) from err


# --- resuming -------------------------------------------------------------------------------------
def check_no_results(folder: Path, has_results: bool, resume: bool, what: str) -> None:
    """Refuse to write into ``folder`` when it already holds ``what`` and ``--resume`` was not given.

    Raises:
        ExistingResultsError: naming the folder and both ways on.
    """
    if has_results and not resume:
        raise ExistingResultsError(f"{folder} already holds {what}; pass --resume to continue, or use another --out")


def differences(stored: Mapping[str, Any], current: Mapping[str, Any], keys: Iterable[str] | None = None) -> str:
    """``"key: stored -> current, ..."`` for every key (default: every key of either) whose values
    differ; empty when the two describe the same result."""
    names = sorted(set(stored) | set(current)) if keys is None else list(keys)
    return ", ".join(f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in names if stored.get(k) != current.get(k))


# --- epoch files ----------------------------------------------------------------------------------
_EPOCH_JSON = re.compile(r"^epoch_(\d{3,})\.train\.json$")


@dataclass(frozen=True)
class EpochFiles:
    """The three files of one fine-tuning epoch (see the module docstring)."""

    weights: Path
    train_tensors: Path
    train_json: Path

    @property
    def complete(self) -> bool:
        return self.weights.is_file() and self.train_tensors.is_file() and self.train_json.is_file()


def epoch_files(folder: Path, epoch: int) -> EpochFiles:
    """The files of epoch ``epoch`` (1-based) in a run folder."""
    stem = f"epoch_{epoch:03d}"
    return EpochFiles(folder / f"{stem}.safetensors", folder / f"{stem}.train.safetensors",
                      folder / f"{stem}.train.json")


def training_record_of(weights: Path) -> Path:
    """The ``.train.json`` written beside an epoch's weights file."""
    return weights.with_name(weights.name.removesuffix(".safetensors") + ".train.json")


def latest_epoch(folder: Path) -> int | None:
    """The highest complete epoch of a run folder (its three files exist), or None."""
    if not folder.is_dir():
        return None
    epochs = [int(m.group(1)) for p in folder.iterdir() if (m := _EPOCH_JSON.match(p.name))]
    complete = [e for e in epochs if epoch_files(folder, e).complete]
    return max(complete) if complete else None


__all__ = [
    "KIND_NAME",
    "LOCK_NAME",
    "EpochFiles",
    "JsonlWriter",
    "RunLock",
    "append_jsonl",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "check_no_results",
    "claim_folder",
    "folder_kind",
    "differences",
    "epoch_files",
    "latest_epoch",
    "read_jsonl",
    "repair_tail",
    "training_record_of",
]

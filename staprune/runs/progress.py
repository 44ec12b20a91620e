"""Progress of long loops, with an estimate of the time left: one updating line (tqdm) on a terminal,
a plain line every so often anywhere else (a log file, CI), so a long command is never silent."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def format_duration(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``1.2 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class LineProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` as periodic plain lines: done of total, time so
    far and the time left, at most one line per ``every`` seconds (and, after those, one at the end)."""

    def __init__(self, total: int, desc: str, unit: str, file: TextIO, every: float = 30.0) -> None:
        self.total, self.desc, self.unit, self.file, self.every = total, desc, unit, file, every
        self.done, self.postfix = 0, ""
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line(now)

    def set_postfix(self, values: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in {**(values or {}), **kwargs}.items())

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        eta = f", about {format_duration(left)} left" if self.done and self.done < self.total else ""
        extra = f" ({self.postfix})" if self.postfix else ""
        print(f"{self.desc}: {self.done}/{self.total} {self.unit}s in {format_duration(elapsed)}{eta}{extra}",
              file=self.file, flush=True)

    def close(self) -> None:
        if self.done and self.last != self.start:  # a long loop ends with its total; a short one says nothing
            self._line(time.monotonic())


def progress(total: int, desc: str, unit: str, *, enabled: bool = True, file: TextIO | None = None):
    """A progress reporter for ``total`` steps of ``unit``: tqdm on a terminal, :class:`LineProgress`
    elsewhere, None when ``enabled`` is False (``--quiet``, or not the main process)."""
    if not enabled:
        return None
    file = file or sys.stderr
    if file.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=file, dynamic_ncols=True)
    return LineProgress(total, desc, unit, file)


__all__ = ["LineProgress", "format_duration", "progress"]

"""staprune's own error types: raised where staprune knows what went wrong and how to fix it.

Every one derives from :class:`StapruneError` and from the built-in type a library caller would
expect (``ValueError`` for a bad value, ``TypeError`` for an unsupported model, ...), so code that
catches the built-in keeps working. The command line prints a :class:`StapruneError` as one line
on stderr and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class StapruneError(Exception):
    """A failure the user can fix; its message says what was wrong and how to fix it."""


class ConfigError(StapruneError, ValueError):
    """A pruning option, or a geometry it does not fit (r too large, frames that do not divide)."""


class UsageError(StapruneError, ValueError):
    """A command-line value or a combination of options that cannot work."""


class UnknownOptionError(StapruneError, TypeError):
    """An option name that does not exist."""


class UnsupportedModelError(StapruneError, TypeError):
    """A model no staprune family prunes."""


class UnknownModelError(StapruneError, ValueError):
    """A name that is not in the model registry (the message suggests the closest one)."""


class NotFoundError(StapruneError, FileNotFoundError):
    """A path, model name or hub id that resolves to nothing (a checkpoint, a list, a video folder)."""


class ExistingResultsError(StapruneError, FileExistsError):
    """An output folder that already holds results of another (or the same) run."""


class BusyError(StapruneError, RuntimeError):
    """An output folder another staprune run is writing right now."""


class RankError(StapruneError, RuntimeError):
    """Another process of a torchrun job failed (its own message says why)."""


class CheckpointError(StapruneError, RuntimeError):
    """A checkpoint that cannot be read, or does not match the model it is loaded into."""


class DataError(StapruneError, ValueError):
    """Input that cannot be used: a dataset list or folder, a video, a preprocessor config."""


class OutputError(StapruneError, OSError):
    """An output path that cannot be written."""


__all__ = [
    "BusyError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ExistingResultsError",
    "NotFoundError",
    "RankError",
    "OutputError",
    "StapruneError",
    "UnknownModelError",
    "UnknownOptionError",
    "UnsupportedModelError",
    "UsageError",
]

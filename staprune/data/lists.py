"""Dataset lists: which video files, with which labels.

Two layouts are supported:

* a list file, one video per line: ``path label`` (the VideoMAE release format), ``path,label``, or
  ``path frames label`` (the frame-count column of MMAction-style lists; the count is ignored,
  staprune probes every video itself);
* a folder per class, ``root/<class_name>/<video>.{mp4,avi,webm,mkv,mov}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import DataError, NotFoundError

VIDEO_SUFFIXES: frozenset[str] = frozenset({".mp4", ".avi", ".webm", ".mkv", ".mov"})


@dataclass(frozen=True)
class VideoItem:
    """One labelled video."""

    path: Path
    label: int


def _parse_label(text: str) -> int | None:
    text = text.strip()
    # isdigit() rather than int() so "+3", "-1" and "3.0" count as malformed, not as labels.
    return int(text) if text.isascii() and text.isdigit() else None


def _split_line(line: str, base: Path) -> tuple[str, int] | None:
    fields = line.split()
    # "path frames label": two integer columns after a path, unless "path frames" is itself a
    # file (a two-column line whose path ends in " <digits>").
    if len(fields) == 3 and _parse_label(fields[1]) is not None and _parse_label(fields[2]) is not None:
        if not (base / f"{fields[0]} {fields[1]}").exists():
            return fields[0], int(fields[2])
    # Comma form first: "a.mp4, 3" would otherwise split on the space into ("a.mp4,", 3).
    for parts in (line.rsplit(",", 1), line.rsplit(None, 1)):
        if len(parts) == 2:
            label = _parse_label(parts[1])
            path = parts[0].strip()
            if label is not None and path:
                return path, label
    return None


def read_list(list_file: str | Path, root: str | Path | None = None) -> list[VideoItem]:
    """Parse a VideoMAE-style list file.

    Each non-blank line that does not start with ``#`` is ``<path> <label>`` (split on the LAST
    run of whitespace, so paths may contain spaces), ``<path>,<label>`` or ``<path> <frames>
    <label>``. Relative paths are resolved against ``root`` (default: the list file's directory);
    absolute paths are kept.

    Raises:
        DataError: a malformed line (reported as ``file:line``), or a file that is not UTF-8 text.
        FileNotFoundError: ``list_file`` does not exist.
    """
    list_file = Path(list_file)
    base = Path(root) if root is not None else list_file.parent
    items: list[VideoItem] = []
    # utf-8-sig: lists saved by Windows tools often start with a byte-order mark.
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        line = list_file.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"{list_file}:{line}: not UTF-8 text ({err.reason}); save the list as UTF-8") from err
    except FileNotFoundError as err:
        raise NotFoundError(f"dataset list not found: {list_file}") from err
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parsed = _split_line(line, base)
        if parsed is None:
            raise DataError(
                f"{list_file}:{lineno}: expected '<path> <label>', '<path>,<label>' or '<path> <frames> <label>' "
                f"with a non-negative integer label, got {line!r}"
            )
        path, label = parsed
        items.append(VideoItem(path=base / path, label=label))  # base / absolute == absolute
    return items


def scan_folders(root: str | Path) -> tuple[list[VideoItem], list[str]]:
    """Collect ``root/<class_name>/<video>`` files.

    Every non-hidden subdirectory of ``root`` is a class; classes are sorted by name (plain
    string order) and numbered from 0, so labels are stable across machines. Only files directly
    inside a class folder with a video suffix (case-insensitive) are used, sorted by name.

    Returns:
        (items, class_names) where ``class_names[label]`` names each label.

    Raises:
        ValueError: ``root`` is not a directory or contains no videos.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a directory")
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items = [
        VideoItem(path=file, label=label)
        for label, name in enumerate(class_names)
        for file in sorted((root / name).iterdir())
        if file.is_file() and file.suffix.lower() in VIDEO_SUFFIXES
    ]
    if not items:
        suffixes = ", ".join(sorted(VIDEO_SUFFIXES))
        raise DataError(f"no videos ({suffixes}) found in class folders under {root}")
    return items, class_names


def load_items(data: str | Path, root: str | Path | None = None) -> tuple[list[VideoItem], list[str] | None]:
    """Load a dataset from a list file or a folder-per-class directory.

    Args:
        data: a list file (see ``read_list``) or a directory (see ``scan_folders``).
        root: base directory for relative paths in a list file; ignored for directories.

    Returns:
        (items, class_names); ``class_names`` is None for list files, which carry only indices.
    """
    data = Path(data)
    if data.is_dir():
        return scan_folders(data)
    if data.is_file():
        return read_list(data, root=root), None
    raise NotFoundError(f"dataset list or folder not found: {data}")

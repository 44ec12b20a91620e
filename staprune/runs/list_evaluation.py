"""A pruning setting evaluated on a video list into a run folder: resumable, on one process or many.

Used by ``staprune eval`` (one setting per r of its sweep), ``staprune ablate --data`` (one per row)
and ``staprune finetune --val`` (the trained model at each ``--eval-r``).

Layout: ``OUT/<model>/<setting>/`` (:func:`model_dirname`, :attr:`Setting.dirname`) holds
``meta.json`` (what defines the result: model and a digest of its weights, list and its fingerprint,
setting, views, frames, stride, sampling, size, dtype) and one ``rank<k>.jsonl`` per process with one record per finished
video (path, label, mean softmax scores, top-5, or the error), flushed after every video
(:class:`~staprune.storage.runfolder.JsonlWriter`). With ``resume`` the records of every rank file,
whatever world size wrote them, count as done and only the remaining videos are evaluated; the
metrics always come from the stored per-video top-5, so a resumed run reports what an uninterrupted
one would. Resuming into a folder whose ``meta.json`` differs is refused. Failed videos are recorded
too, so a resumed run does not retry them; to retry, evaluate into a fresh folder.

Multi-process (torchrun): videos are sharded by list index (``rank::world_size``); records are merged
on rank 0, which alone writes ``meta.json`` and fills the metrics of the returned row.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..api.evaluation import gflops_per_view, metrics, score_videos
from ..api.settings import Setting
from ..core.errors import StapruneError, UsageError
from ..data.lists import VideoItem
from ..data.sampling import ViewProtocol
from ..families.base import LoadedModel
from ..storage.outputs import write_error
from ..storage.runfolder import (
    JsonlWriter,
    atomic_write_json,
    check_no_results,
    differences,
    read_jsonl,
    repair_tail,
)
from . import distributed as dist_utils
from .progress import progress


def model_dirname(source: str) -> str:
    """A folder name for one model's runs inside ``--out``: readable, and unique per source (two
    models evaluated into one ``--out`` never share a folder, a results row or a plot line)."""
    name = source.split(":", 1)[-1].split(" (", 1)[0].rstrip("/\\")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name or name)[:40].strip("._") or "model"
    return f"{name}-{hashlib.sha1(source.encode()).hexdigest()[:8]}"


def rank_file(run_dir: Path, rank: int) -> Path:
    """The records file of process ``rank``."""
    return run_dir / f"rank{rank}.jsonl"


def _rank_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("rank*.jsonl"), key=lambda p: (len(p.name), p.name))


def holds_records(out: Path) -> bool:
    """Whether any run folder under ``out`` (``OUT/<model>/<setting>/``) has a record written."""
    return any(p.stat().st_size for p in out.glob("*/*/rank*.jsonl"))


def compact(rec: dict[str, Any]) -> dict[str, Any]:
    """What metrics and merging need from a record (scores stay in the files)."""
    return {"index": int(rec["index"]), "path": rec["path"], "label": int(rec["label"]),
            "top5": rec.get("top5"), "error": rec.get("error"), "short": bool(rec.get("short"))}


_RECORD_FIELDS = ("index", "path", "label")


def read_records(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Compact records of every rank file; the first record of an index wins. A line that is not a
    whole record (torn by a killed run, or anything else) counts as not done: that video runs again."""
    done: dict[int, dict[str, Any]] = {}
    damaged: list[tuple[Path, int, str]] = []
    for rec in read_jsonl(_rank_files(run_dir), on_bad=lambda *where: damaged.append(where)):
        if not all(k in rec for k in _RECORD_FIELDS) or not isinstance(rec["index"], int):
            continue
        if rec.get("error") is None and not isinstance(rec.get("top5"), list):
            continue
        done.setdefault(rec["index"], compact(rec))
    if damaged:
        path, line, reason = damaged[0]
        more = f" (and {len(damaged) - 1} more line(s))" if len(damaged) > 1 else ""
        print(f"staprune: {path}:{line}: a damaged record ({reason}){more} is skipped; its video is evaluated again",
              file=sys.stderr, flush=True)
    return done


def list_fingerprint(items: Sequence[VideoItem]) -> str:
    """SHA-1 of the list's paths and labels, in order: a changed list is a different result."""
    h = hashlib.sha1()
    for it in items:
        h.update(f"{it.path}\t{it.label}\n".encode())
    return h.hexdigest()


def _check_run_dir(run_dir: Path, meta: dict[str, Any], resume: bool) -> None:
    has_records = any(p.stat().st_size > 0 for p in _rank_files(run_dir))
    check_no_results(run_dir, has_records, resume, "results")
    meta_path = run_dir / "meta.json"
    if resume and meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UsageError(f"cannot resume: {meta_path} is damaged ({err}); delete {meta_path.parent} to start "
                             "this run over, or use another --out") from err
        changed = differences(old, meta)
        if changed:
            raise UsageError(f"cannot resume {run_dir}: settings changed ({changed})")


@dataclass
class ListEvaluation:
    """A model, a video list and how to evaluate it; :meth:`evaluate` runs one setting.

    Attributes:
        loaded: the model (moved to ``device`` and ``dtype`` by the caller).
        items: the videos; protocol: the views of each.
        out: the folder runs go into (``OUT/<model>/<setting>/``).
        data: what the list was (recorded in ``meta.json``).
        dtype_name: ``dtype`` as the user named it (recorded).
        batch_size: views per forward pass (across videos); workers: decoding processes.
        resume: continue the runs already in ``out``; quiet: no progress bar.
        info: where this process sits in a torchrun job.
    """

    loaded: LoadedModel
    items: list[VideoItem]
    protocol: ViewProtocol
    out: Path
    data: str
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    dtype_name: str = "fp32"
    batch_size: int = 16
    workers: int = 2
    resume: bool = False
    quiet: bool = False
    info: dist_utils.DistInfo = field(default_factory=dist_utils.DistInfo)

    def log(self, message: str) -> None:
        if self.info.is_main:
            print(f"staprune: {message}", file=sys.stderr)

    def _progress(self, setting: Setting, total: int):
        distributed = f" [rank 0 of {self.info.world_size}]" if self.info.distributed else ""
        return progress(total, f"{setting.label}{distributed}", "video", enabled=not self.quiet and self.info.is_main)

    def row_base(self, setting: Setting) -> dict[str, Any]:
        """The result row of ``setting`` before any video is scored."""
        p = self.protocol
        return {"method": setting.method, "r": setting.r, "dense": setting.is_dense,
                "options": setting.recorded_options, "top1": None,
                "top5": None, "gflops": None, "clips_per_s": None, "videos": 0, "failed": [], "failed_reasons": {},
                "views": f"{p.clips}x{p.crops}", "frames": p.frames, "stride": p.stride, "sampling": p.sampling,
                "model": self.loaded.source, "error": None}

    def run_dir(self, setting: Setting) -> Path:
        return self.out / model_dirname(self.loaded.source) / setting.dirname

    def evaluate(self, setting: Setting) -> dict[str, Any]:
        """Evaluate ``setting`` over the whole list (this rank's shard), resuming if asked.

        Returns the result row on every rank (metrics are filled in on rank 0 only).
        """
        info, row = self.info, self.row_base(setting)
        setting.apply(self.loaded.model)
        run_dir = self.run_dir(setting)
        row["run_dir"] = str(run_dir.relative_to(self.out))
        p = self.protocol
        meta = {"model": self.loaded.source, "model_digest": self.loaded.digest(), "data": self.data, "videos": len(self.items),
                "list_sha1": list_fingerprint(self.items), "method": setting.method, "r": setting.r,
                "options": row["options"], "views": row["views"], "frames": p.frames, "stride": p.stride,
                "sampling": p.sampling, "size": self.loaded.preprocessing.size, "dtype": self.dtype_name}
        error: BaseException | None = None
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            _check_run_dir(run_dir, meta, self.resume)
        except StapruneError as e:  # (before OSError: ExistingResultsError is a FileExistsError)
            error = e
        except OSError as e:
            error = write_error(run_dir, e)
        dist_utils.raise_if_any(info, error)
        dist_utils.barrier(info)  # everyone has read meta.json before rank 0 rewrites it
        if info.is_main:
            atomic_write_json(run_dir / "meta.json", meta)
        own = rank_file(run_dir, info.rank)
        repair_tail(own)
        dist_utils.barrier(info)

        # Every rank may see different files (no shared filesystem): union what all of them read.
        done: dict[int, dict[str, Any]] = {}
        for part in dist_utils.all_gather(info, read_records(run_dir) if self.resume else {}):
            for index, rec in part.items():
                done.setdefault(index, rec)
        for index, rec in done.items():
            if index >= len(self.items) or rec["path"] != str(self.items[index].path):
                raise UsageError(f"{run_dir}: record {index} ({rec['path']}) does not match the list; "
                                 "the list changed since these results were written")
        todo = [i for i in range(len(self.items)) if i not in done]
        mine = dist_utils.shard(todo, info)
        if info.is_main and done:
            self.log(f"{row['run_dir']}: resuming, {len(done)} of {len(self.items)} videos already done")

        gflops = gflops_per_view(self.loaded, setting, p) if info.is_main else None
        new: list[dict[str, Any]] = []
        writer = JsonlWriter(own)
        progress = self._progress(setting, len(mine))
        start = time.perf_counter()

        def on_record(rec: dict[str, Any]) -> None:
            writer.write(rec)
            new.append(compact(rec))

        stats, error = None, None
        try:
            stats = score_videos(self.loaded, [(i, self.items[i]) for i in mine], p, batch_size=self.batch_size,
                                 workers=self.workers, device=self.device, dtype=self.dtype, on_record=on_record,
                                 progress=progress)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank just below (no rank left waiting)
            error = e
        finally:
            writer.close()
            if progress is not None:
                progress.close()
        dist_utils.raise_if_any(info, error)
        wall = time.perf_counter() - start

        gathered = dist_utils.all_gather(info, (new, stats.clips, stats.forward_s))
        if not info.is_main:
            return row
        for records, _, _ in gathered:
            for rec in records:
                done.setdefault(rec["index"], rec)
        missing = [i for i in range(len(self.items)) if i not in done]
        if missing:
            raise RuntimeError(f"{len(missing)} videos have no result after evaluation (first: {missing[0]})")
        row.update(metrics([done[i] for i in range(len(self.items))]))
        row["gflops"] = gflops
        rates = [clips / secs for _, clips, secs in gathered if clips and secs > 0]
        row["clips_per_s"] = sum(rates) if rates else None  # ranks run side by side: rates add up
        row["wall_s"] = wall
        return row


__all__ = ["ListEvaluation", "compact", "holds_records", "list_fingerprint", "model_dirname", "rank_file", "read_records"]

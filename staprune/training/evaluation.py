"""Top-1 of a trained model at the end of fine-tuning: on clips in memory (sharded over ranks), or
on a video list through the resumable run-folder evaluation (``staprune eval``'s loop)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..api.evaluation import check_compatible, resolve_protocol, score_clips
from ..api.settings import Setting
from ..data.clips import ClipTensorSet
from ..data.lists import load_items
from ..families import LoadedModel
from ..runs import distributed as dist_utils
from ..runs.list_evaluation import ListEvaluation


def eval_entries(method: str, train_r: int | None, eval_r: Sequence[int] | None,
                 schedule: bool = False) -> list[tuple[str, int]]:
    """(method, r) pairs for the final evaluation; r=0 is dense. Under an explicit ``schedule`` (it
    gives every stage's r) the one entry is the trained setting, as ``(method, 0)``."""
    if schedule and method != "none":
        return [(method, 0)]
    rs = list(eval_r) if eval_r else [train_r if method != "none" and train_r else 0]
    pruned = "sta" if method == "none" else method
    return [("none", 0) if r == 0 else (pruned, r) for r in dict.fromkeys(rs)]


def _setting(method: str, r: int, options: dict[str, Any] | None) -> Setting:
    return Setting.of(method, r, options if method != "none" else None)


def top1_on_clips(
    loaded: LoadedModel,
    setting: Setting,
    data: ClipTensorSet,
    info: dist_utils.DistInfo,
    batch: int,
    autocast: torch.dtype | None,
) -> float:
    """Top-1 (percent) of ``loaded`` under ``setting`` over all clips of ``data`` (uint8
    ``(N, T, 3, H, W)``), each rank scoring its :meth:`~staprune.data.clips.ClipTensorSet.shard`,
    the correct counts summed over ranks."""
    mine = data.shard(info.rank, info.world_size)
    scores = score_clips(loaded, mine.clips, mine.labels, (setting,), batch_size=batch, autocast=autocast)[setting]
    return 100.0 * sum(dist_utils.all_gather(info, scores.correct1)) / max(1, len(data))


def evaluate_clips(
    loaded: LoadedModel,
    entries: Sequence[tuple[str, int]],
    options: dict[str, Any] | None,
    data: ClipTensorSet,
    info: dist_utils.DistInfo,
    batch: int,
    autocast: torch.dtype | None,
) -> list[dict[str, Any]]:
    """One row ``{method, r, top1, videos}`` per entry of :func:`eval_entries`, on clips in memory."""
    return [
        {"method": method, "r": r, "top1": top1_on_clips(loaded, _setting(method, r, options), data, info, batch,
                                                          autocast), "videos": len(data)}
        for method, r in entries
    ]


def evaluate_list(
    loaded: LoadedModel,
    val: str | Path,
    root: str | None,
    entries: Sequence[tuple[str, int]],
    options: dict[str, Any] | None,
    info: dist_utils.DistInfo,
    device: torch.device,
    out: Path,
    *,
    dataset: str = "k400",
    views: str | None = None,
    frames: int | None = None,
    batch_size: int = 16,
    workers: int = 2,
    quiet: bool = False,
) -> list[dict[str, Any]]:
    """Evaluate the list ``val`` with the multi-view protocol of ``dataset`` (``views`` CLIPSxCROPS,
    ``frames``: None for the protocol's), into resumable run folders under ``out``; one
    :class:`~staprune.runs.list_evaluation.ListEvaluation` row per entry (``top1``, ``videos``, ``error``, ...)."""
    proto = resolve_protocol(loaded.protocol(dataset), views, frames, None)
    items, _ = load_items(val, root)
    check_compatible(loaded, proto, items)
    loaded.model.eval()
    evaluation = ListEvaluation(loaded, items, proto, out, str(val), device, batch_size=batch_size,
                                workers=workers, resume=True, quiet=quiet, info=info)
    return [evaluation.evaluate(_setting(m, r, options)) for m, r in entries]


__all__ = ["eval_entries", "evaluate_clips", "evaluate_list", "top1_on_clips"]

"""Evaluation as functions: top-1 / top-5 of a model under pruning settings, on video files or on
clips in memory. ``staprune eval``, ``ablate``, ``finetune`` and ``demo`` all score through here.

* :func:`score_videos`: the multi-view protocol on decoded video files (docs/algorithm/evaluation.md):
  each video gives ``clips x crops`` views (:meth:`ViewProtocol.clip_indices`,
  :meth:`Preprocessing.views`); its score is the **mean over its views of the softmax of each view's
  logits** (VideoMAE's test-time merge). One record per video goes to a callback as soon as the
  video is scored, so the caller can store it (resumable runs: :mod:`staprune.runs.list_evaluation`).
* :func:`score_clips`: clips held in memory (the demo's generated clips), every setting over the
  same batches in turn, so the forward times of the settings are measured side by side.
* :func:`metrics`: top-1 / top-5 in percent over the videos that could be read.

A video that is missing, cannot be decoded or has no frames is recorded with its error and left
out of the accuracy; a video shorter than a clip's span is not a failure: the sampling clamps
indices to the last frame (the protocol's rule), so frames repeat.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..adapters.state import get_config, kept_tokens
from ..core.errors import UsageError
from ..core.flops import flop_counter
from ..data.lists import VideoItem
from ..data.sampling import ViewProtocol, parse_views
from ..data.transforms import Preprocessing
from ..data.video import VideoReadError, probe, read_frames
from ..data.workers import decoding_loader, loading
from ..families.base import LoadedModel
from .flops import analytic_flops
from .settings import Setting

SLEEP_ENV = "STAPRUNE_EVAL_SLEEP"  # testing hook: seconds to sleep after each video (kill-and-resume tests)


# --- protocol -------------------------------------------------------------------------------------
def resolve_protocol(base: ViewProtocol, views: str | None, frames: int | None,
                     stride: int | None) -> ViewProtocol:
    """A model's protocol for a dataset (:meth:`LoadedModel.protocol`) with the views, frames or stride
    the user asked for (None keeps the protocol's)."""
    clips, crops = parse_views(views) if views else (base.clips, base.crops)
    for name, value in (("frames", frames), ("stride", stride)):
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be positive, got {value}")
    return ViewProtocol(clips, crops, frames or base.frames, stride or base.stride, base.sampling)


def check_compatible(loaded: LoadedModel, proto: ViewProtocol, items: Sequence[VideoItem]) -> None:
    """Model/data mismatches that must stop the run before any video is decoded.

    Raises:
        ValueError: no videos; a label outside the classifier; clip length the model cannot take.
    """
    if not items:
        raise UsageError("the dataset list is empty")
    bad = [it for it in items if it.label >= loaded.num_classes]
    if bad:
        shown = ", ".join(f"{it.path.name}:{it.label}" for it in bad[:5])
        raise UsageError(
            f"{len(bad)} video(s) have a label >= the model's {loaded.num_classes} classes ({shown}); "
            "wrong model for this dataset, or labels not 0-based?"
        )
    if loaded.frames is not None and proto.frames != loaded.frames:
        raise UsageError(
            f"the model takes {loaded.frames}-frame clips but the protocol asks for {proto.frames}; "
            f"pass --frames {loaded.frames}"
        )


# --- decoding ---------------------------------------------------------------------------------------
def clip_frame_indices(proto: ViewProtocol, num_frames: int) -> list[list[int]]:
    """Frame indices of each clip of a ``num_frames``-frame video, as :func:`video_views` decodes them.

    The protocol's rule (uniform clips or SSV2 segments); indices past the end are clamped to the
    last frame, so short videos repeat frames instead of failing.
    """
    return proto.clip_indices(num_frames)


def video_views(path: Path, proto: ViewProtocol, prep: Preprocessing) -> torch.Tensor:
    """All views of one video, clip-major: float32 (clips * crops, frames, 3, size, size).

    View ``c * crops + k`` is clip ``c``, crop ``k``. The clips' frames are decoded in one pass
    (``read_frames`` takes any index order). Raises VideoReadError for missing/undecodable/empty videos.
    """
    return _views_and_length(path, proto, prep)[0]


def clip_span(proto: ViewProtocol) -> int:
    """Frames one clip covers: ``(frames - 1) * stride + 1`` for uniform clips, ``frames`` for segments."""
    return proto.frames if proto.sampling == "segment" else (proto.frames - 1) * proto.stride + 1


def _views_and_length(path: Path, proto: ViewProtocol, prep: Preprocessing) -> tuple[torch.Tensor, int]:
    num_frames = probe(path).num_frames
    clips = clip_frame_indices(proto, num_frames)
    frames = read_frames(path, [i for clip in clips for i in clip])
    return torch.cat([prep.views(part, proto.crops) for part in frames.split(proto.frames)]), num_frames


class VideoViewsDataset(Dataset):
    """Item ``k``: ``{"index", "path", "label", "views" | None, "error" | None}`` for ``videos[k]``.

    ``videos`` is a list of (global list index, item). Decoding errors become ``error`` strings so
    one bad file never stops the DataLoader.
    """

    def __init__(self, videos: Sequence[tuple[int, VideoItem]], proto: ViewProtocol, prep: Preprocessing):
        self.videos, self.proto, self.prep = list(videos), proto, prep

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, k: int) -> dict[str, Any]:
        index, item = self.videos[k]
        sample: dict[str, Any] = {"index": index, "path": str(item.path), "label": item.label,
                                  "views": None, "error": None, "short": False}
        try:
            sample["views"], num_frames = _views_and_length(item.path, self.proto, self.prep)
            sample["short"] = num_frames < clip_span(self.proto)  # its last frame repeats (the protocol's rule)
        except VideoReadError as e:
            sample["error"] = e.reason
        return sample


# --- scoring videos -------------------------------------------------------------------------------
@dataclass
class _Pending:
    """A video whose views are being scored, possibly across several batches."""

    sample: dict[str, Any]
    views: torch.Tensor
    taken: int = 0
    probs: list[torch.Tensor] = field(default_factory=list)
    kept: Any = field(default_factory=hashlib.sha1)  # digest of its views' kept token indices
    pruned: bool = False

    @property
    def scored(self) -> int:
        return sum(p.shape[0] for p in self.probs)


def finish_video(sample: dict[str, Any], probs: torch.Tensor, kept: str | None = None) -> dict[str, Any]:
    """Full record from per-view softmax probabilities (V, C): mean over views, its top-5, and a
    fingerprint of the tokens the pruned model kept in its views (``kept``, None when dense)."""
    scores = probs.mean(dim=0)
    top = scores.topk(min(5, scores.numel())).indices.tolist()
    return {"index": sample["index"], "path": sample["path"], "label": sample["label"],
            "views": int(probs.shape[0]), "top5": top, "scores": scores.tolist(), "short": bool(sample.get("short")),
            "kept_sha1": kept}


@dataclass
class LoopStats:
    """What one rank did in this session."""

    clips: int = 0
    forward_s: float = 0.0
    correct: int = 0
    scored: int = 0


def score_videos(
    loaded: LoadedModel,
    videos: Sequence[tuple[int, VideoItem]],
    proto: ViewProtocol,
    *,
    batch_size: int,
    workers: int,
    device: torch.device,
    dtype: torch.dtype,
    on_record,
    progress=None,
) -> LoopStats:
    """Score ``videos`` (global index, item), calling ``on_record(record)`` once per video in the
    order videos finish. Views of consecutive videos share forward passes of up to ``batch_size``.
    """
    stats = LoopStats()
    loader = decoding_loader(
        VideoViewsDataset(videos, proto, loaded.preprocessing),
        workers,
        batch_size=None,  # one item = one video's views; batching across videos happens below
        pin_memory=device.type == "cuda",
    )
    pending: list[_Pending] = []
    sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)

    def emit(rec: dict[str, Any]) -> None:
        on_record(rec)
        if rec.get("error") is None:
            stats.scored += 1
            stats.correct += int(rec["top5"][0] == rec["label"])
        if progress is not None:
            progress.update(1)
            if stats.scored:
                progress.set_postfix(top1=f"{100.0 * stats.correct / stats.scored:.2f}")
        if sleep > 0:
            time.sleep(sleep)

    def run_batch(size: int) -> None:
        parts, owners = [], []
        for video in pending:
            take = min(size - sum(n for _, n in owners), video.views.shape[0] - video.taken)
            if take <= 0:
                continue
            parts.append(video.views[video.taken : video.taken + take])
            owners.append((video, take))
            video.taken += take
            if sum(n for _, n in owners) == size:
                break
        x = torch.cat(parts).to(device=device, dtype=dtype, non_blocking=True)
        start = time.perf_counter()
        with torch.inference_mode():
            probs = loaded.logits(x).float().softmax(dim=-1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats.forward_s += time.perf_counter() - start
        stats.clips += x.shape[0]
        kept = [k.cpu() for k in kept_tokens(loaded.model)] if get_config(loaded.model) is not None else []
        offset = 0
        for (video, n), chunk in zip(owners, probs.cpu().split([n for _, n in owners]), strict=True):
            video.probs.append(chunk)
            for stage in kept:
                video.kept.update(stage[offset : offset + n].numpy().tobytes())
            video.pruned |= bool(kept)
            offset += n
        while pending and pending[0].scored == pending[0].views.shape[0]:
            done = pending.pop(0)
            emit(finish_video(done.sample, torch.cat(done.probs), done.kept.hexdigest()[:16] if done.pruned else None))

    buffered = 0
    with loading(loader) as samples:
        for sample in samples:
            views = sample.pop("views")
            if views is None:
                emit(sample)
                continue
            pending.append(_Pending(sample, views))
            buffered += views.shape[0]
            while buffered >= batch_size:
                run_batch(batch_size)
                buffered -= batch_size
    while buffered > 0:
        n = min(batch_size, buffered)
        run_batch(n)
        buffered -= n
    return stats


# --- metrics, FLOPs ---------------------------------------------------------------------------------
def metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """top-1 / top-5 in percent over readable videos, plus the failed ones."""
    ok = [r for r in records if r.get("error") is None]
    failed = [r for r in records if r.get("error") is not None]
    n = len(ok)
    return {
        "top1": 100.0 * sum(r["top5"][0] == r["label"] for r in ok) / n if n else None,
        "top5": 100.0 * sum(r["label"] in r["top5"] for r in ok) / n if n else None,
        "videos": n,
        "failed": [r["path"] for r in failed],
        "failed_reasons": {r["path"]: r["error"] for r in failed},
        "short_videos": sum(bool(r.get("short")) for r in ok),
    }


def gflops_per_view(loaded: LoadedModel, setting: Setting, proto: ViewProtocol) -> float | None:
    """Backbone GFLOPs of one view (1 multiply-add = 1 FLOP): :func:`staprune.analytic_flops`, else
    ``FlopCounterMode`` on one random view of the (patched) model, halved."""
    size = loaded.preprocessing.size
    try:
        return float(analytic_flops(loaded.model, frames=proto.frames, size=size, config=setting.config()).gflops)
    except Exception as e:  # noqa: BLE001 - analytic counting is best-effort; measure instead
        print(f"staprune: analytic FLOPs unavailable ({type(e).__name__}: {e}); measuring", file=sys.stderr)
    param = next(loaded.model.parameters())
    x = torch.randn(1, proto.frames, 3, size, size, device=param.device, dtype=param.dtype)
    counter = flop_counter(display=False)
    try:
        with torch.inference_mode(), counter:
            loaded.logits(x)  # views in, the family puts them in the model's layout
    except Exception as e:  # noqa: BLE001 - a FLOP figure must never sink an accuracy run
        print(f"staprune: could not measure FLOPs ({e})", file=sys.stderr)
        return None
    return counter.get_total_flops() / 2 / 1e9


# --- scoring clips in memory ----------------------------------------------------------------------
@dataclass
class ClipScores:
    """What one setting did over clips in memory.

    Attributes:
        correct1, correct5: clips whose label is the top-1 / among the top-5.
        clips: clips scored; views: views per clip; forward_s: seconds in the model's forward.
        hits: per clip, in order, whether its label is the top-1 (for paired comparisons).
    """

    correct1: int = 0
    correct5: int = 0
    clips: int = 0
    views: int = 1
    forward_s: float = 0.0
    hits: list[bool] = field(default_factory=list)

    @property
    def top1(self) -> float:
        """Top-1 in percent."""
        return 100.0 * self.correct1 / max(1, self.clips)

    @property
    def top5(self) -> float:
        """Top-5 in percent."""
        return 100.0 * self.correct5 / max(1, self.clips)

    @property
    def top1_se(self) -> float:
        """Standard error of :attr:`top1` (binomial), in percentage points."""
        p = self.correct1 / max(1, self.clips)
        return 100.0 * (p * (1 - p) / max(1, self.clips)) ** 0.5

    @property
    def clips_per_s(self) -> float:
        """Views per second of forward time."""
        return self.clips * self.views / self.forward_s if self.forward_s > 0 else float("nan")


def paired_difference(a: ClipScores, b: ClipScores) -> tuple[float, float]:
    """Top-1 of ``a`` minus top-1 of ``b`` on the same clips, and the standard error of that
    difference (paired: the clips both get right or wrong cancel), both in percentage points."""
    if len(a.hits) != len(b.hits) or not a.hits:
        raise ValueError("a paired difference needs the same clips, in the same order, for both")
    diffs = torch.tensor(a.hits, dtype=torch.float64) - torch.tensor(b.hits, dtype=torch.float64)
    se = diffs.std(unbiased=True).item() / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return 100.0 * diffs.mean().item(), 100.0 * se


def score_clips(
    loaded: LoadedModel,
    clips: Tensor,
    labels: Tensor,
    settings: Sequence[Setting] = (Setting(),),
    *,
    batch_size: int = 16,
    windows: Tensor | None = None,
    autocast: torch.dtype | None = None,
    warmup: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> dict[Setting, ClipScores]:
    """Top-1 / top-5 of ``loaded.model`` under every setting, on clips held in memory.

    Batches run in order; every setting runs each batch in turn (patched between forwards, outside
    the timed region), so their forward times are measured side by side under the same load.
    A clip's score is its views' mean softmax; with one view the top-k are the logits' own.

    Args:
        clips: uint8 pixels ``(N, T, 3, H, W)``, normalised with ``loaded.preprocessing``.
        labels: ``(N,)`` class indices.
        windows: ``(V, frames)`` frame indices of each view (None: one view of all ``T`` frames).
        autocast: run the forward under autocast to this dtype (None: the model's own dtype).
        warmup: run one untimed forward of the first setting first (first calls allocate and pick
            kernels).
        on_batch: called with the number of clips done after every batch.
    Returns:
        setting -> :class:`ClipScores`; the model is left patched with the last setting.
    """
    model = loaded.model
    param = next(model.parameters())
    views = [torch.arange(clips.shape[1])] if windows is None else list(windows)
    scores = {s: ClipScores(views=len(views)) for s in settings}
    prep = loaded.preprocessing

    def forward(x: Tensor) -> Tensor:
        with torch.autocast(param.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            return loaded.family.logits(model(x)).float()

    def inputs(chunk: Tensor) -> list[Tensor]:
        return [loaded.to_input(prep.normalize_pixels(chunk[:, view])).to(param.device, param.dtype) for view in views]

    model.eval()
    with torch.inference_mode():
        if warmup and len(clips):
            settings[0].apply(model)
            forward(inputs(clips[:batch_size])[0])
        for start in range(0, len(labels), batch_size):
            xs, y = inputs(clips[start:start + batch_size]), labels[start:start + batch_size].to(param.device)
            for setting in settings:
                if len(settings) > 1 or start == 0:
                    setting.apply(model)
                merged = None
                for x in xs:
                    tick = time.perf_counter()
                    logits = forward(x)
                    scores[setting].forward_s += time.perf_counter() - tick
                    merged = logits if len(xs) == 1 else (logits.softmax(-1) if merged is None else merged + logits.softmax(-1))
                top = merged.topk(min(5, merged.shape[-1]), dim=-1).indices
                scores[setting].hits += (top[:, 0] == y).tolist()
                scores[setting].correct1 += int((top[:, 0] == y).sum())
                scores[setting].correct5 += int((top == y[:, None]).any(-1).sum())
                scores[setting].clips += len(y)
            if on_batch is not None:
                on_batch(min(start + batch_size, len(labels)))
    return scores


__all__ = [
    "SLEEP_ENV",
    "ClipScores",
    "VideoViewsDataset",
    "check_compatible",
    "clip_frame_indices",
    "clip_span",
    "finish_video",
    "gflops_per_view",
    "metrics",
    "paired_difference",
    "resolve_protocol",
    "score_clips",
    "score_videos",
    "video_views",
]

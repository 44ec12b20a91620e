"""``staprune eval``: multi-view video classification accuracy, dense or pruned, resumable, on one
process or many (``torchrun --nproc-per-node N -m staprune eval ...``).

Protocol (DESIGN.md "Evaluation protocol"): each video gives ``clips x crops`` views; frame indices
come from :meth:`ViewProtocol.clip_indices` (uniform clips for Kinetics, segment sampling for SSV2);
crops from :meth:`Preprocessing.views`. The score of a video is the **mean over its views of the
softmax of each view's logits** (VideoMAE's test-time merge); top-1 / top-5 are computed from that
mean and reported in percent over the videos that could be read.

Failures: a video that is missing, cannot be decoded or has no frames is listed in ``failed`` and
excluded from the accuracy; the run goes on. A video shorter than a clip's span is NOT a failure:
the sampling functions clamp indices to the last frame (the protocol's behaviour), so frames repeat.

Nothing is lost: each rank appends one JSON line per finished video to
``OUT/<method>_r<R>/rank<k>.jsonl`` (path, label, mean softmax scores, top-5, or the error), flushed
after every video and fsynced periodically. ``--resume`` reads every rank file of that (method, r),
whatever world size wrote it, and evaluates only the remaining videos; metrics are always computed
from the stored per-video top-5, so a resumed run reports what an uninterrupted one would.

Multi-process: ``torchrun --nproc-per-node N -m staprune eval ... --rs 64`` (torchrun's argument
parser rejects ``--r`` as ambiguous, so use the ``--rs`` spelling there). Videos are sharded by list
index (``rank::world_size``), results are merged on rank 0, which alone prints and writes.

Failed videos are recorded too, so ``--resume`` does not retry them (a resumed run reports what an
uninterrupted one would); to retry, evaluate into a fresh ``--out``.

Testing hook: ``STAPRUNE_EVAL_SLEEP=<seconds>`` sleeps after each finished video (used by the
kill-and-resume test to make a run slow enough to interrupt); never set it otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch.utils.data import DataLoader, Dataset

from ..adapters.state import get_config, kept_tokens
from ..api.loading import load
from ..core.config import STAConfig
from ..core.errors import ExistingResultsError, StapruneError, UsageError
from ..data.lists import VideoItem, load_items
from ..data.sampling import ViewProtocol, parse_views
from ..data.transforms import Preprocessing
from ..data.video import VideoReadError, probe, read_frames
from ..families.base import LoadedModel
from ..runs import distributed as dist_utils
from ..runs.arguments import add_pruning_arguments, check_pruning_options, pruning_options, recorded
from ..runs.devices import resolve_device
from ..storage.outputs import atomic_write_text, writable_dir, write_error

SLEEP_ENV = "STAPRUNE_EVAL_SLEEP"
METHODS = ("sta", "random", "tome", "none")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_FSYNC_EVERY_S = 10.0
_FSYNC_EVERY_N = 32


# --- CLI ----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``staprune eval`` (see the module docstring for the protocol)."""
    parser.add_argument("--model",
                        help="HF VideoMAE directory or hub id; VideoMAE release .pth; swin3d_t|s|b[:WEIGHTS]; "
                        "demo-vit|demo-swin; or a registry name (ViT-B, VideoSwin-T, ...: random weights). "
                        "Without --model and --data: runs `staprune demo`")
    parser.add_argument("--weights", help="weights file for a torchvision Swin3D name")
    parser.add_argument("--data", help="list file ('path label' lines) or folder per class")
    parser.add_argument("--root", help="base directory of relative paths in the list (default: its folder)")
    parser.add_argument("--dataset", default="k400", choices=("k400", "ssv2"), help="selects the view protocol")
    parser.add_argument("--method", default="sta", choices=METHODS, help="pruning method (none = dense)")
    # --rs: under torchrun, torchrun's own parser rejects "--r" as an ambiguous abbreviation of its
    # --rdzv-*/--role/--run-path options before our CLI ever sees it.
    parser.add_argument("--r", "--rs", dest="r", type=int, nargs="+", metavar="R",
                        help="tokens dropped per unit (ViT) / r1 (Swin); several values = a sweep (spell it --rs "
                        "under torchrun); default: the model's three levels")
    parser.add_argument("--views", help="CLIPSxCROPS (default: the protocol's, e.g. 5x3 for ViT on K400)")
    parser.add_argument("--frames", type=int, help="frames per clip (default: the protocol's)")
    parser.add_argument("--stride", type=int, help="temporal stride of uniform clips (default: the protocol's)")
    parser.add_argument("--image-size", type=int,
                        help="input side for VideoMAE release .pth and registry models (default 224)")
    parser.add_argument("--batch-size", type=int, default=16, help="views per forward pass (across videos)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes decoding videos")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    parser.add_argument("--out", default="eval-results", help="directory for per-video records and results")
    parser.add_argument("--resume", action="store_true", help="skip videos already recorded in --out")
    parser.add_argument("--json", action="store_true", help="print results as JSON to stdout (logs to stderr)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_pruning_arguments(parser)


@dataclass(frozen=True)
class Entry:
    """One point of a sweep: (method, r) and the other STAConfig fields set (``options``)."""

    method: str
    r: int
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def dense(self) -> bool:
        return self.method == "none" or (self.r == 0 and self.method != "tome")

    @property
    def dirname(self) -> str:
        """``<method>_r<r>``, then each option set, so that configurations never share a folder."""
        parts = [f"{self.method}_r{self.r}"]
        for key, value in sorted(self.options):
            text = "-".join(f"{u}x{r}" for u, r in value) if key == "schedule" and not isinstance(value, str) else (
                "-".join(map(str, value)) if isinstance(value, tuple) else str(value))
            parts.append(re.sub(r"[^A-Za-z0-9.x-]+", "_", f"{key}-{text}"))
        return "_".join(parts)

    def config(self) -> STAConfig:
        return STAConfig(r=self.r, method=self.method, **dict(self.options))


def model_dirname(source: str) -> str:
    """A folder name for one model's runs inside ``--out``: readable, and unique per source (two
    models evaluated into one ``--out`` never share a folder, a results row or a plot line)."""
    name = source.split(":", 1)[-1].split(" (", 1)[0].rstrip("/\\")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name or name)[:40].strip("._") or "model"
    return f"{name}-{hashlib.sha1(source.encode()).hexdigest()[:8]}"


def entries_from_args(method: str, rs: Sequence[int] | None, levels: Sequence[int] = (),
                      options: dict[str, Any] | None = None) -> list[Entry]:
    """The sweep: one entry per r (method ``none`` runs once, as r=0); without ``rs``, the model's
    ``levels``; ``options`` (other STAConfig fields) apply to every pruned entry."""
    if method == "none":
        if options:
            raise UsageError(f"--method none evaluates the dense model; pruning options {sorted(options)} do not apply")
        if rs and any(rs):
            raise UsageError(f"--method none evaluates the dense model and takes no --r (got {list(rs)}); drop --r, "
                             "or give a pruning method (--method sta)")
        return [Entry("none", 0)]
    rs = rs or list(levels)
    if not rs:
        raise UsageError(f"--r is required for --method {method} (e.g. --r 64, or several for a sweep)")
    if any(r < 0 for r in rs):
        raise UsageError(f"--r values must be >= 0, got {list(rs)}")
    pairs = tuple(sorted((options or {}).items()))
    return [Entry(method, r, pairs) for r in dict.fromkeys(rs)]


def resolve_protocol(base: ViewProtocol, views: str | None, frames: int | None,
                     stride: int | None) -> ViewProtocol:
    """A model's protocol for a dataset (:meth:`LoadedModel.protocol`) with any CLI overrides applied."""
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


# --- data ---------------------------------------------------------------------------------------
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


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not fight the model for cores


# --- per-video records --------------------------------------------------------------------------
def rank_file(run_dir: Path, rank: int) -> Path:
    return run_dir / f"rank{rank}.jsonl"


def _rank_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("rank*.jsonl"), key=lambda p: (len(p.name), p.name))


def repair_tail(path: Path) -> None:
    """Cut a partial last line (a run killed mid-write) so appended records start on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def read_records(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Compact records ``{index, path, label, top5, error}`` of every rank file; unparsable lines
    (a torn last line) are skipped; the first record of an index wins."""
    done: dict[int, dict[str, Any]] = {}
    for path in _rank_files(run_dir):
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "index" in rec:
                    done.setdefault(int(rec["index"]), compact(rec))
    return done


def compact(rec: dict[str, Any]) -> dict[str, Any]:
    """What metrics and merging need from a record (scores stay in the files)."""
    return {"index": int(rec["index"]), "path": rec["path"], "label": int(rec["label"]),
            "top5": rec.get("top5"), "error": rec.get("error"), "short": bool(rec.get("short"))}


class RecordWriter:
    """Appends JSON lines; flushes every record, fsyncs every few records / seconds and on close."""

    def __init__(self, path: Path):
        self.file: TextIO = path.open("a", encoding="utf-8")
        self.unsynced, self.last_sync = 0, time.monotonic()

    def write(self, rec: dict[str, Any]) -> None:
        self.file.write(json.dumps(rec) + "\n")
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


# --- scoring loop -------------------------------------------------------------------------------
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
    loader = DataLoader(
        VideoViewsDataset(videos, proto, loaded.preprocessing),
        batch_size=None,  # one item = one video's views; batching across videos happens below
        num_workers=workers,
        worker_init_fn=_worker_init if workers else None,
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
    for sample in loader:
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


# --- metrics, FLOPs -----------------------------------------------------------------------------
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


def gflops_per_view(loaded: LoadedModel, entry: Entry, proto: ViewProtocol) -> float | None:
    """Backbone GFLOPs of one view (1 multiply-add = 1 FLOP): ``staprune.flops.analytic_flops``,
    else ``FlopCounterMode`` on one random view of the (patched) model, halved."""
    r = 0 if entry.dense else entry.r
    method = "sta" if entry.method == "none" else entry.method
    size = loaded.preprocessing.size
    try:
        from ..api.flops import analytic_flops

        options = dict(entry.options) if not entry.dense else {}
        return float(analytic_flops(loaded.model, r, frames=proto.frames, size=size, method=method, **options).gflops)
    except Exception as e:  # noqa: BLE001 - analytic counting is best-effort; measure instead
        print(f"staprune: analytic FLOPs unavailable ({type(e).__name__}: {e}); measuring", file=sys.stderr)
    from ..core.flops import flop_counter

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


# --- one (method, r) ----------------------------------------------------------------------------
def _fingerprint(items: Sequence[VideoItem]) -> str:
    h = hashlib.sha1()
    for it in items:
        h.update(f"{it.path}\t{it.label}\n".encode())
    return h.hexdigest()


def _check_run_dir(run_dir: Path, meta: dict[str, Any], resume: bool) -> None:
    has_records = any(p.stat().st_size > 0 for p in _rank_files(run_dir))
    if has_records and not resume:
        raise ExistingResultsError(f"{run_dir} already holds results; pass --resume to continue, or use another --out")
    meta_path = run_dir / "meta.json"
    if resume and meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UsageError(f"cannot resume: {meta_path} is damaged ({err}); delete {meta_path.parent} to start "
                             "this run over, or use another --out") from err
        diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {meta.get(k)!r}" for k in diff)
            raise UsageError(f"cannot resume {run_dir}: settings changed ({shown})")


def _write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


@dataclass
class Context:
    """Everything shared by the entries of one ``staprune eval`` invocation."""

    args: argparse.Namespace
    info: dist_utils.DistInfo
    loaded: LoadedModel
    items: list[VideoItem]
    proto: ViewProtocol
    device: torch.device
    dtype: torch.dtype
    out: Path


def _row_base(ctx: Context, entry: Entry) -> dict[str, Any]:
    p = ctx.proto
    return {"method": entry.method, "r": entry.r, "options": recorded(dict(entry.options)), "top1": None,
            "top5": None, "gflops": None,
            "clips_per_s": None, "videos": 0, "failed": [], "failed_reasons": {},
            "views": f"{p.clips}x{p.crops}", "frames": p.frames, "stride": p.stride, "sampling": p.sampling,
            "model": ctx.loaded.source, "error": None}


def _apply_patch(ctx: Context, entry: Entry) -> None:
    import staprune

    staprune.unpatch(ctx.loaded.model)
    if not entry.dense:
        staprune.patch(ctx.loaded.model, config=entry.config())


def evaluate_entry(ctx: Context, entry: Entry) -> dict[str, Any]:
    """Evaluate one (method, r) over the whole list (this rank's shard), resuming if asked.

    Returns the result row on every rank (metrics are filled in on rank 0 only).
    """
    info, row = ctx.info, _row_base(ctx, entry)
    _apply_patch(ctx, entry)  # every entry was checked by run() before any video was read
    run_dir = ctx.out / model_dirname(ctx.loaded.source) / entry.dirname
    row["run_dir"] = str(run_dir.relative_to(ctx.out))
    meta = {"model": ctx.loaded.source, "data": str(ctx.args.data), "videos": len(ctx.items),
            "list_sha1": _fingerprint(ctx.items), "method": entry.method, "r": entry.r, "options": row["options"],
            "views": row["views"],
            "frames": ctx.proto.frames, "stride": ctx.proto.stride, "sampling": ctx.proto.sampling,
            "size": ctx.loaded.preprocessing.size, "dtype": ctx.args.dtype}
    error: BaseException | None = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _check_run_dir(run_dir, meta, ctx.args.resume)
    except StapruneError as e:  # (before OSError: ExistingResultsError is a FileExistsError)
        error = e
    except OSError as e:
        error = write_error(run_dir, e)
    dist_utils.raise_if_any(info, error)
    dist_utils.barrier(info)  # everyone has read meta.json before rank 0 rewrites it
    if info.is_main:
        _write_json_atomic(run_dir / "meta.json", meta)
    own = rank_file(run_dir, info.rank)
    repair_tail(own)
    dist_utils.barrier(info)

    # Every rank may see different files (no shared filesystem): union what all of them read.
    done: dict[int, dict[str, Any]] = {}
    for part in dist_utils.all_gather(info, read_records(run_dir) if ctx.args.resume else {}):
        for index, rec in part.items():
            done.setdefault(index, rec)
    for index, rec in done.items():
        if index >= len(ctx.items) or rec["path"] != str(ctx.items[index].path):
            raise UsageError(f"{run_dir}: record {index} ({rec['path']}) does not match the list; "
                             "the list changed since these results were written")
    todo = [i for i in range(len(ctx.items)) if i not in done]
    mine = dist_utils.shard(todo, info)
    if info.is_main and done:
        _log(ctx, f"{row['run_dir']}: resuming, {len(done)} of {len(ctx.items)} videos already done")

    gflops = gflops_per_view(ctx.loaded, entry, ctx.proto) if info.is_main else None
    new: list[dict[str, Any]] = []
    writer = RecordWriter(own)
    progress = _progress(ctx, entry, len(mine))
    start = time.perf_counter()

    def on_record(rec: dict[str, Any]) -> None:
        writer.write(rec)
        new.append(compact(rec))

    stats, error = LoopStats(), None
    try:
        stats = score_videos(ctx.loaded, [(i, ctx.items[i]) for i in mine], ctx.proto,
                             batch_size=ctx.args.batch_size, workers=ctx.args.workers, device=ctx.device,
                             dtype=ctx.dtype, on_record=on_record, progress=progress)
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
    missing = [i for i in range(len(ctx.items)) if i not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} videos have no result after evaluation (first: {missing[0]})")
    row.update(metrics([done[i] for i in range(len(ctx.items))]))
    row["gflops"] = gflops
    rates = [clips / secs for _, clips, secs in gathered if clips and secs > 0]
    row["clips_per_s"] = sum(rates) if rates else None  # ranks run side by side: rates add up
    row["wall_s"] = wall
    return row


# --- reporting ----------------------------------------------------------------------------------
def _log(ctx: Context, message: str) -> None:
    if ctx.info.is_main:
        print(f"staprune: {message}", file=sys.stderr)


def _progress(ctx: Context, entry: Entry, total: int):
    if ctx.args.quiet or not ctx.info.is_main:
        return None
    from tqdm import tqdm

    desc = f"{entry.method} r={entry.r}" + (f" [rank 0 of {ctx.info.world_size}]" if ctx.info.distributed else "")
    return tqdm(total=total, desc=desc, unit="video", file=sys.stderr, dynamic_ncols=True)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of result rows."""
    lines = [f"{'method':<8}{'r':>6}{'top1':>9}{'top5':>9}{'GFLOPs':>10}{'clips/s':>10}{'videos':>8}{'failed':>8}"]
    for row in rows:
        if row.get("error"):
            lines.append(f"{row['method']:<8}{row['r']:>6}  ERROR: {row['error']}")
            continue
        lines.append(
            f"{row['method']:<8}{row['r']:>6}{_fmt(row['top1'], '.2f'):>9}{_fmt(row['top5'], '.2f'):>9}"
            f"{_fmt(row['gflops'], '.4g'):>10}{_fmt(row['clips_per_s'], '.1f'):>10}{row['videos']:>8}"
            f"{len(row['failed']):>8}"
        )
    return "\n".join(lines)


ROW_KEY = ("model", "method", "r", "options", "views", "frames", "stride", "sampling")


def row_key(row: dict[str, Any]) -> tuple:
    """What identifies a result: the model and its full evaluation config."""
    return tuple(json.dumps(row.get(k), sort_keys=True) for k in ROW_KEY)


def complete(row: dict[str, Any]) -> bool:
    """A row that scored videos without an error (a failed run's row is not)."""
    return row.get("error") is None and bool(row.get("videos"))


def merge_results(path: Path, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of an existing ``results.json`` updated with ``rows``: a row replaces the one with the same
    model and config (:func:`row_key`), unless it failed and the stored one is complete; rows of
    other models and configs are kept."""
    old: list[dict[str, Any]] = []
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            print(f"staprune: {path} is damaged; writing a new one", file=sys.stderr)
            old = []
    by_key = {row_key(r): r for r in old if isinstance(r, dict) and "method" in r}
    for r in rows:
        previous = by_key.get(row_key(r))
        if previous is not None and complete(previous) and not complete(r):
            print(f"staprune: kept the earlier complete row for {r['method']} r={r['r']} in {path.name} "
                  "(this run's failed)", file=sys.stderr)
            continue
        by_key[row_key(r)] = r
    return sorted(by_key.values(), key=lambda r: (str(r.get("model")), r["method"], r["r"]))


def plot_accuracy_vs_gflops(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """Top-1 against GFLOPs per view, one line per method, points labelled with r. False if < 2 points."""
    points = [r for r in rows if r.get("top1") is not None and r.get("gflops") is not None]
    if len(points) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    models = sorted({str(r.get("model")) for r in points})
    for model, method in sorted({(str(r.get("model")), r["method"]) for r in points}):
        pts = sorted((r for r in points if (str(r.get("model")), r["method"]) == (model, method)),
                     key=lambda r: r["gflops"])
        label = method if len(models) == 1 else f"{model_dirname(model)[:-9]}: {method}"
        ax.plot([r["gflops"] for r in pts], [r["top1"] for r in pts], marker="o", label=label)
        for r in pts:
            ax.annotate(f"r={r['r']}", (r["gflops"], r["top1"]), textcoords="offset points", xytext=(3, 3),
                        fontsize=7)
    ax.set_xlabel("GFLOPs per view")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _report(ctx: Context, rows: list[dict[str, Any]]) -> None:
    try:
        ctx.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(ctx.out, err) from err
    merged = merge_results(ctx.out / "results.json", rows)
    _write_json_atomic(ctx.out / "results.json", merged)
    plotted = plot_accuracy_vs_gflops(merged, ctx.out / "accuracy_vs_gflops.png")
    table = format_table(rows)
    print(table, file=sys.stderr if ctx.args.json else sys.stdout)
    for row in rows:
        for path, reason in row["failed_reasons"].items():
            print(f"staprune: failed ({row['method']} r={row['r']}): {path}: {reason}", file=sys.stderr)
    _log(ctx, f"results in {ctx.out / 'results.json'}" + (", plot accuracy_vs_gflops.png" if plotted else ""))
    if ctx.args.json:
        print(json.dumps(rows, indent=2))


# --- entry point --------------------------------------------------------------------------------
def _setup(args: argparse.Namespace, info: dist_utils.DistInfo) -> Context:
    if args.batch_size < 1 or args.workers < 0:
        raise UsageError("--batch-size must be >= 1 and --workers >= 0")
    device = resolve_device(args.device, info.local_rank if info.distributed else None)
    if info.is_main:
        writable_dir(args.out)  # before any model is loaded or video decoded
    loaded = load(args.model, args.weights, frames=args.frames, image_size=args.image_size)
    proto = resolve_protocol(loaded.protocol(args.dataset), args.views, args.frames, args.stride)
    items, _ = load_items(args.data, args.root)
    check_compatible(loaded, proto, items)
    dtype = DTYPES[args.dtype]
    loaded.model.to(device=device, dtype=dtype)
    return Context(args, info, loaded, items, proto, device, dtype, Path(args.out))


def summary(row: dict[str, Any], listed: int) -> str:
    """One line per result: how many videos were scored, failed, and repeated frames."""
    line = f"{row['method']} r={row['r']}: {row['videos']} of {listed} videos scored"
    if row["failed"]:
        first = next(iter(row["failed_reasons"].items()))
        line += f", {len(row['failed'])} failed (first: {first[0]}: {first[1]})"
    if row.get("short_videos"):
        line += (f"; {row['short_videos']} shorter than one clip ({row['frames']} frames at stride {row['stride']}) "
                 "repeated their last frame")
    return line


def interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves behind (printed by the CLI)."""
    return (f"every finished video is recorded under {args.out}; run the same command with --resume to "
            "evaluate only the rest")


def run(args: argparse.Namespace) -> int:
    """``staprune eval``: returns 0; 1 if a (method, r) could not be evaluated or scored no video."""
    if args.model is None and args.data is None:  # nothing to evaluate given: the bundled demo
        from . import demo as runner

        demo_args = ["--json"] if args.json else []
        if args.out != "eval-results":
            demo_args += ["--out", args.out]
        return runner.main(demo_args)
    if args.model is None or args.data is None:
        raise UsageError("give both --model and --data (or neither, to run the bundled demo)")
    check_pruning_options(args)
    options = pruning_options(args)
    entries_from_args(args.method, args.r, levels=(1,), options=options)  # option errors before anything is loaded
    info = dist_utils.init(resolve_device(args.device).type)
    try:
        error: BaseException | None = None
        try:
            ctx = _setup(args, info)
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = e
        dist_utils.raise_if_any(info, error)
        # Without --r: the model's own levels (a sweep over its three pruning levels).
        levels = ctx.loaded.default_levels(ctx.proto.frames, ctx.loaded.image_size)
        entries = entries_from_args(args.method, args.r, levels, options)
        spec = ctx.loaded.family.spec_of(ctx.loaded.model, ctx.proto.frames, ctx.loaded.preprocessing.size)
        for entry in entries:  # every (method, r) must fit the model and its input before any video is read
            _apply_patch(ctx, entry)
            if not entry.dense:
                ctx.loaded.family.plan(spec, entry.config())
        p = ctx.proto
        _log(ctx, f"{ctx.loaded.source}: {len(ctx.items)} videos, {p.clips}x{p.crops} views of {p.frames} "
                  f"frames ({p.sampling}, stride {p.stride}), {ctx.loaded.preprocessing.size}px, "
                  f"{info.world_size} process(es), device {ctx.device}")
        rows = [evaluate_entry(ctx, entry) for entry in entries]
        for row in rows:
            if row["error"]:
                _log(ctx, f"ERROR {row['method']} r={row['r']}: {row['error']}")
        if info.is_main:
            _report(ctx, rows)
            for row in rows:
                if not row["error"]:
                    _log(ctx, summary(row, len(ctx.items)))
        dist_utils.barrier(info)
        # (Only rank 0 holds the merged metrics.)
        unscored = [row for row in rows if not row["error"] and not row["videos"]] if info.is_main else []
        if unscored:
            _log(ctx, f"ERROR: no video could be scored ({len(unscored[0]['failed'])} failed); check --data and "
                      "--root (the first failure above says why)")
        return 1 if any(row["error"] for row in rows) or unscored else 0
    finally:
        dist_utils.shutdown(info)



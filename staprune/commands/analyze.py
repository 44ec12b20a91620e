"""``staprune analyze redundancy|gradnorm``: the paper's Sec. 3.3 measurements.

* ``redundancy``: trajectory sum ``S`` (Eq. 6, Table 1) of dense, random and STA models at the
  same r over a set of clips; mean and std over clips.
* ``gradnorm``: GradNorm (Eq. 7, Fig. 3) of one video on the dense model, drawn as a heatmap
  over the frames next to STA's kept tokens, and the share of GradNorm on STA-kept tokens
  versus random sets of the same size.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

import staprune

from ..analysis.backbones import StageGrid
from ..analysis.gradnorm import gradnorm, mass_fraction, random_mass_fraction
from ..analysis.inputs import AnalysisModel, add_clip_arguments, at_input, read_clip
from ..analysis.redundancy import clip_trajectory_sums
from ..analysis.visualize import (
    IMAGE_FORMATS,
    default_tile_side,
    heatmap_overlay,
    kept_mask,
    mask_dropped,
    render_grid,
    resize_tile,
    save_png,
)
from ..api.loading import load, require_model_kind
from ..api.settings import Setting, recorded
from ..core.errors import DataError, UsageError
from ..data import VideoReadError, load_items
from ..demo.data import generate
from ..families import VIDEO_CLASSIFIER, require_kind
from ..runs.arguments import (
    add_model_arguments,
    add_pruning_arguments,
    check_pruning_options,
    default_r,
    pruning_options,
)
from ..runs.progress import progress
from ..storage.outputs import writable_file, write_error

FEATURES = (
    "final-block tokens (ViT: encoder output before the head's pooling; Swin: last stage output "
    "before the final norm). Pruned models: only the tokens kept after the final stage; each kept "
    "token of the last frame takes its max cosine similarity over the kept tokens of every earlier "
    "frame, frames grouped by the token's original tubelet-frame index."
)


# --- redundancy -----------------------------------------------------------------------------------
def _sums_and_length(
    loaded: AnalysisModel, x: torch.Tensor, method: str, r: int, **options
) -> tuple[Tensor, int]:
    model, backbone = loaded.model, loaded.backbone
    (Setting(0, "none") if method == "dense" else Setting.of(method, r, options)).apply(model)
    try:
        with torch.no_grad():
            tokens, source = backbone.final_features(model, x)
    finally:
        staprune.unpatch(model)
    grid = backbone.final_grid
    return clip_trajectory_sums(tokens, source, grid.frames, grid.tokens_per_frame), tokens.shape[1]


def trajectory_sums(loaded: AnalysisModel, x: torch.Tensor, method: str, r: int, **options) -> Tensor:
    """``(B,)`` trajectory sums of a batch of model inputs; ``method="dense"`` drops nothing."""
    return _sums_and_length(loaded, x, method, r, **options)[0]


def _demo_clips(loaded: AnalysisModel, count: int, seed: int) -> Iterator[torch.Tensor]:
    """The demo's synthetic clips at the model's geometry, normalised with the model's preprocessing."""
    backbone, prep = loaded.backbone, loaded.preprocessing
    clips, _ = generate(count, seed, frames=backbone.frames, size=backbone.size)
    for clip in clips:
        yield backbone.model_input(prep.normalize_pixels(clip[None]))


def _list_clips(
    loaded: AnalysisModel, data: str, root: str | None, count: int, dataset: str | None,
    failed: list[tuple[str, str]],
) -> Iterator[torch.Tensor]:
    """The first ``count`` videos of a list as model inputs; unreadable ones go to ``failed``."""
    items, _ = load_items(data, root)
    for item in items[:count]:
        try:
            yield read_clip(item.path, loaded, dataset).x
        except VideoReadError as err:  # one unreadable file should not end a long measurement
            failed.append((str(item.path), err.reason))


def _batches(clips: Iterator[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    batch: list[torch.Tensor] = []
    for x in clips:
        batch.append(x)
        if len(batch) == size:
            yield torch.cat(batch)
            batch = []
    if batch:
        yield torch.cat(batch)


def measure_redundancy(
    loaded: AnalysisModel,
    batches: Iterator[torch.Tensor],
    r: int,
    methods: tuple[str, ...] = ("dense", "random", "sta"),
    total: int = 0,
    **options,
) -> dict[str, dict]:
    """Per method: ``per_clip`` trajectory sums (NaN for clips whose last frame lost every token)
    and ``final_tokens``, the number of tokens the final block sees (a clip's kept count).
    ``total``: clips expected, for a progress line (0: none)."""
    results: dict[str, dict] = {m: {"per_clip": [], "final_tokens": 0} for m in methods}
    bar = progress(total, "redundancy", "clip") if total else None
    for x in batches:
        for method in methods:
            sums, length = _sums_and_length(loaded, x, method, r, **options)
            results[method]["per_clip"].extend(sums.tolist())
            results[method]["final_tokens"] = length
        if bar is not None:
            bar.update(len(x))
    if bar is not None:
        bar.close()
    return results


def summarize(values: list[float]) -> dict[str, float | int]:
    arr = np.asarray(values, dtype=np.float64)
    ok = arr[~np.isnan(arr)]
    std = float(ok.std(ddof=1)) if ok.size > 1 else 0.0
    return {"mean": float(ok.mean()) if ok.size else float("nan"), "std": std, "clips": int(ok.size)}


def run_redundancy(args: argparse.Namespace) -> int:
    check_pruning_options(args)
    for name in ("max_clips", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    loaded = _loaded(args)
    args.r = default_r(args, loaded.default_r())
    failed: list[tuple[str, str]] = []
    if args.demo:
        clips = _demo_clips(loaded, args.max_clips, args.seed)
    else:
        clips = _list_clips(loaded, args.data, args.root, args.max_clips, args.dataset, failed)
    options = pruning_options(args)
    measured = measure_redundancy(loaded, _batches(clips, args.batch_size), args.r, tuple(args.methods),
                                  total=args.max_clips, **options)
    if not any(v["per_clip"] for v in measured.values()):
        first = f" (first: {failed[0][0]}: {failed[0][1]})" if failed else ""
        raise DataError(f"no clip could be measured{first}; check --data and --root")
    if failed:
        print(f"staprune analyze: {len(failed)} videos could not be read and are left out (first: {failed[0][0]}: "
              f"{failed[0][1]})", file=sys.stderr)
    grid = loaded.backbone.final_grid
    report = {
        "model": args.model,
        "r": args.r,
        "options": recorded(options),
        "frames": grid.frames,
        "max": grid.frames - 1,
        "features": FEATURES,
        "tokens": grid.tokens,
        "results": {m: {**summarize(v["per_clip"]), **v} for m, v in measured.items()},
        "failed": dict(failed),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"trajectory sum S (Eq. 6), {args.model}, r={args.r}, {grid.frames} frames (max {grid.frames - 1})")
    print(f"features: {FEATURES}")
    for method, stats in report["results"].items():
        print(
            f"  {method:>7}: {stats['mean']:.3f} ± {stats['std']:.3f}  "
            f"({stats['clips']} clips, final block sees {stats['final_tokens']}/{grid.tokens} tokens)"
        )
    return 0


# --- gradnorm -------------------------------------------------------------------------------------
def sta_kept(
    loaded: AnalysisModel, x: torch.Tensor, r: int, method: str = "sta", **options
) -> tuple[torch.Tensor, StageGrid]:
    """Kept mask ``(T, h, w)`` after the final pruning stage of a batch-of-one input, and its grid."""
    model = loaded.model
    staprune.patch(model, r=r, method=method, **options)
    try:
        with torch.no_grad():
            model(x)
        kept, grid = staprune.kept_tokens(model)[-1], loaded.backbone.kept_grids(model)[-1]
    finally:
        staprune.unpatch(model)
    return kept_mask(kept[0], grid.frames, grid.height, grid.width), grid


def gradnorm_report(loaded: AnalysisModel, x: torch.Tensor, r: int, draws: int = 32, seed: int = 0, **options) -> dict:
    """GradNorm heat ``(T, h, w)`` on the final stage's grid, STA's kept mask and the mass shares
    (``options``: STAConfig fields of the STA run)."""
    mask, grid = sta_kept(loaded, x, r, **options)
    heat = gradnorm(loaded.model, loaded.backbone, x, grid)[0]
    count = int(mask.sum())
    rand_mean, rand_std = random_mass_fraction(heat, count, draws, seed)
    return {
        "heat": heat,
        "mask": mask,
        "grid": grid,
        "kept": count,
        "tokens": grid.tokens,
        "sta_fraction": mass_fraction(heat, mask),
        "random_fraction_mean": rand_mean,
        "random_fraction_std": rand_std,
        "random_draws": draws,
    }


def gradnorm_figure(images: np.ndarray, frame_ids: list[int], result: dict, layers: int) -> np.ndarray:
    """Fig. 3: RGB frames, GradNorm overlay (min-max scaled over the whole clip), STA-kept patches."""
    heat = result["heat"]
    scaled = ((heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-30)).numpy()
    overlay = np.stack([heatmap_overlay(img, scaled[t]) for t, img in enumerate(images)])
    kept = mask_dropped(images, result["mask"], result["grid"].pixels)
    side = default_tile_side(images.shape[1], len(images))
    rows = [[resize_tile(img, side) for img in row] for row in (images, overlay, kept)]
    titles = [
        "RGB frames (first frame of each tubelet)",
        f"GradNorm (Eq. 7): sum over {layers} blocks' outputs of |dL/dX|, L = CE of the predicted label "
        "(colour: min-max over the clip)",
        f"STA kept after the final stage: {result['kept']}/{result['tokens']} tokens hold "
        f"{100 * result['sta_fraction']:.1f}% of GradNorm "
        f"(random sets: {100 * result['random_fraction_mean']:.1f} "
        f"± {100 * result['random_fraction_std']:.1f}%)",
    ]
    labels = [f"t={t} · frame {i}" for t, i in enumerate(frame_ids)]
    return render_grid(rows, titles, labels)


def run_gradnorm(args: argparse.Namespace) -> int:
    output = writable_file(args.output, "-o", tuple(IMAGE_FORMATS), replace=args.force)  # before any work
    check_pruning_options(args)
    if args.draws < 1:
        raise UsageError(f"--draws must be >= 1, got {args.draws}")
    loaded = _loaded(args)
    args.r = default_r(args, loaded.default_r())
    clip = read_clip(args.video, loaded, args.dataset)
    options = pruning_options(args)
    result = gradnorm_report(loaded, clip.x, args.r, args.draws, args.seed, **options)
    tubelet = loaded.backbone.tubelet
    layers = len(loaded.backbone.blocks(loaded.model))
    image = gradnorm_figure(clip.tubelet_images(tubelet), clip.indices[::tubelet], result, layers)
    try:
        path = save_png(image, output)
    except OSError as err:
        raise write_error(output, err) from err
    summary = {k: v for k, v in result.items() if k not in ("heat", "mask", "grid")}
    summary.update(model=args.model, video=str(args.video), r=args.r, options=recorded(options), output=str(path),
                   X="block outputs")
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"wrote {path}")
    print(
        f"GradNorm on STA-kept tokens: {100 * result['sta_fraction']:.1f}% "
        f"({result['kept']}/{result['tokens']} tokens kept, r={args.r}); random sets of the same size: "
        f"{100 * result['random_fraction_mean']:.1f} ± {100 * result['random_fraction_std']:.1f}% "
        f"over {args.draws} draws"
    )
    return 0


# --- argparse -------------------------------------------------------------------------------------
def _model_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, required=True)
    parser.add_argument(
        "--r", type=int, help="tokens dropped per unit at the first stage (default: the middle of the model's "
        "three levels)"
    )
    add_clip_arguments(parser)
    add_pruning_arguments(parser, seed_flag=False)  # --seed is the clips' / draws' seed here
    parser.add_argument("--json", action="store_true", help="print a JSON report")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    red = sub.add_parser("redundancy", help="trajectory sum (Eq. 6, Table 1): dense vs random vs STA")
    _model_arguments(red)
    source = red.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="list file ('path label' lines) or folder-per-class directory")
    source.add_argument("--demo", action="store_true", help="synthetic demo clips (staprune.demo.data)")
    red.add_argument("--root", help="base directory for relative paths in --data")
    red.add_argument("--seed", type=int, default=0, help="seed of the --demo clips")
    red.add_argument("--max-clips", type=int, default=50, help="clips measured")
    red.add_argument("--batch-size", type=int, default=4, help="clips per forward")
    red.add_argument(
        "--methods", nargs="+", default=["dense", "random", "sta"], choices=("dense", "random", "sta", "tome"),
        help="settings measured at the same r",
    )
    red.set_defaults(_analysis=run_redundancy)
    grad = sub.add_parser(
        "gradnorm", help="GradNorm heatmap (Eq. 7, Fig. 3) and its share on STA-kept tokens"
    )
    grad.add_argument("video")
    _model_arguments(grad)
    grad.add_argument("-o", "--output", required=True, help="picture to write (.png, .jpg or .webp)")
    grad.add_argument("--draws", type=int, default=32, help="random token sets for the baseline share")
    grad.add_argument("--force", action="store_true", help="replace -o when it exists")
    grad.add_argument("--seed", type=int, default=0, help="seed of the random token sets")
    grad.set_defaults(_analysis=run_gradnorm)


INSTEAD = "staprune visualize --keep shows which of a video LLM's tokens are kept"


def run(args: argparse.Namespace) -> int:
    require_model_kind(args.model, VIDEO_CLASSIFIER, "staprune analyze", INSTEAD)
    return int(args._analysis(args) or 0)


def _loaded(args: argparse.Namespace):
    """The model, at the input asked for; a video LLM refused (a hub id or file: known once loaded)."""
    loaded = load(args.model, args.weights)
    require_kind(loaded.family, VIDEO_CLASSIFIER, "staprune analyze", INSTEAD)
    return at_input(loaded, args.frames, args.size)


__all__ = ["add_arguments", "gradnorm_report", "measure_redundancy", "run", "sta_kept", "trajectory_sums"]

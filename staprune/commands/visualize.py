"""``staprune visualize VIDEO --model M [--r R] -o OUT.png [--gif OUT.gif]``: kept tokens per stage
(a video LLM: per budget, ``--keep``; see :mod:`staprune.analysis.video_llm`).

The picture (the paper's Fig. 4): the first row shows the clip's input frames (the first frame
of every tubelet, i.e. one image per temporal token position), each further row the same frames
after a pruning stage with the patches of dropped tokens painted white. ViT stages share the
patch grid; Video Swin stages are drawn at their own resolution (8, 16, 32 px tokens on 224²).
Under ToMe, tokens that are not a merged token's representative are painted white.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np
import torch

import staprune

from ..analysis.backbones import Backbone
from ..analysis.inputs import Clip, add_clip_arguments, at_input, read_clip
from ..analysis.video_llm import kept_views, sample_video, unit_images
from ..analysis.visualize import (
    IMAGE_FORMATS,
    default_tile_side,
    kept_mask,
    mask_dropped,
    render_grid,
    resize_tile,
    save_gif,
    save_png,
)
from ..api.loading import load
from ..families import VIDEO_LLM
from ..runs.arguments import (
    add_keep_argument,
    add_method_argument,
    add_model_arguments,
    add_pruning_arguments,
    check_pruning_options,
    default_r,
    pruning_options,
    refuse_keep,
    video_llm_settings,
)
from ..storage.outputs import writable_file, write_error


@dataclass
class StageView:
    """Images of one pruning stage: uint8 ``(T, S, S, 3)`` with dropped patches white."""

    title: str
    images: np.ndarray
    kept: int
    total: int


def stage_views(
    model: torch.nn.Module, backbone: Backbone, clip: Clip, r: int, method: str = "sta", **options
) -> list[StageView]:
    """Patch ``model``, run the clip, and mask every stage's dropped tokens; unpatches afterwards."""
    staprune.patch(model, r=r, method=method, **options)
    try:
        with torch.no_grad():
            model(clip.x)
        kept = staprune.kept_tokens(model)
        grids = backbone.kept_grids(model)
    finally:
        staprune.unpatch(model)
    images = clip.tubelet_images(backbone.tubelet)
    views = []
    for k, (indices, grid) in enumerate(zip(kept, grids, strict=True)):
        mask = kept_mask(indices[0], grid.frames, grid.height, grid.width)
        count = int(mask.sum())
        if len(backbone.grids) == 1:  # one grid for every stage (columnar ViTs)
            title = f"after stage {k + 1}: kept {count}/{grid.tokens} tokens"
        else:
            title = (
                f"after {grid.name} pruning ({grid.height}x{grid.width} tokens/frame): "
                f"kept {count}/{grid.tokens}"
            )
        views.append(StageView(title, mask_dropped(images, mask, grid.pixels), count, grid.tokens))
    return views


def _tile_side(clip: Clip, columns: int, requested: int | None) -> int:
    if requested:
        return requested
    return default_tile_side(clip.display.shape[1], columns)


def figure(clip: Clip, backbone: Backbone, views: list[StageView], tile: int | None = None) -> np.ndarray:
    """The Fig. 4 grid: row 0 input, then one row per stage; columns are temporal positions."""
    images = clip.tubelet_images(backbone.tubelet)
    side = _tile_side(clip, len(images), tile)
    rows = [images] + [v.images for v in views]
    tiles = [[resize_tile(img, side) for img in row] for row in rows]
    frame_ids = clip.indices[:: backbone.tubelet]
    labels = [f"t={t} · frame {i}" for t, i in enumerate(frame_ids)]
    titles = [f"input: {clip.path.name} (centre clip, first frame of each tubelet)"] + [
        v.title for v in views
    ]
    return render_grid(tiles, titles, labels)


def animation(
    clip: Clip, backbone: Backbone, views: list[StageView], tile: int | None = None
) -> list[np.ndarray]:
    """GIF frames: one per temporal position, showing input and every stage side by side."""
    images = clip.tubelet_images(backbone.tubelet)
    side = _tile_side(clip, 1 + len(views), tile)
    labels = ["input"] + [f"stage {k + 1}: {v.kept}/{v.total}" for k, v in enumerate(views)]
    frames = []
    for t, frame_id in enumerate(clip.indices[:: backbone.tubelet]):
        row = [resize_tile(images[t], side)] + [resize_tile(v.images[t], side) for v in views]
        frames.append(render_grid([row], [f"t={t} (frame {frame_id})"], labels))
    return frames


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video", help="any video PyAV can read")
    add_model_arguments(parser, required=True)
    parser.add_argument(
        "--r", type=int, help="tokens dropped per unit at the first stage (r1 for Swin); default: the middle of "
        "the model's three levels"
    )
    add_method_argument(parser)
    add_keep_argument(parser)
    parser.add_argument("-o", "--output", required=True, help="picture to write (.png, .jpg or .webp)")
    parser.add_argument("--gif", help="also write an animated GIF, one frame per temporal position")
    parser.add_argument("--force", action="store_true", help="replace -o / --gif when they exist")
    add_clip_arguments(parser)
    parser.add_argument(
        "--tile-size", type=int, help="tile side in px (default: input size, 112 if > 8 columns)"
    )
    add_pruning_arguments(parser)


def run(args: argparse.Namespace) -> int:
    output = writable_file(args.output, "-o", tuple(IMAGE_FORMATS), replace=args.force)  # before any work
    gif = writable_file(args.gif, "--gif", (".gif",), replace=args.force) if args.gif else None
    check_pruning_options(args)
    plain = load(args.model, args.weights)
    if plain.family.kind == VIDEO_LLM:
        return _run_video_llm(args, plain, output, gif)
    refuse_keep(args, plain.family.title)
    loaded = at_input(plain, args.frames, args.size)
    clip = read_clip(args.video, loaded, args.dataset)
    warn_repeated_frames(clip.path, clip.indices)
    r = default_r(args, loaded.default_r())
    views = stage_views(loaded.model, loaded.backbone, clip, r, args.method, **pruning_options(args))
    return _write(output, gif, lambda: figure(clip, loaded.backbone, views, args.tile_size),
                  lambda: animation(clip, loaded.backbone, views, args.tile_size), [v.title for v in views])


def warn_repeated_frames(path, indices) -> None:
    """A video shorter than the clip repeats frames (as eval does, and says): the pictures then show
    copies, which every pruning method finds redundant; say so instead of leaving it to be guessed."""
    distinct = len(set(map(int, indices)))
    if distinct < len(indices):
        print(f"staprune visualize: warning: {path} gives {distinct} distinct frame(s) for a clip of {len(indices)}; "
              "the rest repeat its last frame, so later temporal units are copies", file=sys.stderr)


def _write(output, gif, picture, frames, titles: list[str]) -> int:
    """Save ``picture()`` (and ``frames()`` as the GIF, when asked) and say what each row shows."""
    try:
        path = save_png(picture(), output)
    except OSError as err:
        raise write_error(output, err) from err
    print(f"wrote {path}")
    for title in titles:
        print(f"  {title}")
    if gif is not None:
        try:
            print(f"wrote {save_gif(frames(), gif)}")
        except OSError as err:
            raise write_error(gif, err) from err
    return 0


def _run_video_llm(args: argparse.Namespace, loaded, output, gif) -> int:
    """A video LLM: the video's frames as the model reads them, then one row per budget."""
    family = loaded.family
    spec = family.spec_of(loaded.model, args.frames, args.size)
    settings = video_llm_settings(args.keep, [args.r] if args.r else None, args.methods, pruning_options(args),
                                  family.default_keep)[1:]
    for config in settings:  # every budget fits before the video is decoded
        family.kept_video_tokens(spec, config)
    video = sample_video(args.video, spec.frames, spec.size)
    warn_repeated_frames(video.path, video.indices)
    views = kept_views(loaded.model, family, spec, video, settings, loaded.preprocessing)
    images, _ = unit_images(video, family, spec)
    per_unit = spec.frames // len(images)
    labels = [f"t={t} · frame {video.indices[t * per_unit]}" for t in range(len(images))]
    side = args.tile_size or default_tile_side(images.shape[1], len(images))
    rows = [images] + [v.images for v in views]
    tiles = [[resize_tile(img, side) for img in row] for row in rows]
    titles = [f"input: {video.path.name} ({spec.frames} frames over the video, first frame of each temporal unit)"]
    names = ["input"] + [v.title.split(":")[0] for v in views]
    return _write(output, gif, lambda: render_grid(tiles, titles + [v.title for v in views], labels),
                  lambda: [render_grid([[resize_tile(row[t], side) for row in rows]], [labels[t]], names)
                           for t in range(len(images))], [v.title for v in views])


__all__ = ["StageView", "add_arguments", "animation", "figure", "run", "stage_views"]

"""Kept video tokens of a video LLM on a real video, as pictures (``staprune visualize`` on a video LLM).

A video LLM reads a whole video as a few frames spread over it (the middle frame of equal segments),
each resized to the model's side; each temporal unit (Qwen: two frames, LLaVA-OneVision: one) is
drawn as its first frame with the patches of its dropped tokens painted white, one row per budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..adapters.state import kept_tokens
from ..api.patching import patch, unpatch
from ..core.config import STAConfig
from ..data.sampling import segment_clip_indices
from ..data.transforms import Preprocessing
from ..data.video import probe, read_frames
from ..families.video_llms.base import VideoLLMFamily, VideoLLMSpec
from .visualize import kept_mask, mask_dropped


@dataclass
class SampledVideo:
    """Frames of a video as a video LLM reads them.

    Attributes:
        indices: decoded frame indices, spread over the whole video.
        frames: ``(T, 3, S, S)`` float in ``[0, 1]``, resized to the model's side (aspect not kept,
            as LLaVA-OneVision's processor does).
    """

    path: Path
    indices: list[int]
    frames: Tensor


@dataclass
class KeptView:
    """One budget's picture: uint8 ``(units, s, s, 3)`` first frames of the units, dropped patches white."""

    title: str
    images: np.ndarray
    kept: int
    total: int


def sample_video(path: str | Path, frames: int, size: int) -> SampledVideo:
    """``frames`` frames spread over the whole video (the middle of equal segments), at ``size``²."""
    path = Path(path)
    indices = segment_clip_indices(probe(path).num_frames, frames, 1)[0]
    pixels = read_frames(path, indices).permute(0, 3, 1, 2).float() / 255
    resized = nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return SampledVideo(path, indices, resized.clamp(0, 1))


def unit_images(video: SampledVideo, family: VideoLLMFamily, spec: VideoLLMSpec) -> tuple[np.ndarray, int]:
    """The first frame of every temporal unit, resized so each token covers whole pixels: uint8
    ``(units, s, s, 3)`` and the pixels a token covers (LLaVA-OneVision's 384 px make 14 tokens: 28 px each at 392)."""
    layout = family.layout(spec)
    per_unit = spec.frames // layout.units
    pixels = math.ceil(spec.size / layout.rows)
    firsts = video.frames[::per_unit][: layout.units]
    firsts = nn.functional.interpolate(firsts, size=(layout.rows * pixels, layout.cols * pixels), mode="bilinear",
                                       align_corners=False)
    return firsts.mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy(), pixels


def kept_views(model: nn.Module, family: VideoLLMFamily, spec: VideoLLMSpec, video: SampledVideo,
               settings: list[STAConfig], prep: Preprocessing | None = None) -> list[KeptView]:
    """Patch ``model`` with each setting, run the video in an example prompt (normalised with ``prep``,
    the checkpoint's), and paint each unit's dropped tokens white; unpatches afterwards."""
    inputs = family.video_inputs(model, video.frames, spec, prep)
    layout = family.layout(spec)
    body = layout.units * layout.per_unit
    images, pixels = unit_images(video, family, spec)
    views = []
    try:
        for config in settings:
            unpatch(model)
            patch(model, config=config)
            with torch.no_grad():
                model(**inputs)
            kept = kept_tokens(model)[0]
            mask = kept_mask(kept[kept < body], layout.units, layout.rows, layout.cols)
            count = int(mask.sum())
            title = f"{config.method} {config.budget}: kept {count}/{body} video tokens"
            views.append(KeptView(title, mask_dropped(images, mask, pixels), count, body))
    finally:
        unpatch(model)
    return views


__all__ = ["KeptView", "SampledVideo", "kept_views", "sample_video", "unit_images"]

"""The random baseline: the same count per temporal unit as STA, chosen by the video's own seeded noise."""

from __future__ import annotations

from torch import Tensor

from ..baselines import random_keep_indices
from ..config import STAConfig
from .registry import VideoMethod, VideoTokens, register_video_method


def random_select(video: VideoTokens, keep: int, config: STAConfig) -> Tensor:
    layout = video.layout
    return random_keep_indices(video.rng, 1, layout.units, layout.per_unit, layout.per_unit - keep)[0]


METHOD = register_video_method(VideoMethod(
    "random", random_select, needs=lambda config: frozenset({"noise"}),
    description="random tokens, the same count per temporal unit"))

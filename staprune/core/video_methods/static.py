"""Static-patch dropping: keep the tokens of each unit whose pixels changed most since the previous one."""

from __future__ import annotations

from torch import Tensor

from ..baselines import static_keep_indices
from ..config import STAConfig
from .registry import VideoMethod, VideoTokens, register_video_method


def static_select(video: VideoTokens, keep: int, config: STAConfig) -> Tensor:
    return static_keep_indices(video.change, keep)


METHOD = register_video_method(VideoMethod(
    "static", static_select, needs=lambda config: frozenset({"pixel_change"}),
    description="the tokens whose pixels changed most, the same count per temporal unit"))

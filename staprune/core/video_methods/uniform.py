"""Whole temporal units, evenly spaced: fewer frames, how video-LLM users usually save tokens."""

from __future__ import annotations

from torch import Tensor

from ..baselines import uniform_unit_count, uniform_unit_indices
from ..config import STAConfig
from .layout import VideoLayout
from .registry import VideoMethod, VideoTokens, register_video_method


def uniform_select(video: VideoTokens, keep: int, config: STAConfig) -> Tensor:
    layout = video.layout
    return uniform_unit_indices(layout.units, layout.per_unit, keep, video.tokens.device)


def uniform_kept(layout: VideoLayout, keep: int) -> int:
    return uniform_unit_count(layout.units, layout.per_unit, keep) * layout.per_unit


METHOD = register_video_method(VideoMethod(
    "uniform", uniform_select, kept_count=uniform_kept,
    description="whole temporal units, evenly spaced (about as many tokens)"))

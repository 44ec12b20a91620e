"""STA on one video's tokens (docs/families/video-llms.md): the paper's temporal accumulation over
the video's temporal units, one selection per video."""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import STAConfig
from ..score import normalize_metric, sta_keep_indices
from .registry import VideoMethod, VideoTokens, register_video_method


def sta_select(video: VideoTokens, keep: int, config: STAConfig) -> Tensor:
    """STA's kept tokens ``(units * keep,)``: semantic score from the projected tokens, similarity
    from the vision keys (``similarity="hidden"``: the projected tokens)."""
    layout, body = video.layout, video.layout.body
    metric = video.keys if video.keys is not None else normalize_metric(video.tokens)
    forward = (config.order or "F")[0] == "F"
    return sta_keep_indices(
        video.tokens[None, :body], metric[None, :body], layout.units, layout.per_unit - keep, forward=forward,
        first_unit=config.first_unit, score=config.score, first_transition=config.first_transition,
        rng=video.rng, positions=torch.arange(body, device=video.tokens.device)[None],
        grid_hw=(layout.rows, layout.cols),
    )[0]


def sta_needs(config: STAConfig) -> frozenset[str]:
    keys = {"keys"} if config.similarity != "hidden" else set()
    noise = {"noise"} if config.first_unit != "bipartite" else set()
    return frozenset(keys | noise)


METHOD = register_video_method(VideoMethod(
    "sta", sta_select, needs=sta_needs,
    description="STA (the paper): temporal accumulation over the video's units, same count per unit"))

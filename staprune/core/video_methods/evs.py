"""EVS, Efficient Video Sampling, as vLLM ships it (``--video-pruning-rate``): the first temporal
unit is kept whole; every later token is scored by how much it changed since the same position one
unit earlier, ``1 - cos(x_t, x_{t-1})`` on the tokens the language model receives, and one top-k
over the whole video keeps the most changed (equal scores by position, as vLLM's stable sort).

The count is staprune's budget, ``keep`` per unit in all, the same total as every method's (vLLM
counts ``max(tokens_per_frame, int(total * (1 - q)))``: the same where ``int(total * keep_ratio)``
is, and at least the whole first frame). A budget below one unit therefore keeps part of the
first unit, its first tokens in order, where vLLM would keep all of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import STAConfig
from ..score import stable_argsort
from .layout import VideoLayout
from .registry import VideoMethod, VideoTokens, register_video_method

# Above any 1 - cos (at most 2): the first unit ranks before every later token (vLLM uses 255).
FIRST_UNIT_SCORE = 3.0


def evs_scores(tokens: Tensor, layout: VideoLayout) -> Tensor:
    """``(units * per_unit,)`` each token's change since the same position one unit earlier, the
    first unit at :data:`FIRST_UNIT_SCORE`; ``tokens`` ``(L_v, C)``."""
    units, n = layout.units, layout.per_unit
    x = tokens[: layout.body].float().view(units, n, -1)
    change = 1 - F.cosine_similarity(x[1:], x[:-1], dim=-1)  # (units - 1, n)
    return torch.cat([change.new_full((1, n), FIRST_UNIT_SCORE), change]).reshape(-1)


def evs_select(video: VideoTokens, keep: int, config: STAConfig) -> Tensor:
    scores = evs_scores(video.tokens, video.layout)
    return stable_argsort(scores, descending=True)[: video.layout.units * keep]


METHOD = register_video_method(VideoMethod(
    "evs", evs_select,
    description="EVS (vLLM's): the first unit whole, then the tokens that changed most since the unit before, "
                "over the whole video"))

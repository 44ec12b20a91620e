"""VidCom2 (Liu et al., EMNLP 2025), as its reference implementation and vLLM's port select: each
frame gets a budget from how distinctive it is, and keeps its tokens least similar to the video's
centre and to its own frame's centre; the count is then reconciled to the exact total.

On the tokens the language model receives, one temporal unit per frame:

1. keep the half of the channels that vary least over the video, L2-normalise each token;
2. each token's similarity to the video centre and to its frame's centre, each a sum of Gaussian
   kernels ``exp(-d² / 2a)`` over ``a`` in 1/8, 1/4, 1/2, 1, 2;
3. frame budgets: a frame's distinctiveness is minus its mean similarity to the video centre; a
   softmax of it at temperature 0.01 shifts each frame's share of ``base`` (the kept share) by its
   probability minus the mean probability, at most the whole frame, at least one token;
4. each frame keeps its tokens of lowest summed similarity; 5. the total is brought to the budget by
   dropping the kept tokens of highest similarity, or adding the others of lowest, over the video.

The total is staprune's budget (``keep`` per unit, in all), the same as every method's; ``base`` is
the ``keep_ratio`` (with ``r``: the kept share of a unit). Equal scores go by position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import STAConfig
from ..score import stable_argsort
from .registry import VideoMethod, VideoTokens, register_video_method

BANDWIDTHS = tuple(2.0**k for k in range(-3, 2))  # the Gaussian kernels' 2a / 2 (the release's alphas)
LOW_VARIANCE_SHARE = 0.5  # of the channels, those that vary least over the video
TEMPERATURE = 0.01  # of the softmax over the frames' distinctiveness


def _similarity(x: Tensor, centre: Tensor) -> Tensor:
    """Summed Gaussian kernels of each token ``(T, N, C)`` to ``centre``: ``(T, N)``."""
    squared = ((x - centre) ** 2).sum(-1)
    return sum(torch.exp(-squared / (2.0 * a)) for a in BANDWIDTHS)


def vidcom2_select(video: VideoTokens, keep: int, config: STAConfig) -> Tensor:
    layout = video.layout
    units, n = layout.units, layout.per_unit
    target = units * keep
    tokens = video.tokens[: layout.body].float()
    channels = max(1, int(tokens.shape[-1] * LOW_VARIANCE_SHARE))
    quiet = stable_argsort(tokens.var(dim=0, unbiased=False))[:channels]
    frames = F.normalize(tokens[:, quiet].view(units, n, channels), dim=-1)
    to_video = _similarity(frames, frames.mean(dim=(0, 1), keepdim=True))  # (T, N)
    similarity = to_video + _similarity(frames, frames.mean(dim=1, keepdim=True))
    base = config.keep_ratio if config.keep_ratio is not None else keep / n
    distinct = -to_video.mean(-1)
    probs = F.softmax((distinct - distinct.max()) / TEMPERATURE, dim=0)
    budgets = (base * (1.0 + probs - probs.mean())).clamp(max=1.0)
    per_frame = (budgets * n).round().long().clamp(min=1, max=n)
    kept = torch.zeros(units, n, dtype=torch.bool, device=tokens.device)
    for unit in range(units):
        kept[unit, stable_argsort(similarity[unit])[: int(per_frame[unit])]] = True
    kept, flat = kept.view(-1), similarity.view(-1)
    surplus = int(kept.sum()) - target
    if surplus > 0:  # drop the kept tokens most alike the centres
        held = kept.nonzero().flatten()
        kept[held[stable_argsort(flat[held], descending=True)[:surplus]]] = False
    elif surplus < 0:  # add the others least alike them
        free = (~kept).nonzero().flatten()
        kept[free[stable_argsort(flat[free])[:-surplus]]] = True
    return kept.nonzero().flatten()


METHOD = register_video_method(VideoMethod(
    "vidcom2", vidcom2_select,
    description="VidCom2: frame budgets by distinctiveness, the tokens least like the video and frame centres"))

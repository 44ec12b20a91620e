"""DivPrune (Alvar et al., CVPR 2025): the kept set as a max-min diversity selection over all of a
video's tokens, as the released code selects it: on the cosine distances ``1 - cos`` between the
tokens the language model receives, the first token is the one whose nearest other token is
farthest, and each next one the token farthest from everything kept so far (first index on a tie).

The count is staprune's budget (``keep`` per unit, in all: the same total as every method's); the
tokens are chosen over the whole video, so a unit may keep more or fewer than ``keep``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import STAConfig
from .registry import VideoMethod, VideoTokens, register_video_method


def max_min_diverse(tokens: Tensor, count: int) -> Tensor:
    """``count`` indices into ``tokens`` ``(L, C)``, in the order they are picked."""
    x = F.normalize(tokens.float(), dim=-1)
    distance = 1 - x @ x.T  # (L, L), zero on the diagonal
    # The first pick: the largest distance to a token's nearest other token (its second-smallest).
    first = int(distance.topk(min(2, distance.shape[0]), dim=0, largest=False).values[-1].argmax())
    picked = [first]
    nearest = distance[first].clone()  # each token's distance to the kept set
    for _ in range(count - 1):
        pick = int(nearest.argmax())
        picked.append(pick)
        nearest = torch.minimum(nearest, distance[pick])
    return torch.tensor(picked, device=tokens.device)


def divprune_select(video: VideoTokens, keep: int, config: STAConfig) -> Tensor:
    layout = video.layout
    return max_min_diverse(video.tokens[: layout.body], layout.units * keep)


METHOD = register_video_method(VideoMethod(
    "divprune", divprune_select,
    description="DivPrune: a max-min diversity selection over the whole video's tokens"))

"""FastV (Chen et al., ECCV 2024, "An Image is Worth 1/2 Tokens After Layer 2"), the only method here
that acts inside the language model: the first ``K`` decoder layers see every token; after layer ``K``
each video keeps the tokens the last prompt token attended to most in layer ``K - 1``, and the later
layers (their KV cache too) see only those.

As the release computes it (its "inplace" variant, ``FASTV_k``, ``FASTV_ratio``): the attention
weights of layer ``K - 1``, averaged over heads, the last query's row, read at the video tokens; one
top-k; the kept tokens keep their original positions. The count is staprune's budget (``keep`` per
unit, in all): the release keeps ``int(L_v * (1 - R))``, the same where ``L_v * keep_ratio`` is an
integer. A prompt with several videos selects per video (the release has one image span).
"""

from __future__ import annotations

from torch import Tensor

from ..config import STAConfig
from ..errors import ConfigError
from ..score import stable_argsort
from .registry import MethodOption, VideoMethod, VideoTokens, method_options, register_video_method

LAYER = MethodOption("fastv_layer", 2, lambda k: k >= 1, "an integer >= 1 (and below the language model's depth)",
                     "K: the decoder layers that see every token; selection uses layer K-1's attention")


def fastv_select(video: VideoTokens, keep: int, config: STAConfig) -> Tensor:
    """The ``units * keep`` tokens of highest ``video.attention`` ``(L_v,)`` (ties by position)."""
    if video.attention is None:
        raise ConfigError("fastv selects inside the language model, from the attention its layer K-1 pays the "
                          "video; it runs on a patched video LLM, not on tokens alone")
    layout = video.layout
    return stable_argsort(video.attention[: layout.body].float(), descending=True)[: layout.units * keep]


METHOD = register_video_method(VideoMethod(
    "fastv", fastv_select, needs=lambda config: frozenset({"attention"}), options=(LAYER,),
    after_layer=lambda config: int(method_options(config)["fastv_layer"]),
    description="FastV: inside the language model, after layer K, the video tokens the last prompt token "
                "attended to most"))

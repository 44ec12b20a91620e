"""What the video-LLM families (Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision) share on the family interface:
recognising the transformers classes and patching through :mod:`staprune.adapters.video_tokens`.

A subclass only describes its model (:meth:`VideoLLMFamily.describe`): where the language model
is, the video placeholder id, each video's temporal units, and how to read the vision keys.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..adapters.filled_grid import packed_slice, slice_metric
from ..adapters.video_tokens import VideoLLMModel, VideoPatch, install
from ..core.config import STAConfig
from ..core.errors import ConfigError
from .hf import TransformersFamily


class VideoLLMFamily(TransformersFamily):
    """Base of the video-LLM families. Subclasses set :attr:`transformers_classes` (the
    ``*ForConditionalGeneration`` class first, then its ``*Model``) and implement :meth:`describe`."""

    video_llm = True
    block_locations = False
    tome_refusal = "video-LLM tokens are dropped before the language model, not merged"

    def inner(self, model: nn.Module) -> nn.Module:
        """The ``*Model`` (vision tower, projector, language model) of either class."""
        return model.model if hasattr(model, "lm_head") else model

    def outer(self, model: nn.Module) -> nn.Module | None:
        """The ``*ForConditionalGeneration`` (the one with the language-model head), or None for a ``*Model``."""
        return model if hasattr(model, "lm_head") else None

    def describe(self, model: nn.Module) -> VideoLLMModel:
        """Where this model keeps what the pruning hooks need."""
        raise NotImplementedError

    def patch(self, model: nn.Module, config: STAConfig) -> nn.Module:
        self.check_method(config)
        described = self.describe(model)
        if config.positions == "renumbered" and not described.one_d_positions:
            raise ConfigError(f"positions='renumbered' needs 1D positions; {self.title} uses 3D M-RoPE, where kept "
                              "tokens keep their (time, row, column) positions: use positions='original'")
        p = VideoPatch(config)
        install(p, described)
        model._staprune = p
        return model


def merged_keys(qkv: Tensor, heads: int, group: int) -> Tensor:
    """STA's key metric for tokens that merge ``group`` vision patches each: the key slice of a
    packed qkv projection ``(P, 3C)``, head-averaged ``(P, d)``, then averaged over each group of
    ``group`` consecutive patches: ``(P / group, d)``."""
    keys = slice_metric(packed_slice(qkv, 1)[None], heads)[0]
    return keys.view(-1, group, keys.shape[-1]).mean(1)

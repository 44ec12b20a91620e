"""Qwen3-VL (transformers ``Qwen3VLForConditionalGeneration`` / ``Qwen3VLModel``): as Qwen2.5-VL
(:mod:`staprune.families.qwen2_5_vl`), plus DeepStack: the vision features Qwen3-VL adds to the
first decoder layers at the visual positions are pruned with their tokens. The processor puts a
timestamp between temporal patches, so a video's placeholders are not one run; they are found in
order all the same. The vision tower has no window order.
"""

from __future__ import annotations

from torch import nn

from ..adapters.video_tokens import VideoLLMModel
from .base import FamilyModels
from .qwen2_5_vl import install_qwen_keys, qwen_layouts
from .video_llm import VideoLLMFamily


class Qwen3VLFamily(VideoLLMFamily):
    name = "qwen3_vl"
    title = "Qwen3-VL (transformers)"
    transformers_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")

    def describe(self, model: nn.Module) -> VideoLLMModel:
        inner = self.inner(model)
        return VideoLLMModel(
            inner=inner,
            language_model=inner.language_model,
            video_token_id=inner.config.video_token_id,
            layouts=qwen_layouts(inner.config.vision_config.spatial_merge_size),
            install_keys=lambda p, m: install_qwen_keys(p, m, windowed=False),
        )


FAMILY = Qwen3VLFamily()
REGISTRATION = FamilyModels(FAMILY, ())

__all__ = ["FAMILY", "REGISTRATION", "Qwen3VLFamily"]

"""Qwen2.5-VL (transformers ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen2_5_VLModel``): the video
tokens pruned before the language model (docs/families/video-llms.md). What it shares with Qwen3-VL
lives in :mod:`staprune.families.video_llms.qwen`; here: its classes, CLIP's normalisation, the
window-ordered vision tower, the tiny test model and the published configs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...data.transforms import Preprocessing
from ..base import FamilyModels, ModelEntry
from .qwen import CLIP_MEAN, CLIP_STD, QWEN_IDS, QwenVLFamily, QwenVLSpec, tiny_qwen_config


@dataclass(frozen=True)
class Qwen25VLSpec(QwenVLSpec):
    """A Qwen2.5-VL (14 px patches, 28 px merged ones)."""

    family: ClassVar[str] = "qwen2_5_vl"


class Qwen25VLFamily(QwenVLFamily):
    name = "qwen2_5_vl"
    title = "Qwen2.5-VL (transformers)"
    transformers_classes = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")
    hf_model_types = ("qwen2_5_vl",)
    config_class = "Qwen2_5_VLConfig"
    spec_class = Qwen25VLSpec
    windowed_vision = True

    def preprocessing(self, size: int) -> Preprocessing:
        return Preprocessing(size, CLIP_MEAN, CLIP_STD)

    def tiny_model(self, seed: int = 0, **overrides: Any) -> nn.Module:
        """Two text and two vision layers (64 and 32 wide), 14 px patches, windows of 56 px."""
        import transformers

        config = tiny_qwen_config(dict(fullatt_block_indexes=[1], window_size=56),
                                  dict(rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                        "rope_theta": 1e4}))
        config.update(overrides)
        torch.manual_seed(seed)
        return transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**config)).eval()


# Published configs (config.json architecture fields, in transformers 5's names); random weights.
QWEN25_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                     spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                     tokens_per_second=2, in_channels=3, hidden_act="silu")
QWEN25_ROPE = dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])


def qwen25_config(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, tied: bool) -> dict:
    """A Qwen2.5-VL config: the shared vision tower, the language model's shape."""
    text = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters=QWEN25_ROPE)
    return dict(text_config=text, vision_config=dict(QWEN25_VISION, out_hidden_size=hidden), tie_word_embeddings=tied,
                **QWEN_IDS)


FAMILY = Qwen25VLFamily()
REGISTRATION = FamilyModels(FAMILY, (
    ModelEntry("Qwen2.5-VL-3B", FAMILY.name, Qwen25VLSpec(config=qwen25_config(2048, 11008, 36, 16, 2, 151936, True)),
               description="Qwen2.5-VL-3B-Instruct, 16 frames at 448² (random weights)"),
    ModelEntry("Qwen2.5-VL-7B", FAMILY.name, Qwen25VLSpec(config=qwen25_config(3584, 18944, 28, 28, 4, 152064, False)),
               description="Qwen2.5-VL-7B-Instruct, 16 frames at 448² (random weights)"),
))

__all__ = ["FAMILY", "REGISTRATION", "Qwen25VLFamily", "Qwen25VLSpec", "qwen25_config"]

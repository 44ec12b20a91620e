"""Qwen3-VL (transformers ``Qwen3VLForConditionalGeneration`` / ``Qwen3VLModel``): as Qwen2.5-VL
(:mod:`staprune.families.qwen2_5_vl`), plus DeepStack: the vision features Qwen3-VL adds to the
first decoder layers at the visual positions are pruned with their tokens. The processor puts a
timestamp between temporal patches, so a video's placeholders are not one run; they are found in
order all the same. The vision tower has no window order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..data.transforms import Preprocessing
from .base import FamilyModels, ModelEntry
from .qwen2_5_vl import QWEN_IDS, Qwen25VLFamily, QwenVLSpec


@dataclass(frozen=True)
class Qwen3VLSpec(QwenVLSpec):
    """A Qwen3-VL: as Qwen2.5-VL's geometry (16 px patches, 32 px merged ones)."""

    family: ClassVar[str] = "qwen3_vl"


class Qwen3VLFamily(Qwen25VLFamily):
    name = "qwen3_vl"
    title = "Qwen3-VL (transformers)"
    transformers_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")
    hf_model_types = ("qwen3_vl",)
    config_class = "Qwen3VLConfig"
    spec_class = Qwen3VLSpec
    windowed_vision = False
    unit_prefix = 5  # "<0.5 seconds>" before each temporal patch: about five tokens

    def preprocessing(self, size: int) -> Preprocessing:
        return Preprocessing(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def qwen3_config(hidden: int, intermediate: int, vision: dict, tied: bool) -> dict:
    """A Qwen3-VL config (4B and 8B: 36 layers, 32 heads of 128, 8 KV heads) around a vision tower."""
    text = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                rms_norm_eps=1e-6, rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[24, 20, 20],
                                                        mrope_interleaved=True))
    vision = dict(vision, out_hidden_size=hidden, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=2304, in_channels=3, hidden_act="gelu_pytorch_tanh")
    return dict(text_config=text, vision_config=vision, tie_word_embeddings=tied, **QWEN_IDS)


FAMILY = Qwen3VLFamily()
REGISTRATION = FamilyModels(FAMILY, (
    ModelEntry("Qwen3-VL-4B", FAMILY.name, Qwen3VLSpec(config=qwen3_config(
        2560, 9728, dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                         deepstack_visual_indexes=[5, 11, 17]), tied=True)),
               description="Qwen3-VL-4B-Instruct, 16 frames at 448² (random weights)"),
    ModelEntry("Qwen3-VL-8B", FAMILY.name, Qwen3VLSpec(config=qwen3_config(
        4096, 12288, dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                          deepstack_visual_indexes=[8, 16, 24]), tied=False)),
               description="Qwen3-VL-8B-Instruct, 16 frames at 448² (random weights)"),
))

__all__ = ["FAMILY", "REGISTRATION", "Qwen3VLFamily", "Qwen3VLSpec", "qwen3_config"]

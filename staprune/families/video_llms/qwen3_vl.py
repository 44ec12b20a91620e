"""Qwen3-VL (transformers ``Qwen3VLForConditionalGeneration`` / ``Qwen3VLModel``): as Qwen2.5-VL
(what they share: :mod:`staprune.families.video_llms.qwen`), plus DeepStack: the vision features
Qwen3-VL adds to the first decoder layers at the visual positions follow their tokens (a side input
the family declares). The processor puts a timestamp between temporal patches, so a video's
placeholders are not one run; they are found in order all the same. The vision tower has no window
order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...adapters.in_language_model import Cut
from ...adapters.state import Patch
from ...adapters.video_tokens import take_columns
from ...data.transforms import Preprocessing
from ..base import FamilyModels, ModelEntry
from .qwen import QWEN_IDS, QwenVLFamily, QwenVLSpec, tiny_qwen_config


@dataclass(frozen=True)
class Qwen3VLSpec(QwenVLSpec):
    """A Qwen3-VL: as Qwen2.5-VL's geometry (16 px patches, 32 px merged ones)."""

    family: ClassVar[str] = "qwen3_vl"


def deepstack_follows_kept(kwargs: dict, keep: Tensor, index: Tensor, valid: Tensor) -> None:
    """DeepStack's features ``(visual tokens, C)`` and their mask ``(B, L)`` follow the kept tokens."""
    visual = kwargs.get("visual_pos_masks")
    if visual is None:
        return
    kept_visual = keep[visual]
    kwargs["visual_pos_masks"] = take_columns(visual, index) & valid
    kwargs["deepstack_visual_embeds"] = [e[kept_visual] for e in kwargs["deepstack_visual_embeds"]]


def deepstack_follows_cut(p: Patch, language_model: nn.Module, active: Callable[[], Cut | None]) -> None:
    """DeepStack adds features to the hidden states after its first decoder layers: after a cut inside
    the language model (FastV at a layer DeepStack still reaches), at the kept visual columns only."""
    stock = type(language_model)._deepstack_process

    def deepstack(hidden: Tensor, visual_pos_masks: Tensor, visual_embeds: Tensor) -> Tensor:
        cut = active()
        if cut is not None and hidden.shape[1] != visual_pos_masks.shape[1]:
            inputs = {"visual_pos_masks": visual_pos_masks, "deepstack_visual_embeds": [visual_embeds]}
            deepstack_follows_kept(inputs, cut.keep, cut.index, cut.valid)
            visual_pos_masks, visual_embeds = inputs["visual_pos_masks"], inputs["deepstack_visual_embeds"][0]
        return stock(language_model, hidden, visual_pos_masks, visual_embeds)

    p.override_method(language_model, "_deepstack_process", deepstack)


class Qwen3VLFamily(QwenVLFamily):
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

    def side_inputs(self):
        return deepstack_follows_kept

    def follow_cut(self):
        return deepstack_follows_cut

    def tiny_model(self, seed: int = 0, **overrides: Any) -> nn.Module:
        """Two text and two vision layers (64 and 32 wide), 16 px patches, DeepStack after vision layer 0."""
        import transformers

        config = tiny_qwen_config(dict(deepstack_visual_indexes=[0], num_position_embeddings=64, patch_size=16),
                                  dict(head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                                     "rope_theta": 1e4, "mrope_interleaved": True}))
        config.update(overrides)
        torch.manual_seed(seed)
        return transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(**config)).eval()


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

__all__ = ["FAMILY", "REGISTRATION", "Qwen3VLFamily", "Qwen3VLSpec", "deepstack_follows_cut", "deepstack_follows_kept", "qwen3_config"]

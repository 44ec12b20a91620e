"""LLaVA-OneVision (transformers ``LlavaOnevisionForConditionalGeneration`` /
``LlavaOnevisionModel``; LLaVA-Video checkpoints load as these): STA on each video's pooled
frame tokens before the language model (docs/families/video-llms.md).

A temporal unit is one frame: the vision tower's ``(S/p)²`` patches, projected and pooled 2x2 to
``ceil(S/2p)²`` tokens (196 at 384 px). The newline token after each video always stays.
The language model takes 1D positions: kept tokens keep their stock positions by default
(``positions="original"``: the text after the video stays where it was trained to be, as far from
the question's start as in the stock prompt) or are numbered consecutively
(``positions="renumbered"``: the pruned prompt reads like a shorter video). ``similarity="key"``
reads the keys of the vision layer whose output the projector takes, pooled like the features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...adapters.video_tokens import VideoInputs, VideoLLMModel, VideoPatch
from ...core.score import slice_metric
from ...core.video_methods import VideoLayout
from ...data.transforms import Preprocessing
from ..base import FamilyModels, ModelEntry
from .base import (
    FixedSideSpec,
    VideoLLMFamily,
    VideoLLMSpec,
    normalised,
    prompt_ids,
    record_received_attention,
    token_pixels,
)


def _pooled_side(inner: nn.Module) -> int:
    """Rows (= columns) of a frame's pooled tokens: the tower's patch grid pooled 2x2, rounded up."""
    side = inner.config.vision_config.image_size // inner.config.vision_config.patch_size
    return math.ceil(side / 2)


def frame_pixels(side: int):
    """Per video ``(frames, side², P)``: each pooled token's pixels, on frames average-pooled to 4x4
    pixels per token (the pooled grid does not tile the frame exactly: 384 px make 27 patches, pooled to 14)."""

    def unit_pixels(inputs: VideoInputs) -> list[torch.Tensor]:
        pixels = inputs["pixel_values_videos"]
        return list(token_pixels(pixels.flatten(0, 1), side).unflatten(0, pixels.shape[:2]))

    return unit_pixels


def install_siglip_keys(p: VideoPatch, inner: nn.Module):
    """Hook the vision layer the projector reads; the reader gives its keys of the videos pooled
    like the features (each video's frames, then a zero row for its newline)."""
    tower = inner.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers  # transformers 4 nests a vision_model
    chosen = inner.config.vision_feature_layer
    chosen = chosen[-1] if isinstance(chosen, (list, tuple)) else chosen
    # hidden_states[i] is the output of layer i - 1 (hidden_states[0]: the embeddings).
    attention = layers[chosen if chosen < 0 else chosen - 1].self_attn
    captured: dict = {}

    def keep_keys(module, args, output):
        if p.encoding_video:
            captured["keys"] = output

    def read(inputs: VideoInputs) -> torch.Tensor:
        pixels = inputs["pixel_values_videos"]
        keys = captured.pop("keys")  # (videos * frames, patches, C)
        if inner.config.vision_feature_select_strategy == "default":
            keys = keys[:, 1:]
        keys = slice_metric(keys, attention.num_heads)
        keys = inner.apply_pooling(keys).reshape(pixels.shape[0], -1, keys.shape[-1])
        newline = keys.new_zeros(keys.shape[0], 1, keys.shape[-1])
        return torch.cat([keys, newline], dim=1).flatten(0, 1)

    p.hook(attention.k_proj, keep_keys)
    return read


def install_siglip_attention(p: VideoPatch, inner: nn.Module):
    """Tap the vision layer the projector reads; the reader gives the attention each token received
    there (heads and queries averaged: SigLIP has no [CLS]; each frame attends within itself),
    pooled like the features, each video's frames then a zero for its newline."""
    tower = inner.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    chosen = inner.config.vision_feature_layer
    chosen = chosen[-1] if isinstance(chosen, (list, tuple)) else chosen
    calls = record_received_attention(p, layers[chosen if chosen < 0 else chosen - 1].self_attn)

    def read(inputs: VideoInputs) -> torch.Tensor:
        pixels = inputs["pixel_values_videos"]
        received = torch.cat(calls)  # (videos * frames, patches)
        calls.clear()
        if inner.config.vision_feature_select_strategy == "default":
            received = received[:, 1:]
        pooled = inner.apply_pooling(received[..., None]).reshape(pixels.shape[0], -1)
        return torch.cat([pooled, pooled.new_zeros(pooled.shape[0], 1)], dim=1).flatten()

    return read


@dataclass(frozen=True)
class LlavaOnevisionSpec(FixedSideSpec):
    """A LLaVA-OneVision: every frame is resized to the vision tower's side (384 px)."""

    family: ClassVar[str] = "llava_onevision"
    model_name: ClassVar[str] = "LLaVA-OneVision"


def siglip_flops(spec: VideoLLMSpec) -> dict[str, float]:
    """Multiply-adds of LLaVA-OneVision's SigLIP tower and projector on one video (each frame
    alone; the 2x2 pooling after the projector is interpolation, not counted)."""
    v, text = spec.vision, spec.text
    c, patch = v["hidden_size"], v["patch_size"]
    tokens = (v["image_size"] // patch) ** 2
    per_frame_blocks = v["num_hidden_layers"] * (tokens * (4 * c * c + 2 * c * v["intermediate_size"]) + 2 * tokens**2 * c)
    wide = text["hidden_size"]
    parts = {
        "vision_embed": spec.frames * tokens * 3 * patch * patch * c,
        "vision_blocks": spec.frames * per_frame_blocks,
        "vision_merger": spec.frames * tokens * (c * wide + wide * wide),
    }
    if v.get("vision_use_head", True):  # SigLIP's attention-pooling head (its output unused; the checkpoints drop it)
        parts["vision_head"] = spec.frames * (2 * c * c + 2 * tokens * c * c + 2 * tokens * c + 2 * c * v["intermediate_size"])
    return parts


class LlavaOnevisionFamily(VideoLLMFamily):
    name = "llava_onevision"
    title = "LLaVA-OneVision (transformers)"
    transformers_classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    hf_model_types = ("llava_onevision",)
    config_class = "LlavaOnevisionConfig"
    spec_class = LlavaOnevisionSpec
    fixed_size = True

    def layout(self, spec: VideoLLMSpec) -> VideoLayout:
        side = math.ceil(spec.vision["image_size"] // spec.vision["patch_size"] / 2)
        return VideoLayout(spec.frames, side, side, tail=1)

    def video_inputs(self, model: nn.Module, frames: torch.Tensor, spec: VideoLLMSpec,
                     prep: Preprocessing | None = None) -> dict[str, torch.Tensor]:
        pixels = normalised(frames, prep or self.preprocessing(spec.size))
        ids = torch.tensor([prompt_ids([self.inner(model).config.video_token_id] * self.layout(spec).tokens, spec)])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels[None]}

    def vision_flops(self, spec: VideoLLMSpec) -> dict[str, float]:
        return siglip_flops(spec)

    def tiny_model(self, seed: int = 0, **overrides: Any) -> nn.Module:
        """Two text and two vision layers (64 and 32 wide), SigLIP at 112 px in 14 px patches (4x4 pooled tokens)."""
        import transformers

        config = dict(text_config=dict(model_type="qwen2", vocab_size=100, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
                      vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, image_size=112, patch_size=14),
                      image_token_index=10, video_token_index=11)
        config.update(overrides)
        torch.manual_seed(seed)
        return transformers.LlavaOnevisionForConditionalGeneration(transformers.LlavaOnevisionConfig(**config)).eval()

    def describe(self, model: nn.Module) -> VideoLLMModel:
        inner = self.inner(model)
        side = _pooled_side(inner)

        def layouts(inputs: VideoInputs) -> list[VideoLayout]:
            pixels = inputs["pixel_values_videos"]
            return [VideoLayout(pixels.shape[1], side, side, tail=1)] * pixels.shape[0]

        return VideoLLMModel(
            inner=inner,
            outer=self.outer(model),
            language_model=inner.language_model,
            video_token_id=inner.config.video_token_id,
            layouts=layouts,
            install_keys=install_siglip_keys,
            install_attention=install_siglip_attention,
            unit_pixels=frame_pixels(side),
            one_d_positions=True,
        )


# SigLIP so400m without its last layer and pooling head, as the checkpoints were converted.
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
              num_attention_heads=16, image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh",
              layer_norm_eps=1e-6, vision_use_head=False)


def llava_onevision_config(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
                           tied: bool) -> dict:
    """A LLaVA-OneVision config: SigLIP, a Qwen2 language model of this shape."""
    text = dict(model_type="qwen2", hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters=dict(rope_type="default", rope_theta=1e6))
    return dict(text_config=text, vision_config=dict(SIGLIP), image_token_index=151646, video_token_index=151647,
                vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu",
                tie_word_embeddings=tied)


FAMILY = LlavaOnevisionFamily()
REGISTRATION = FamilyModels(FAMILY, (
    ModelEntry("LLaVA-OneVision-0.5B", FAMILY.name, LlavaOnevisionSpec(
        size=384, config=llava_onevision_config(896, 4864, 24, 14, 2, 152000, True)),
               description="llava-onevision-qwen2-0.5b-ov, 16 frames at 384² (random weights)"),
    ModelEntry("LLaVA-OneVision-7B", FAMILY.name, LlavaOnevisionSpec(
        size=384, config=llava_onevision_config(3584, 18944, 28, 28, 4, 152128, False)),
               description="llava-onevision-qwen2-7b-ov, 16 frames at 384² (random weights)"),
))

__all__ = ["FAMILY", "REGISTRATION", "LlavaOnevisionFamily", "LlavaOnevisionSpec", "llava_onevision_config", "frame_pixels", "install_siglip_keys"]

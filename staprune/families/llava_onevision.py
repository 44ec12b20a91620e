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

import torch
from torch import nn

from ..adapters.filled_grid import slice_metric
from ..adapters.video_tokens import VideoLayout, VideoLLMModel, VideoPatch
from ..core.baselines import unit_change
from .base import FamilyModels
from .video_llm import VideoLLMFamily


def _pooled_side(inner: nn.Module) -> int:
    """Rows (= columns) of a frame's pooled tokens: the tower's patch grid pooled 2x2, rounded up."""
    side = inner.config.vision_config.image_size // inner.config.vision_config.patch_size
    return math.ceil(side / 2)


def frame_pixel_change(side: int):
    """Per video ``(frames, side²)``: each pooled token's pixel change since the previous frame, on
    frames average-pooled to 4x4 pixels per token (the pooled grid does not tile the frame exactly:
    384 px make 27 patches, pooled to 14)."""

    def pixel_change(pixels: torch.Tensor, grid: torch.Tensor | None) -> list[torch.Tensor]:
        videos, frames, channels = pixels.shape[:3]
        small = nn.functional.adaptive_avg_pool2d(pixels.flatten(0, 1).float(), 4 * side)
        per_token = small.view(videos, frames, channels, side, 4, side, 4).permute(0, 1, 3, 5, 2, 4, 6)
        return [unit_change(video) for video in per_token.reshape(videos, frames, side * side, -1)]

    return pixel_change


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

    def read(pixels: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor:
        keys = captured.pop("keys")  # (videos * frames, patches, C)
        if inner.config.vision_feature_select_strategy == "default":
            keys = keys[:, 1:]
        keys = slice_metric(keys, attention.num_heads)
        keys = inner.apply_pooling(keys).reshape(pixels.shape[0], -1, keys.shape[-1])
        newline = keys.new_zeros(keys.shape[0], 1, keys.shape[-1])
        return torch.cat([keys, newline], dim=1).flatten(0, 1)

    p.hook(attention.k_proj, keep_keys)
    return read


class LlavaOnevisionFamily(VideoLLMFamily):
    name = "llava_onevision"
    title = "LLaVA-OneVision (transformers)"
    transformers_classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")

    def describe(self, model: nn.Module) -> VideoLLMModel:
        inner = self.inner(model)
        side = _pooled_side(inner)

        def layouts(pixels: torch.Tensor, grid: torch.Tensor | None) -> list[VideoLayout]:
            return [VideoLayout(pixels.shape[1], side, side, tail=1)] * pixels.shape[0]

        return VideoLLMModel(
            inner=inner,
            outer=self.outer(model),
            language_model=inner.language_model,
            video_token_id=inner.config.video_token_id,
            layouts=layouts,
            install_keys=install_siglip_keys,
            pixel_change=frame_pixel_change(side),
            one_d_positions=True,
        )


FAMILY = LlavaOnevisionFamily()
REGISTRATION = FamilyModels(FAMILY, ())

__all__ = ["FAMILY", "REGISTRATION", "LlavaOnevisionFamily", "frame_pixel_change", "install_siglip_keys"]

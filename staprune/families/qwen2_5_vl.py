"""Qwen2.5-VL (transformers ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen2_5_VLModel``): STA on
each video's merged tokens before the language model (docs/families/video-llms.md).

A temporal unit is one temporal patch (two frames) of ``(h/2)·(w/2)`` merged tokens
(``video_grid_thw`` gives ``t, h, w`` per video). Kept tokens keep their stock 3D M-RoPE positions
(time, row, column), and the text after the video keeps its stock positions too.
``similarity="key"`` reads the vision tower's last-block keys (before rotary), averaged over the
2x2 patches each token merges and put back in token order (the tower runs in window order).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..adapters.video_tokens import VideoLayout, VideoLLMModel, VideoPatch
from ..core.baselines import unit_change
from .base import FamilyModels
from .video_llm import VideoLLMFamily, merged_keys


def qwen_layouts(merge: int):
    """``video_grid_thw`` ``(V, 3)`` -> one layout per video: ``t`` units of ``(h/merge) x (w/merge)`` tokens."""

    def layouts(pixels: torch.Tensor, grid: torch.Tensor | None) -> list[VideoLayout]:
        return [VideoLayout(int(t), int(h) // merge, int(w) // merge) for t, h, w in grid.tolist()]

    return layouts


def qwen_pixel_change(merge: int):
    """Per video ``(t, h·w / merge²)``: each merged token's pixel change between temporal patches.

    Qwen's processor flattens a video's patches as ``(t, h/merge, w/merge, merge, merge)`` rows of
    ``channels x temporal_patch x patch²`` values, so each token's pixels are ``merge²`` consecutive rows.
    """

    def pixel_change(pixels: torch.Tensor, grid: torch.Tensor | None) -> list[torch.Tensor]:
        changes, start = [], 0
        for t, h, w in grid.tolist():
            rows = pixels[start : start + t * h * w].float()
            changes.append(unit_change(rows.reshape(t, h * w // merge**2, -1)))
            start += t * h * w
        return changes

    return pixel_change


def install_qwen_keys(p: VideoPatch, inner: nn.Module, windowed: bool):
    """Hook the vision tower's last block; the reader gives its keys of the videos, one row per
    merged token (``windowed``: the tower runs in Qwen2.5-VL's window order)."""
    visual = inner.visual
    attention = visual.blocks[-1].attn
    captured: dict = {}

    def keep_qkv(module, args, output):
        if p.encoding_video:
            captured["qkv"] = output

    def read(pixels: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor:
        keys = merged_keys(captured.pop("qkv"), attention.num_heads, visual.spatial_merge_size**2)
        if windowed:  # rows are in window order; the tokens the language model sees are not
            keys = keys[torch.argsort(_window_index(visual, grid))]
        return keys

    p.hook(attention.qkv, keep_qkv)
    return read


def _window_index(visual: nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
    """The order Qwen2.5-VL's vision tower runs merged tokens in (what its forward computes)."""
    if hasattr(visual, "get_window_index"):  # transformers < 5
        return visual.get_window_index(grid_thw)[0]
    from transformers.vision_utils import get_vision_window_index

    return get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                   window_size=visual.window_size, patch_size=visual.patch_size)[0]


class Qwen25VLFamily(VideoLLMFamily):
    """Qwen2.5-VL; Qwen3-VL differs only in its classes and a vision tower without window order.

    Attributes:
        windowed_vision: the vision tower runs merged tokens in window order (keys are put back
            in token order).
    """

    name = "qwen2_5_vl"
    title = "Qwen2.5-VL (transformers)"
    transformers_classes = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")
    windowed_vision: ClassVar[bool] = True

    def describe(self, model: nn.Module) -> VideoLLMModel:
        inner = self.inner(model)
        return VideoLLMModel(
            inner=inner,
            outer=self.outer(model),
            language_model=inner.language_model,
            video_token_id=inner.config.video_token_id,
            layouts=qwen_layouts(inner.config.vision_config.spatial_merge_size),
            pixel_change=qwen_pixel_change(inner.config.vision_config.spatial_merge_size),
            install_keys=lambda p, m: install_qwen_keys(p, m, windowed=self.windowed_vision),
        )


FAMILY = Qwen25VLFamily()
REGISTRATION = FamilyModels(FAMILY, ())

__all__ = ["FAMILY", "REGISTRATION", "Qwen25VLFamily", "install_qwen_keys", "qwen_layouts", "qwen_pixel_change"]

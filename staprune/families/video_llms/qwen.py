"""What the Qwen video LLMs (Qwen2.5-VL, Qwen3-VL) share: the base of both families, written once
(sibling families never import each other). docs/families/video-llms.md.

A video is ``pixel_values_videos`` rows with its ``video_grid_thw`` ``(t, h, w)``, encoded by
``get_video_features``. A temporal unit is one temporal patch (two frames) of ``(h/2)·(w/2)``
merged tokens. Kept tokens keep their stock 3D M-RoPE positions (time, row, column), and the text
after the video keeps its stock positions too. ``similarity="key"`` reads the vision tower's
last-block keys (before rotary), averaged over the 2x2 patches each token merges, in token order
(Qwen2.5-VL's tower runs in window order: its keys are put back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ...adapters.video_tokens import VideoInputs, VideoLLMModel, VideoPatch
from ...core.errors import ConfigError
from ...core.video_methods import VideoLayout
from ...data.transforms import Preprocessing
from .base import (
    VideoLLMFamily,
    VideoLLMSpec,
    merged_keys,
    normalised,
    prompt_ids,
    record_received_attention,
    text_ids,
)

# Placeholder ids of the tiny test models (image, video, vision start, vision end).
TINY_IDS = dict(image_token_id=10, video_token_id=11, vision_start_token_id=12, vision_end_token_id=13)
# Published ids (every Qwen2.5-VL and Qwen3-VL checkpoint).
QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)

# Qwen2.5-VL's processor normalises with OpenAI CLIP's statistics (Qwen3-VL's with 0.5).
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class QwenVLSpec(VideoLLMSpec):
    """A Qwen video LLM: frames come in temporal patches, the side in merged patches (Qwen2.5-VL:
    28 px at 14 px patches; Qwen3-VL: 32 px at 16 px)."""

    def with_input(self, frames: int | None = None, size: int | None = None) -> QwenVLSpec:
        spec = super().with_input(frames, size)
        temporal, cell = spec.vision["temporal_patch_size"], spec.vision["patch_size"] * spec.vision["spatial_merge_size"]
        if spec.frames % temporal:
            raise ConfigError(f"this model takes frames in pairs ({temporal} per temporal patch): {spec.frames} frames "
                              f"is not a multiple of {temporal}; use {spec.frames + temporal - spec.frames % temporal}")
        if spec.size % cell:
            lower, upper = spec.size // cell * cell, (spec.size // cell + 1) * cell
            raise ConfigError(f"an input side of {spec.size} pixels is not a multiple of this model's {cell}-pixel "
                              f"merged patches; use {' or '.join(str(v) for v in (lower, upper) if v)}")
        return spec

    @property
    def grid(self) -> tuple[int, int, int]:
        """``(t, h, w)``: temporal patches and patch rows/columns of the video (``video_grid_thw``)."""
        patch = self.vision["patch_size"]
        return self.frames // self.vision["temporal_patch_size"], self.size // patch, self.size // patch


def qwen_layouts(merge: int):
    """``video_grid_thw`` ``(V, 3)`` -> one layout per video: ``t`` units of ``(h/merge) x (w/merge)`` tokens."""

    def layouts(inputs: VideoInputs) -> list[VideoLayout]:
        return [VideoLayout(int(t), int(h) // merge, int(w) // merge) for t, h, w in inputs["video_grid_thw"].tolist()]

    return layouts


def qwen_unit_pixels(merge: int):
    """Per video ``(t, h·w / merge², P)``: each merged token's pixels, per temporal patch.

    Qwen's processor flattens a video's patches as ``(t, h/merge, w/merge, merge, merge)`` rows of
    ``channels x temporal_patch x patch²`` values, so each token's pixels are ``merge²`` consecutive rows.
    """

    def unit_pixels(inputs: VideoInputs) -> list[torch.Tensor]:
        pixels, videos, start = inputs["pixel_values_videos"], [], 0
        for t, h, w in inputs["video_grid_thw"].tolist():
            videos.append(pixels[start : start + t * h * w].float().reshape(t, h * w // merge**2, -1))
            start += t * h * w
        return videos

    return unit_pixels


def install_qwen_keys(p: VideoPatch, inner: nn.Module, windowed: bool):
    """Hook the vision tower's last block; the reader gives its keys of the videos, one row per
    merged token (``windowed``: the tower runs in Qwen2.5-VL's window order)."""
    visual = inner.visual
    attention = visual.blocks[-1].attn
    captured: dict = {}

    def keep_qkv(module, args, output):
        if p.encoding_video:
            captured["qkv"] = output

    def read(inputs: VideoInputs) -> torch.Tensor:
        keys = merged_keys(captured.pop("qkv"), attention.num_heads, visual.spatial_merge_size**2)
        if windowed:  # rows are in window order; the tokens the language model sees are not
            keys = keys[torch.argsort(_window_index(visual, inputs["video_grid_thw"]))]
        return keys

    p.hook(attention.qkv, keep_qkv)
    return read


def install_qwen_attention(p: VideoPatch, inner: nn.Module, windowed: bool):
    """Tap the vision tower's last block; the reader gives the attention each merged token received
    there (heads and queries averaged: Qwen's tower has no [CLS]; each call attends within one
    temporal patch, or one window in a windowed block), the mean of its merged patches, in the order
    the language model sees them."""
    visual = inner.visual
    calls = record_received_attention(p, visual.blocks[-1].attn)

    def read(inputs: VideoInputs) -> torch.Tensor:
        received = torch.cat([call.reshape(-1) for call in calls])  # patches, in the order the tower ran them
        calls.clear()
        merged = received.view(-1, visual.spatial_merge_size**2).mean(1)
        if windowed:
            merged = merged[torch.argsort(_window_index(visual, inputs["video_grid_thw"]))]
        return merged

    return read


def _window_index(visual: nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
    """The order Qwen2.5-VL's vision tower runs merged tokens in (what its forward computes)."""
    if hasattr(visual, "get_window_index"):  # transformers < 5
        return visual.get_window_index(grid_thw)[0]
    from transformers.vision_utils import get_vision_window_index

    return get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                   window_size=visual.window_size, patch_size=visual.patch_size)[0]


def patchify(frames: Tensor, temporal: int, patch: int, merge: int) -> Tensor:
    """Frames ``(T, C, H, W)`` -> ``pixel_values_videos`` rows ``(T/temporal · H/patch · W/patch,
    C·temporal·patch²)`` in Qwen's order: temporal patch, merged row, merged column, then the
    ``merge x merge`` patches of a merged token (the layout of transformers' Qwen2-VL video processor)."""
    t, c, h, w = frames.shape
    x = frames.reshape(t // temporal, temporal, c, h // patch // merge, merge, patch, w // patch // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t // temporal * (h // patch) * (w // patch), c * temporal * patch * patch)


def window_attention_flops(h: int, w: int, merge: int, window: int, width: int) -> float:
    """Attention multiply-adds ``2·n²·C`` summed over Qwen2.5-VL's windows of one temporal patch of
    ``h x w`` patches: windows of ``window`` merged tokens a side, tiled from the top left."""

    def sides(n: int) -> list[int]:
        return [min(window, n - i) for i in range(0, n, window)]

    return sum(2 * (r * c * merge * merge) ** 2 * width for r in sides(h // merge) for c in sides(w // merge))


def qwen_vision_tower_flops(spec: QwenVLSpec, windowed: bool) -> dict[str, float]:
    """Multiply-adds of Qwen2.5-VL's (``windowed``) or Qwen3-VL's vision tower on one video."""
    v = spec.vision
    t, h, w = spec.grid
    c, patches, merge = v["hidden_size"], t * h * w, v["spatial_merge_size"]
    depth, inner = v["depth"], v["intermediate_size"]
    frame_attention = t * 2 * (h * w) ** 2 * c  # full blocks attend within each temporal patch
    if windowed:
        full = len(v["fullatt_block_indexes"])
        window = v["window_size"] // merge // v["patch_size"]
        attention = full * frame_attention + (depth - full) * t * window_attention_flops(h, w, merge, window, c)
        mlp, mergers = 3 * c * inner, 1  # a gated MLP; one merger
    else:
        attention = depth * frame_attention
        mlp, mergers = 2 * c * inner, 1 + len(v["deepstack_visual_indexes"])  # the DeepStack mergers too
    merged, wide = patches // merge**2, c * merge**2
    return {
        "vision_embed": patches * 3 * v["temporal_patch_size"] * v["patch_size"] ** 2 * c,
        "vision_blocks": depth * patches * (4 * c * c + mlp) + attention,
        "vision_merger": mergers * merged * (wide * wide + wide * v["out_hidden_size"]),
    }


def tiny_qwen_config(vision: dict, text: dict) -> dict:
    """The tests' tiny Qwen config around a family's vision and text fields (ids below a vocabulary of 100)."""
    return dict(text_config=dict(dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2), **text),
                vision_config=dict(dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                        out_hidden_size=64), **vision),
                **TINY_IDS)


def qwen_video_inputs(model: nn.Module, frames: Tensor, spec: QwenVLSpec, prep: Preprocessing,
                      unit_prefix: int = 0) -> dict[str, Tensor]:
    """One prompt around one video laid out as Qwen's processors do; with ``unit_prefix`` timestamp
    tokens (Qwen3-VL), vision start/end around every temporal patch, else around the video."""
    cfg, v = model.config, spec.vision
    t, h, w = spec.grid
    merge = v["spatial_merge_size"]
    per_unit = h * w // merge**2
    start, end, video = cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.video_token_id
    if unit_prefix:
        ids = []
        for unit in range(t):
            ids += text_ids(spec, unit_prefix, start=100 * unit) + [start] + [video] * per_unit + [end]
    else:
        ids = [start] + [video] * (t * per_unit) + [end]
    ids = torch.tensor([prompt_ids(ids, spec)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == video).long() * 2,
            "pixel_values_videos": patchify(normalised(frames, prep), v["temporal_patch_size"], v["patch_size"], merge),
            "video_grid_thw": torch.tensor([[t, h, w]])}


class QwenVLFamily(VideoLLMFamily):
    """Base of the Qwen families; Qwen2.5-VL and Qwen3-VL differ in their classes, the vision tower's
    window order, the timestamps between temporal patches and Qwen3-VL's DeepStack side inputs.

    Attributes:
        windowed_vision: the vision tower runs merged tokens in window order (keys are put back
            in token order).
        unit_prefix: timestamp tokens before each temporal patch (Qwen3-VL: "<t seconds>").
    """

    spec_class = QwenVLSpec
    windowed_vision: ClassVar[bool] = True
    unit_prefix: ClassVar[int] = 0

    def side_inputs(self):
        """What follows the kept tokens besides the embeddings (Qwen3-VL: DeepStack), or None."""
        return None

    def follow_cut(self):
        """What makes inputs added inside the language model follow a cut inside it (Qwen3-VL:
        DeepStack), or None."""
        return None

    def layout(self, spec: QwenVLSpec) -> VideoLayout:
        t, h, w = spec.grid
        merge = spec.vision["spatial_merge_size"]
        return VideoLayout(t, h // merge, w // merge)

    def video_extra_tokens(self, spec: QwenVLSpec) -> int:
        return spec.grid[0] * (self.unit_prefix + 2) if self.unit_prefix else 2

    def video_inputs(self, model: nn.Module, frames: Tensor, spec: QwenVLSpec,
                     prep: Preprocessing | None = None) -> dict[str, Tensor]:
        prep = prep or self.preprocessing(spec.size)
        return qwen_video_inputs(self.inner(model), frames, spec, prep, self.unit_prefix)

    def vision_flops(self, spec: QwenVLSpec) -> dict[str, float]:
        return qwen_vision_tower_flops(spec, windowed=self.windowed_vision)

    def describe(self, model: nn.Module) -> VideoLLMModel:
        inner = self.inner(model)
        return VideoLLMModel(
            inner=inner,
            outer=self.outer(model),
            language_model=inner.language_model,
            video_token_id=inner.config.video_token_id,
            layouts=qwen_layouts(inner.config.vision_config.spatial_merge_size),
            unit_pixels=qwen_unit_pixels(inner.config.vision_config.spatial_merge_size),
            install_keys=lambda p, m: install_qwen_keys(p, m, windowed=self.windowed_vision),
            install_attention=lambda p, m: install_qwen_attention(p, m, windowed=self.windowed_vision),
            side_inputs=self.side_inputs(),
            follow_cut=self.follow_cut(),
        )


__all__ = ["CLIP_MEAN", "CLIP_STD", "QWEN_IDS", "TINY_IDS", "QwenVLFamily", "QwenVLSpec", "install_qwen_attention", "install_qwen_keys", "patchify",
           "qwen_layouts", "qwen_unit_pixels", "qwen_video_inputs", "qwen_vision_tower_flops", "tiny_qwen_config"]

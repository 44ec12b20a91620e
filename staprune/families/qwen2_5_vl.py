"""Qwen2.5-VL (transformers ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen2_5_VLModel``): STA on
each video's merged tokens before the language model (docs/families/video-llms.md).

A temporal unit is one temporal patch (two frames) of ``(h/2)·(w/2)`` merged tokens
(``video_grid_thw`` gives ``t, h, w`` per video). Kept tokens keep their stock 3D M-RoPE positions
(time, row, column), and the text after the video keeps its stock positions too.
``similarity="key"`` reads the vision tower's last-block keys (before rotary), averaged over the
2x2 patches each token merges and put back in token order (the tower runs in window order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..adapters.video_tokens import VideoLayout, VideoLLMModel, VideoPatch
from ..core.baselines import unit_change
from ..core.errors import ConfigError
from ..data.transforms import Preprocessing
from .base import FamilyModels, ModelEntry
from .video_llm import VideoLLMFamily, VideoLLMSpec, merged_keys, normalised, prompt_ids, text_ids

# Qwen2.5-VL's processor normalises with OpenAI CLIP's statistics (Qwen3-VL's with 0.5).
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class QwenVLSpec(VideoLLMSpec):
    """A Qwen2.5-VL: frames come in temporal patches, the side in merged patches (28 px at 14 px patches)."""

    family: ClassVar[str] = "qwen2_5_vl"

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


class Qwen25VLFamily(VideoLLMFamily):
    """Qwen2.5-VL; Qwen3-VL differs only in its classes and a vision tower without window order.

    Attributes:
        windowed_vision: the vision tower runs merged tokens in window order (keys are put back
            in token order).
    """

    name = "qwen2_5_vl"
    title = "Qwen2.5-VL (transformers)"
    transformers_classes = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")
    hf_model_types = ("qwen2_5_vl",)
    config_class = "Qwen2_5_VLConfig"
    spec_class = QwenVLSpec
    windowed_vision: ClassVar[bool] = True
    unit_prefix: ClassVar[int] = 0  # timestamp tokens before each temporal patch (Qwen3-VL: "<t seconds>")

    def preprocessing(self, size: int) -> Preprocessing:
        return Preprocessing(size, CLIP_MEAN, CLIP_STD)

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
            pixel_change=qwen_pixel_change(inner.config.vision_config.spatial_merge_size),
            install_keys=lambda p, m: install_qwen_keys(p, m, windowed=self.windowed_vision),
        )


# Published configs (config.json architecture fields, in transformers 5's names); random weights.
QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
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
    ModelEntry("Qwen2.5-VL-3B", FAMILY.name, QwenVLSpec(config=qwen25_config(2048, 11008, 36, 16, 2, 151936, True)),
               description="Qwen2.5-VL-3B-Instruct, 16 frames at 448² (random weights)"),
    ModelEntry("Qwen2.5-VL-7B", FAMILY.name, QwenVLSpec(config=qwen25_config(3584, 18944, 28, 28, 4, 152064, False)),
               description="Qwen2.5-VL-7B-Instruct, 16 frames at 448² (random weights)"),
))

__all__ = ["FAMILY", "QWEN_IDS", "REGISTRATION", "Qwen25VLFamily", "QwenVLSpec", "patchify", "qwen25_config", "install_qwen_keys", "qwen_layouts", "qwen_pixel_change"]

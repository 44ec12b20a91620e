"""TimeSformer (Hugging Face ``TimesformerModel`` / ``TimesformerForVideoClassification``), divided
space-time attention, pruned the way the paper prunes Video Swin.

Divided attention needs full grids: each block first attends along time at every spatial position
(``N`` sequences of ``T`` tokens), then within every frame (``T`` sequences of ``1 + N`` tokens, the
CLS token copied into each). Dropping tokens breaks both grids, so (paper Sec. 4.1, Video Swin):

* the residual stream holds only the kept tokens (and CLS); LayerNorms, the qkv projections, the
  output projections, ``temporal_dense`` and the MLP run on kept tokens only;
* for each of the two attentions, every dropped position takes a copy of the qkv of its
  **nearest kept token in the same frame** (:func:`staprune.adapters.filled_grid.nearest_kept_fill`),
  attention runs on the full grid, and only kept positions' outputs are used (the CLS token's
  per-frame outputs are averaged over frames, as in the stock block).

Why this is sound: no position is lost from either attention's view; a dropped position's keys and
values stand in for it as its neighbour's do in Video Swin's windows; the kept tokens' own
computation is the stock block's. STA prunes after blocks 0, L/3, 2L/3 with the columnar schedule
(tubelet-frames = frames), scoring with the block's spatial attention keys; the CLS token is never
dropped and takes no part in scoring.

Token layout: HF keeps the patch tokens space-major (index ``s * T + t``); staprune reports and
selects in its usual ``t * N + s`` order (the block output is reordered before the first prune).
Only ``attention_type="divided_space_time"`` (every released checkpoint) is pruned; the other two
types get a clear error. The input must match the config (its blocks reshape with
``config.num_frames`` and ``config.image_size``).

Registry: ``TimeSformer-B`` (8x224²), ``TimeSformer-HR`` (16x448²), ``TimeSformer-L`` (96x224²),
12 blocks of 768. Protocol: one temporal clip x 3 crops (the TimeSformer paper), 8 frames at
sampling rate 32 for K400.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters.filled_grid import fill_grid, nearest_kept_fill, qkv_part
from ..adapters.state import Patch, current_stage, final_kept
from ..core.config import STAConfig
from ..core.errors import ConfigError
from ..core.flops import FlopCount, add_parts, metric_dim, sta_selection_flops, tokens_per_block
from ..core.score import gather_tokens, packed_slice, slice_metric
from ..data.sampling import ViewProtocol
from .base import (
    FamilyModels,
    ModelEntry,
    Spec,
    StageGrid,
    check_fixed_clip,
    scaled_levels,
    side,
)
from .hf import HuggingFaceFamily


@dataclass(frozen=True)
class TimesformerSpec(Spec):
    """A TimeSformer with divided space-time attention: ``frames`` frames of ``(size/patch)²`` tokens."""

    family = "timesformer"
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    mlp_hidden: int = 3072
    frames: int = 8
    size: int = 224
    patch: int = 16
    num_classes: int = 400
    in_chans: int = 3

    @property
    def tubelet(self) -> int:
        """Input frames per temporal token position: one (each frame is its own grid)."""
        return 1

    @property
    def grid_side(self) -> int:
        return self.size // self.patch

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_side**2


# --- tensors of a divided block -----------------------------------------------------------------
def space_major_to_time_major(tokens: Tensor, frames: int) -> Tensor:
    """Patch tokens ``(B, N*T, C)`` in HF's ``s * T + t`` order -> ``t * N + s`` order."""
    bsz, length, channels = tokens.shape
    return tokens.view(bsz, length // frames, frames, channels).transpose(1, 2).reshape(bsz, length, channels)


def _attend(attn: nn.Module, qkv: Tensor) -> Tensor:
    """``TimesformerSelfAttention`` on packed ``qkv`` rows ``(S, n, 3C)`` -> context ``(S, n, C)``
    (before the output projection), through fused attention."""
    seqs, n, three_c = qkv.shape
    heads = attn.num_heads
    q, k, v = qkv.view(seqs, n, 3, heads, three_c // (3 * heads)).permute(2, 0, 3, 1, 4)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=attn.scale)
    return out.transpose(1, 2).reshape(seqs, n, three_c // 3)


def pruned_block(layer: nn.Module, x: Tensor, source: Tensor, fill: Tensor, frames: int,
                 tokens_per_frame: int) -> tuple[Tensor, Tensor]:
    """One divided space-time block on kept tokens (the module docstring's recipe).

    Args:
        x: ``(B, 1 + K, C)``: CLS, then the kept tokens; ``source`` ``(B, K)`` their original
            ``t * N + s`` positions; ``fill`` ``(B, T*N)`` the kept token each grid position takes.
    Returns:
        the block output ``(B, 1 + K, C)`` and the spatial attention's qkv of the kept tokens
        ``(B, K, 3C)`` (the similarity metric when this block prunes).
    """
    bsz, _, channels = x.shape
    t, n = frames, tokens_per_frame
    cls, tokens = x[:, :1], x[:, 1:]
    # Every grid is gathered straight into the layout its attention reads (one copy of the qkv rows),
    # and kept outputs are read straight out of it.
    frame, cell = source // n, source % n
    # Temporal attention: N sequences of T tokens (space-major), dropped positions copy their nearest kept token.
    temporal = layer.temporal_attention
    qkv = temporal.attention.qkv(layer.temporal_layernorm(tokens))
    space_major_fill = fill.view(bsz, t, n).transpose(1, 2).reshape(bsz, n * t)
    out = _attend(temporal.attention, fill_grid(qkv, space_major_fill).view(bsz * n, t, -1))
    out = temporal.output(gather_tokens(out.view(bsz, n * t, channels), cell * t + frame))
    tokens = tokens + layer.temporal_dense(layer.drop_path(out))
    # Spatial attention: T sequences of 1 + N tokens (CLS copied into each frame): rows 0 (CLS), 1.. (kept).
    spatial = layer.attention
    qkv = spatial.attention.qkv(layer.layernorm_before(tokens))
    qkv_cls = spatial.attention.qkv(layer.layernorm_before(cls))
    with_cls = torch.cat([fill.new_zeros(bsz, t, 1), fill.view(bsz, t, n) + 1], dim=2).view(bsz, t * (1 + n))
    out = _attend(spatial.attention, fill_grid(torch.cat([qkv_cls, qkv], dim=1), with_cls).view(bsz * t, 1 + n, -1))
    cls_out = layer.drop_path(spatial.output(out[:, :1])).view(bsz, t, channels).mean(1, keepdim=True)
    kept_out = gather_tokens(out.view(bsz, t * (1 + n), channels), source + frame + 1)
    kept_out = layer.drop_path(spatial.output(kept_out))
    hidden = torch.cat([cls + cls_out, tokens + kept_out], dim=1)
    out = layer.output(layer.intermediate(layer.layernorm_after(hidden)))
    return hidden + layer.drop_path(out), qkv


def _metric(p: Patch, qkv: Tensor, heads: int) -> Tensor | None:
    """Head-averaged key / query / value ``(B, K, d)`` from packed spatial qkv ``(B, K, 3C)``."""
    part = qkv_part(p.config)
    return None if part is None else slice_metric(packed_slice(qkv, part), heads)


def _make_layer(p: Patch, index: int, frames: int, grid_hw: tuple[int, int], heads: int, captured: dict):
    """A block's forward: stock until the first prune, the pruned block after; prune after it if
    this block is a stage."""
    n = grid_hw[0] * grid_hw[1]

    def forward(self, hidden_states: Tensor, output_attentions: bool = False):
        state = p.state
        stage = current_stage(state, index)
        if not state.kept:  # nothing pruned yet: the stock block on the full sequence
            out = type(self).forward(self, hidden_states, output_attentions)
            if stage is None or not stage.r:
                return out
            tokens = space_major_to_time_major(out[0][:, 1:], frames)
            cls = out[0][:, :1]
            qkv = captured.pop("qkv", None)
            if qkv is not None:  # (B*T, 1 + N, 3C), frame-major: patch rows are already t * N + s
                qkv = qkv[:, 1:].reshape(tokens.shape[0], frames * n, -1)
        else:
            if output_attentions:
                raise ConfigError("output_attentions is not available from a pruned TimeSformer block")
            hidden, qkv = pruned_block(self, hidden_states, state.source, state.fill, frames, n)
            if stage is None or not stage.r:
                return (hidden,)
            cls, tokens = hidden[:, :1], hidden[:, 1:]
        metric = None if qkv is None else _metric(p, qkv, heads)
        keep = p.keep_indices(stage, tokens, metric, state.source, grid_hw)
        state.source = state.source.gather(1, keep)
        state.record(stage, state.source)
        state.fill = nearest_kept_fill(state.source, frames, grid_hw)
        return (torch.cat([cls, gather_tokens(tokens, keep)], dim=1),)

    return forward


def patch_timesformer(model: nn.Module, config: STAConfig) -> nn.Module:
    """Patch a TimeSformer in place (see :func:`staprune.patch`)."""
    backbone = FAMILY.backbone(model)
    hf = backbone.config
    if hf.attention_type != "divided_space_time":
        raise ConfigError(
            f"staprune prunes TimeSformer's divided space-time attention; attention_type={hf.attention_type!r} "
            "is not supported"
        )
    spec = FAMILY.spec_of(model)
    plan = FAMILY.plan(spec, config)  # validate now, before any forward pass
    p = Patch(config)
    grid_hw = (spec.grid_side, spec.grid_side)

    def start(module, args, kwargs):
        pixels = args[0] if args else kwargs.get("pixel_values")
        check_fixed_clip(pixels, spec.frames, spec.in_chans, spec.size, "this TimeSformer",
                         f"its blocks reshape with its config's {spec.frames} frames and {spec.size}x{spec.size} pixels")
        p.start(plan, pixels, grid_hw, pixels.device)

    p.hook(backbone, start, pre=True, with_kwargs=True)
    stages = [s.layer for s in plan.stages if s.r]
    if config.method != "none" and stages:
        captured: dict = {}
        if qkv_part(config) is not None:
            def keep_qkv(module, args, output):
                captured["qkv"] = output

            # The first stage runs the stock block: its spatial qkv is read off the projection.
            p.hook(backbone.encoder.layer[stages[0]].attention.attention.qkv, keep_qkv)
        for index, layer in enumerate(backbone.encoder.layer):
            if index >= stages[0]:
                forward = _make_layer(p, index, spec.frames, grid_hw, spec.heads, captured)
                p.override_forward(layer, MethodType(forward, layer))
    model._staprune = p
    return model


# --- the family ---------------------------------------------------------------------------------
class TimesformerFamily(HuggingFaceFamily):
    name = "timesformer"
    title = "TimeSformer, divided space-time attention (transformers)"
    transformers_classes = ("TimesformerForVideoClassification", "TimesformerModel")
    backbone_attribute = "timesformer"
    clip_owner = "this TimeSformer"
    extra_tokens = 1  # CLS
    tome_refusal = "divided attention needs full grids"
    hf_model_types = ("timesformer",)
    protocols = {
        "k400": ViewProtocol(clips=1, crops=3, frames=8, stride=32, sampling="uniform"),
        "ssv2": ViewProtocol(clips=1, crops=3, frames=8, stride=2, sampling="segment"),
    }

    def patch(self, model: nn.Module, config: STAConfig) -> nn.Module:
        return patch_timesformer(model, config)

    def spec_of(self, model: nn.Module, frames: int | None = None, size: int | None = None) -> TimesformerSpec:
        hf = self.backbone(model).config
        image, patch = side(hf.image_size), side(hf.patch_size)
        return TimesformerSpec(
            hidden=hf.hidden_size,
            layers=hf.num_hidden_layers,
            heads=hf.num_attention_heads,
            mlp_hidden=hf.intermediate_size,
            frames=hf.num_frames,
            size=image,
            patch=patch,
            num_classes=self.num_classes_of(model),
            in_chans=hf.num_channels,
        ).with_input(frames, size)

    def flops(self, spec: TimesformerSpec, config: STAConfig) -> FlopCount:
        """What runs, block by block (``K`` patch tokens in the residual stream, ``T`` frames, ``N``
        tokens per frame). Stock block: temporal qkv/proj/dense on ``TN`` tokens, spatial qkv/proj on
        ``T(N+1)`` (CLS copied per frame), attention ``2NT²C + 2T(N+1)²C``, MLP on ``1 + TN``. Pruned
        block: the same attention (full grids), linear layers on ``K`` tokens, the CLS's spatial qkv
        once and its projection per frame (``K + T``), MLP on ``1 + K``."""
        plan = self.plan(spec, config)
        c, t, n = spec.hidden, spec.frames, spec.tokens_per_frame
        parts: dict[str, float] = {"embed": t * n * c * spec.in_chans * spec.patch**2}
        counts = tokens_per_block(plan)
        stages = {s.layer: s for s in plan.stages} if config.method != "none" else {}
        first = min((s.layer for s in plan.stages if s.r), default=None) if config.method != "none" else None
        selection = 0.0
        for layer, k in enumerate(counts):
            add_parts(parts, attention=2 * n * t * t * c + 2 * t * (n + 1) ** 2 * c)
            if first is None or layer <= first:  # stock block
                add_parts(parts, qkv=3 * t * n * c * c + 3 * t * (n + 1) * c * c,
                          proj=t * n * c * c + t * (n + 1) * c * c + t * n * c * c)
                add_parts(parts, mlp=2 * (1 + t * n) * c * spec.mlp_hidden)
            else:
                add_parts(parts, qkv=3 * k * c * c + 3 * (k + 1) * c * c, proj=k * c * c + (k + t) * c * c + k * c * c)
                add_parts(parts, mlp=2 * (1 + k) * c * spec.mlp_hidden)
            if layer in stages:
                selection += sta_selection_flops(stages[layer], metric_dim(config, c, spec.heads), config)
        parts["head"] = c * spec.num_classes
        return FlopCount(sum(parts.values()), selection, parts)

    def build(self, spec: TimesformerSpec, attn_implementation: str = "sdpa") -> nn.Module:
        from transformers import TimesformerConfig, TimesformerForVideoClassification

        cfg = TimesformerConfig(
            image_size=spec.size,
            patch_size=spec.patch,
            num_frames=spec.frames,
            hidden_size=spec.hidden,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            intermediate_size=spec.mlp_hidden,
            num_labels=spec.num_classes,
        )
        return TimesformerForVideoClassification(cfg).eval()

    def tiny_model(self, seed: int = 0, *, frames: int = 8, size: int = 112, layers: int = 6, hidden: int = 48,
                   heads: int = 4, num_classes: int = 7, **config: Any) -> nn.Module:
        """A TimeSformer (divided space-time attention, patch 16) at tiny size: 8 frames of 112² are 8 x
        7x7 tokens + CLS, 6 blocks of width 48 (4 heads, MLP 4x), 7 classes. Its attention is the
        eager one (no ``attn`` choice).

        ``torch.manual_seed(seed)`` is set first; the patch embedding is scaled 4x (random init gives
        near-identical tokens). ``config``: further ``TimesformerConfig`` fields (``attention_type``, ...)."""
        from transformers import TimesformerConfig, TimesformerForVideoClassification

        torch.manual_seed(seed)
        fields = dict(image_size=size, patch_size=16, num_frames=frames, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=4 * hidden, num_labels=num_classes)
        model = TimesformerForVideoClassification(TimesformerConfig(**{**fields, **config}))
        with torch.no_grad():  # distinct tokens
            model.timesformer.embeddings.patch_embeddings.projection.weight.mul_(4.0)
        return model.eval()

    # analysis
    def patch_tokens(self, output: Tensor, grid: StageGrid) -> Tensor:
        return space_major_to_time_major(output[:, 1:], grid.frames)

    def final_features(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The last block's patch tokens (CLS removed, before the final norm), ``t * N + s`` order;
        when pruned, the kept ones with their original indices."""
        tokens = self.last_block_output(model, lambda: model(x))[0][:, 1:]
        kept = final_kept(model)
        return (tokens, kept) if kept is not None else (space_major_to_time_major(tokens, self.spec_of(model).frames), None)


FAMILY = TimesformerFamily()


def _entry(name: str, spec: TimesformerSpec, stride: int, description: str) -> ModelEntry:
    clip = ViewProtocol(clips=1, crops=3, frames=spec.frames, stride=stride, sampling="uniform")
    segments = ViewProtocol(clips=1, crops=3, frames=spec.frames, stride=2, sampling="segment")
    return ModelEntry(name, FAMILY.name, spec, levels=scaled_levels(spec.tokens_per_frame),
                      protocols={"k400": clip, "ssv2": segments}, description=description)


REGISTRATION = FamilyModels(
    FAMILY,
    (
        _entry("TimeSformer-B", TimesformerSpec(), 32, "TimeSformer (divided space-time), 8x224²"),
        _entry("TimeSformer-HR", TimesformerSpec(frames=16, size=448), 16, "TimeSformer-HR, 16x448²"),
        _entry("TimeSformer-L", TimesformerSpec(frames=96), 4, "TimeSformer-L, 96x224²"),
    ),
)

__all__ = [
    "FAMILY",
    "REGISTRATION",
    "TimesformerFamily",
    "TimesformerSpec",
    "patch_timesformer",
    "pruned_block",
    "space_major_to_time_major",
]

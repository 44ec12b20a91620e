"""STA pruning at the start of Video Swin stages 2, 3 and 4, and :func:`patch_swin3d`.

A patched model prunes right after each patch merging (``model.features[2]``, ``[4]``, ``[6]``):
``r1, 1.5*r1/4, 2*r1/16`` tokens per frame (rounded half-up,
:func:`staprune.core.config.swin_stage_drops`; each frame is a unit). A smaller Swin (2 or 3
stages) prunes after each of its patch mergings with the first drops. Every attention module,
pruned stage or not, runs through :class:`~.attention.FusedWindowAttention`.

Inside a pruned stage the residual stream holds only the kept tokens, so the LayerNorms, qkv,
output projection and MLP run on kept tokens only. Window attention still runs on the full grid
(the filled-grid recipe, :mod:`staprune.adapters.filled_grid`): the qkv of every dropped position
is a copy of the qkv of its **nearest kept token in the same frame** (Euclidean distance on
``(row, col)``; ties go to the lowest flat index), and only kept positions' outputs are used. At
the end of the stage the grid is refilled the same way, so patch merging, and after the last stage
the final norm and average pooling, see a full grid and the model's own modules run unchanged.
(For the last stage this makes the pooled feature a nearest-neighbour estimate of the full-grid
average rather than an average of kept tokens only.)

Scoring source (``similarity``): the semantic score and ``similarity="hidden"`` use the stage's
input tokens (after patch merging). ``key`` (the default), ``query`` and ``value`` use that slice
of the *first block's* qkv projection, computed on the LayerNorm-ed stage input and averaged over
heads, as in the ViT adapter. Keys are the default because they are the paper's metric and cheap
here: the head-averaged key has 32 dims in every Swin-T/S/B stage, and the first block reuses the
kept tokens' keys, so the only extra work is the key projection of dropped tokens.

Token indices reported by :func:`staprune.kept_tokens` are flat positions in that stage's grid,
``t * h * w + row * w + col``, sorted ascending (the kept tokens of a stage are processed in that
order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import MethodType

import torch
from torch import Tensor, nn

from ...adapters.filled_grid import (
    fill_grid,
    fill_rows,
    kept_qkv,
    nearest_kept_fill,
    project_slice,
    qkv_part,
)
from ...adapters.state import Patch, current_stage
from ...core.config import PruningPlan, STAConfig, Stage, resolve_swin_plan
from ...core.errors import ConfigError, UnsupportedModelError
from ...core.score import gather_tokens, slice_metric
from ..classifier import VideoClassifierFamily
from .attention import FusedWindowAttention, QuerySubset, fused_attention_forward, query_subsets
from .windows import WindowLayout, stage_grids, stage_modules


@dataclass
class _PrunedGrid:
    """A pruned stage's kept set: ``keep`` ``(B, K)`` sorted positions, ``fill`` ``(B, L)``."""

    keep: Tensor
    fill: Tensor
    size: tuple[int, int, int]
    _index: dict[tuple, tuple[Tensor, Tensor, list[QuerySubset | None]]] = field(default_factory=dict)

    def window_index(self, layout: WindowLayout) -> tuple[Tensor, Tensor, list[QuerySubset | None]]:
        """qkv row of every window slot ``(B, Lw)`` (K = the padding row), the flat output row
        ``b*K + k`` of every slot holding a kept token (``B*K`` for the others), and the kept
        query subset of each shift-pattern group (:func:`query_subsets`)."""
        key = (layout.window, layout.shift)
        if key not in self._index:
            bsz, n_keep = self.keep.shape
            rows = fill_rows(self.fill, layout.src, n_keep)
            slots = layout.slot[self.keep]  # (B, K)
            targets = torch.arange(n_keep, device=slots.device) + torch.arange(bsz, device=slots.device).view(-1, 1) * n_keep
            dest = rows.new_full(rows.shape, bsz * n_keep).scatter_(1, slots, targets)
            self._index[key] = (rows, dest, query_subsets(dest, bsz * n_keep, layout))
        return self._index[key]


def _pruned_attention(helper: FusedWindowAttention, qkv: Tensor, grid: _PrunedGrid) -> Tensor:
    """Window attention for kept tokens: qkv ``(B, K, 3C)`` -> projected output ``(B, K, C)``."""
    layout = helper.layout_for(grid.size, qkv.device)
    rows, dest, subsets = grid.window_index(layout)
    bsz, n_keep, _ = qkv.shape
    if layout.padded:
        qkv = helper.pad_row(qkv)
    out = helper.windows(qkv, rows, dest, layout, bsz * n_keep, subsets)
    return helper.project(out.view(bsz, n_keep, -1))


def _pruned_block(
    block: nn.Module, helper: FusedWindowAttention, x: Tensor, grid: _PrunedGrid, qkv: Tensor | None = None
) -> Tensor:
    """SwinTransformerBlock.forward on kept tokens ``x`` ``(B, K, C)`` (``qkv`` precomputed or None)."""
    if qkv is None:
        qkv = helper.attn.qkv(block.norm1(x))
    x = x + block.stochastic_depth(_pruned_attention(helper, qkv, grid))
    return x + block.stochastic_depth(block.mlp(block.norm2(x)))


def _select(p: Patch, stage: Stage, tokens: Tensor, metric: Tensor | None, grid_hw: tuple[int, int]) -> Tensor:
    """Kept positions ``(B, K)`` of one stage, sorted ascending."""
    bsz, length, _ = tokens.shape
    positions = torch.arange(length, device=tokens.device).expand(bsz, -1)
    keep = p.keep_indices(stage, tokens, metric, positions, grid_hw)
    return keep.sort(dim=1).values


def _make_stage(
    p: Patch, index: int, helpers: dict[nn.Module, FusedWindowAttention]
) -> Callable[[nn.Sequential, Tensor], Tensor]:
    """Forward of Swin stage ``index`` (0-based): prune its input, run its blocks on kept tokens,
    refill the grid. Stock behaviour (with fused attention) when this forward does not prune."""

    def forward(self, x: Tensor) -> Tensor:
        state = p.state
        stage = None if state is None else current_stage(state, index)
        if stage is None or stage.r == 0 or p.config.method == "none":
            return nn.Sequential.forward(self, x)
        bsz, t, h, w, c = x.shape
        if t * h * w != stage.units * stage.tokens_in:
            raise ConfigError(f"Swin stage {index + 1} got a {t}x{h}x{w} grid, the plan expected other geometry")
        tokens = x.reshape(bsz, t * h * w, c)
        blocks = list(self)
        first_qkv = metric = None
        part = qkv_part(p.config)
        qkv = blocks[0].attn.qkv
        if part is not None:
            # The metric needs every token's slice; kept tokens' slices are reused by block 1.
            y = blocks[0].norm1(tokens)
            sliced = project_slice(qkv, y, part)
            metric = slice_metric(sliced, blocks[0].attn.num_heads)
        keep = _select(p, stage, tokens, metric, (h, w))
        if part is not None:
            first_qkv = kept_qkv(qkv, gather_tokens(y, keep), part, gather_tokens(sliced, keep))
        grid = _PrunedGrid(keep, nearest_kept_fill(keep, t, (h, w)), (t, h, w))
        out = gather_tokens(tokens, keep)
        for i, block in enumerate(blocks):
            out = _pruned_block(block, helpers[block.attn], out, grid, first_qkv if i == 0 else None)
        state.record(stage, keep)
        return fill_grid(out, grid.fill).view(bsz, t, h, w, c)

    return forward


# --- patching -----------------------------------------------------------------------------------
def _check_structure(model: nn.Module) -> None:
    from torchvision.models.swin_transformer import PatchMerging, PatchMergingV2, SwinTransformerBlock
    from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d

    feats = list(model.features)
    ok = len(feats) % 2 == 1 and len(feats) >= 3
    for i, m in enumerate(feats):
        if i % 2:
            ok = ok and isinstance(m, PatchMerging | PatchMergingV2)
        else:
            ok = ok and isinstance(m, nn.Sequential) and all(
                type(b) is SwinTransformerBlock and type(b.attn) is ShiftedWindowAttention3d for b in m
            )
    if not ok:
        raise UnsupportedModelError(
            "staprune supports SwinTransformer3d built from torchvision's SwinTransformerBlock, "
            "ShiftedWindowAttention3d and PatchMerging (features = stage, merge, stage, ...)"
        )


def patch_swin3d(model: nn.Module, config: STAConfig, family: VideoClassifierFamily) -> nn.Module:
    """Patch a torchvision ``SwinTransformer3d`` in place (see :func:`staprune.patch`).

    The config is validated now against the model's nominal input (the paper's 32x224², or the
    demo Swin's grid) and again for every input geometry seen at run time (``ValueError`` naming
    the largest valid r1). ``family`` is the Swin family: it refuses the methods it cannot run and
    reads the nominal input off the model.
    """
    _check_structure(model)
    p = Patch(config)
    plans: dict[tuple[int, int, int], PruningPlan] = {}

    def plan_for(frames: int, height: int, width: int) -> PruningPlan:
        key = (frames, height, width)
        if key not in plans:
            family.check_method(config)
            t, grids = stage_grids(model, frames, height, width)
            plans[key] = resolve_swin_plan(config, t, grids[1:])
        return plans[key]

    nominal = family.spec_of(model)
    plan_for(nominal.frames, nominal.size, nominal.size)  # validate now, before any forward

    def start(module: nn.Module, args: tuple) -> None:
        pixels = args[0]
        plan = plan_for(*pixels.shape[-3:])
        _, grids = stage_grids(model, *pixels.shape[-3:])
        p.start(plan, pixels, grids[1], pixels.device)

    p.hook(model, start, pre=True)
    helpers: dict[nn.Module, FusedWindowAttention] = {}
    for stage in stage_modules(model):
        for block in stage:
            helper = helpers[block.attn] = FusedWindowAttention(block.attn)
            p.override_forward(block.attn, MethodType(fused_attention_forward(helper), block.attn))
    for index, stage in enumerate(stage_modules(model)):
        if index > 0:
            p.override_forward(stage, MethodType(_make_stage(p, index, helpers), stage))
    model._staprune = p
    return model


__all__ = ["patch_swin3d"]

"""torchvision's Video Swin (``SwinTransformer3d``: ``swin3d_t``/``swin3d_s``/``swin3d_b``): adapter, geometry,
FLOPs, loading, registry (``VideoSwin-T/S/B``, ``VideoSwin-B-SSV2``: the paper's Table 3).

The adapter:

Two things change once a model is patched:

1. **Fused window attention, everywhere.** Every ``ShiftedWindowAttention3d`` runs through
   ``F.scaled_dot_product_attention`` with the relative-position bias and the shift mask added
   as one additive ``attn_mask``. Padding, cyclic shift, window partition, masks (-100) and
   bias follow torchvision exactly, so an unpruned patched model matches stock to float
   rounding. Windows are grouped by their shift-mask pattern (at most 8 patterns: "last window
   along T / H / W or not"), so each SDPA call takes one ``(1, heads, N, N)`` mask that
   broadcasts over its windows instead of a per-window mask as large as the scores.
   Padded positions get ``q, k, v = qkv bias``, exactly what torchvision's linear layer gives
   its zero padding.
2. **STA pruning at the start of Swin stages 2, 3 and 4** (``model.features[2]``, ``[4]``,
   ``[6]``, i.e. right after each patch merging), ``r1, 1.5*r1/4, 2*r1/16`` tokens per frame
   (rounded half-up, :func:`staprune.config.swin_stage_drops`; each frame is a unit). A
   smaller Swin (2 or 3 stages) prunes after each of its patch mergings with the first drops.

Inside a pruned stage the residual stream holds only the kept tokens, so the LayerNorms, qkv,
output projection and MLP run on kept tokens only. Window attention still runs on the full
grid: the qkv of every dropped position is a copy of the qkv of its **nearest kept token in the
same frame** (Euclidean distance on ``(row, col)``; ties go to the smallest row, then the
smallest column, i.e. the lowest flat index), and only kept positions' outputs are used: where
every window of a shift pattern keeps at most half of its slots, only the kept queries are
computed (padded to the fullest window), against all keys. At the
end of the stage the grid is refilled the same way (dropped positions copy their nearest kept
token), so patch merging, and after the last stage the final norm and average pooling, see a
full grid and the model's own modules run unchanged. (For the last stage this makes the pooled
feature a nearest-neighbour estimate of the full-grid average rather than an average of kept
tokens only.)

Scoring source (``similarity``): the semantic score and ``similarity="hidden"`` use the stage's
input tokens (after patch merging). ``key`` (the default), ``query`` and ``value`` use that
slice of the *first block's* attention projection, computed on the LayerNorm-ed stage input and
averaged over heads, as in the ViT adapter. Keys are the default because they are the paper's
metric and cheap here: the head-averaged key has 32 dims in every Swin-T/S/B stage (the hidden
state has 192-1024, and the per-frame transition matmul scales with it), and the first block
reuses the kept tokens' keys, so the only extra work is the key projection of dropped tokens.

Token indices reported by :func:`staprune.kept_tokens` are flat positions in that stage's grid,
``t * h * w + row * w + col``, sorted ascending (the kept tokens of a stage are processed in
that order).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...adapters.filled_grid import nearest_kept_fill
from ...adapters.state import Patch, current_stage
from ...core.config import PruningPlan, STAConfig, Stage, stage_directions, stage_feasible
from ...core.errors import CheckpointError, ConfigError, UnknownModelError, UnsupportedModelError
from ...core.flops import FlopCount, add_parts, metric_dim, sta_selection_flops
from ...core.score import gather_tokens, head_mean
from ...data.sampling import ViewProtocol
from ...data.transforms import Preprocessing
from ...storage.state_dicts import listing, load_verified, read_state_dict
from ..base import (
    Family,
    FamilyModels,
    LoadedModel,
    ModelEntry,
    Spec,
    StageGrid,
    TokenGeometry,
    capture_output,
    scaled_levels,
)

MASK_VALUE = -100.0  # torchvision's shift-mask value (not -inf): kept for exact equality
_QKV_SLICE = {"query": 0, "key": 1, "value": 2}


def is_swin3d(model: nn.Module) -> bool:
    try:
        from torchvision.models.video.swin_transformer import SwinTransformer3d
    except ImportError:  # torchvision not installed: cannot be a Video Swin
        return False
    return isinstance(model, SwinTransformer3d)


# --- geometry -----------------------------------------------------------------------------------
def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def stage_grids(model: nn.Module, frames: int, height: int, width: int) -> tuple[int, list[tuple[int, int]]]:
    """Temporal positions and the ``(h, w)`` token grid of every Swin stage for an input size.

    Patch embedding pads up to a multiple of the patch size; each patch merging pads to even.
    """
    pt, ph, pw = model.patch_embed.tuple_patch_size
    h, w = _ceil_div(height, ph), _ceil_div(width, pw)
    grids = [(h, w)]
    for _ in range(len(_stages(model)) - 1):
        h, w = _ceil_div(h, 2), _ceil_div(w, 2)
        grids.append((h, w))
    return _ceil_div(frames, pt), grids


def _stages(model: nn.Module) -> list[nn.Sequential]:
    return [m for i, m in enumerate(model.features) if i % 2 == 0]


def _window_and_shift(
    attn: nn.Module, size: tuple[int, int, int]
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """torchvision's rule: a window no smaller than the grid shrinks to it and does not shift."""
    window, shift = list(attn.window_size), list(attn.shift_size)
    for i in range(3):
        if size[i] <= window[i]:
            window[i], shift[i] = size[i], 0
    return tuple(window), tuple(shift)


@dataclass(frozen=True)
class WindowLayout:
    """Where every grid token sits once the grid is padded, rolled and cut into windows.

    Windows are ordered by shift-mask pattern (stable within a pattern), so the windows sharing
    one mask are contiguous. ``Lw = windows * N`` slots, ``N`` tokens per window.

    Attributes:
        src: ``(Lw,)`` flat grid position ``t*H*W + row*W + col`` of each slot; ``L`` for padding.
        slot: ``(L,)`` the slot of each grid position (inverse of ``src``).
        groups: ``(windows, pattern)`` per mask pattern, in slot order; ``pattern`` is a tuple
            of three bools: the window is the last one along T / H / W of a shifted axis.
        window: the (possibly shrunk) window; ``shift``: the (possibly zeroed) shift.
        padded: whether any slot is padding.
    """

    src: Tensor
    slot: Tensor
    groups: tuple[tuple[int, tuple[bool, bool, bool]], ...]
    window: tuple[int, int, int]
    shift: tuple[int, int, int]
    padded: bool

    @property
    def window_volume(self) -> int:
        return self.window[0] * self.window[1] * self.window[2]


_LAYOUTS: dict[tuple, WindowLayout] = {}
_MAX_LAYOUTS = 64


def window_layout(
    size: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int], device: torch.device
) -> WindowLayout:
    """The (cached) :class:`WindowLayout` of a ``(T, H, W)`` grid.

    Layouts are index bookkeeping built eagerly once per geometry; under ``torch.compile`` they
    are read from the cache as constants (building one there would trace thousands of Python steps
    and data-dependent ``unique``), so a compiled model needs one eager forward at a new input size.
    """
    key = (size, window, shift, device)
    if key not in _LAYOUTS:
        if torch.compiler.is_compiling():
            raise ConfigError(
                f"no window layout for grid {size} yet: run the patched model once eagerly at this input "
                "size before torch.compile (staprune builds its window bookkeeping outside the graph)"
            )
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
        _LAYOUTS[key] = _build_window_layout(size, window, shift, device)
    return _LAYOUTS[key]


def _build_window_layout(
    size: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int], device: torch.device
) -> WindowLayout:
    with torch.inference_mode(False), torch.no_grad():  # cached: must be usable outside inference mode
        length = math.prod(size)
        src, counts = _window_positions(size, window, shift)
        per_axis = [_patterns(n, sh) for n, sh in zip(counts, shift, strict=True)]
        codes = torch.tensor([4 * a + 2 * b + c for a, b, c in itertools.product(*per_axis)])
        src = src[torch.argsort(codes, stable=True)].reshape(-1)
        slot = torch.empty(length + 1, dtype=torch.long)
        slot[src] = torch.arange(src.numel())  # every padding slot writes the dropped entry `length`
        groups = tuple(
            (int((codes == c).sum()), (bool(c & 4), bool(c & 2), bool(c & 1))) for c in torch.unique(codes).tolist()
        )
        padded = bool((src == length).any())
        return WindowLayout(src.to(device), slot[:length].to(device), groups, window, shift, padded)


def _window_positions(
    size: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int]
) -> tuple[Tensor, list[int]]:
    """Flat grid position (``L`` = padding) of every in-window slot, ``(windows, N)`` in
    torchvision's window order, and the window count along each axis."""
    coords, valids, counts = [], [], []
    for axis, (s, w, sh) in enumerate(zip(size, window, shift, strict=True)):
        n = _ceil_div(s, w)
        # Rolled (by -shift) coordinate a holds padded coordinate (a + shift) % P.
        coord = ((torch.arange(n * w) + sh) % (n * w)).view(n, w)
        shape = [1] * 6
        shape[axis], shape[axis + 3] = n, w  # (windows T, H, W, in-window T, H, W)
        coords.append(coord.view(shape))
        valids.append((coord < s).view(shape))
        counts.append(n)
    flat = coords[0] * (size[1] * size[2]) + coords[1] * size[2] + coords[2]
    valid = valids[0] & valids[1] & valids[2]
    src = torch.where(valid, flat, math.prod(size))
    return src.reshape(math.prod(counts), -1), counts


def _patterns(count: int, shift: int) -> list[int]:
    """Per window along one axis: 1 if its shift mask splits it (last window, shifted axis)."""
    return [int(shift > 0 and i == count - 1) for i in range(count)]


def shift_mask(window: tuple[int, int, int], shift: tuple[int, int, int], pattern: tuple[bool, bool, bool]) -> Tensor:
    """``(N, N)`` additive shift mask of one window pattern (0 or -100), as torchvision builds it.

    In the last window along a shifted axis, positions ``>= window - shift`` came around from the
    other end of the grid by the roll; tokens attend only within their own region.
    """
    labels = torch.zeros(window, dtype=torch.long)
    for axis, (w, s, last) in enumerate(zip(window, shift, pattern, strict=True)):
        if last:
            region = (torch.arange(w) >= w - s).long() << axis
            labels = labels + region.view([w if i == axis else 1 for i in range(3)])
    labels = labels.reshape(-1)
    same = labels.view(-1, 1) == labels.view(1, -1)
    return torch.where(same, 0.0, MASK_VALUE)


def relative_position_bias(attn: nn.Module, window: tuple[int, int, int]) -> Tensor:
    """``(heads, N, N)`` bias of a (possibly shrunk) window, indexed as torchvision does."""
    n = window[0] * window[1] * window[2]
    index = attn.relative_position_index[:n, :n].reshape(-1)
    return attn.relative_position_bias_table[index].view(n, n, -1).permute(2, 0, 1)


# --- fused window attention ---------------------------------------------------------------------
class FusedWindowAttention:
    """SDPA window attention for one ``ShiftedWindowAttention3d``, with its cached masks.

    Masks ``(1, heads, N, N)`` = relative-position bias + shift pattern are cached per (window,
    shift, pattern, device, dtype) and invalidated when the bias table changes in place (its
    version counter). With gradients enabled on the table they are rebuilt every call so the
    bias gets its gradient.
    """

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn
        self._masks: dict[tuple, Tensor] = {}

    def masks(
        self, layout: WindowLayout, device: torch.device, dtype: torch.dtype, query_major: bool = False
    ) -> list[Tensor]:
        """One additive mask per shift-pattern group: ``(1, heads, N, N)``, or with ``query_major``
        ``(N, heads, N)`` (rows first: kept queries' rows are then gathered without a transpose)."""
        table = self.attn.relative_position_bias_table
        if torch.is_grad_enabled() and table.requires_grad:
            return self._build_masks(layout, device, dtype, query_major)
        if torch.compiler.is_compiling():
            # Inside a compiled graph the table cannot change: the eager warm-up's masks are current.
            # (Masks are built eagerly; building one here would fix the table into the graph.)
            cached = [m for k, m in self._masks.items() if k[:5] == (layout.window, layout.shift, query_major, device, dtype)]
            return cached[0] if cached else self._build_masks(layout, device, dtype, query_major)
        key = (layout.window, layout.shift, query_major, device, dtype, table._version, table.data_ptr())
        if key not in self._masks:
            if any(k[5:] != key[5:] for k in self._masks):
                self._masks.clear()  # the table changed: every cached mask is stale
            with torch.inference_mode(False), torch.no_grad():
                self._masks[key] = self._build_masks(layout, device, dtype, query_major)
        return self._masks[key]

    def _build_masks(
        self, layout: WindowLayout, device: torch.device, dtype: torch.dtype, query_major: bool
    ) -> list[Tensor]:
        bias = relative_position_bias(self.attn, layout.window)
        out = []
        for _, pattern in layout.groups:
            mask = bias
            if any(pattern):
                mask = bias + shift_mask(layout.window, layout.shift, pattern).to(bias.device, bias.dtype)
            mask = mask.transpose(0, 1) if query_major else mask.unsqueeze(0)
            # contiguous: SDPA would copy the permuted bias view on every call
            out.append(mask.to(device=device, dtype=dtype).contiguous())
        return out

    def pad_row(self, rows: Tensor) -> Tensor:
        """Append the qkv of a zero (padding) token, i.e. the qkv bias: ``(B, R, 3C) -> (B, R+1, 3C)``."""
        bias = self.attn.qkv.bias
        pad = rows.new_zeros(rows.shape[0], 1, rows.shape[2]) if bias is None else bias.to(rows.dtype).expand(
            rows.shape[0], 1, -1
        )
        return torch.cat([rows, pad], dim=1)

    def windows(
        self, rows: Tensor, index: Tensor, dest: Tensor, layout: WindowLayout, n_out: int,
        queries: list[QuerySubset | None] | None = None,
    ) -> Tensor:
        """Attention of all windows before the output projection, written straight to token rows.

        Args:
            rows: qkv rows ``(B, R, 3C)``; ``index`` ``(B, Lw)`` picks the row of each window slot.
            dest: ``(B, Lw)`` output row of each slot in ``[0, n_out]``; ``n_out`` is a sink for
                slots whose output is not needed (padding, dropped positions).
            queries: per shift-pattern group, the subset of query slots to compute (None: all).
        Returns:
            ``(n_out, C)``: row ``dest[b, s]`` holds the output of slot ``s`` of clip ``b``.
        """
        bsz, n_rows, _ = rows.shape
        channels = rows.shape[-1] // 3
        heads = self.attn.num_heads
        n = layout.window_volume
        flat_rows = rows.reshape(bsz * n_rows, -1)
        flat_index = index + torch.arange(bsz, device=index.device).view(-1, 1) * n_rows
        dropout = self.attn.attention_dropout if self.attn.training else 0.0
        out = rows.new_empty(n_out + 1, channels)
        start = 0
        subsets = queries or [None] * len(layout.groups)
        masks = self.masks(layout, rows.device, rows.dtype)
        if any(subset is not None for subset in subsets):
            query_major = self.masks(layout, rows.device, rows.dtype, query_major=True)
        for g, ((count, _), mask, subset) in enumerate(zip(layout.groups, masks, subsets, strict=True)):
            span = slice(start, start + count * n)
            qkv = flat_rows.index_select(0, flat_index[:, span].reshape(-1))
            q, k, v = qkv.view(bsz * count, n, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
            targets = dest[:, span].reshape(-1)
            if subset is not None:
                # Only the kept queries of each window (padded to the group's largest count):
                # their q rows and their rows of the (bias + shift) mask; keys and values unchanged.
                width = subset.slots.shape[1]
                q_rows = flat_index[:, span].reshape(bsz * count, n).gather(1, subset.slots).reshape(-1)
                q = flat_rows[:, :channels].index_select(0, q_rows).view(bsz * count, width, heads, -1).transpose(1, 2)
                mask = query_major[g].index_select(0, subset.slots.reshape(-1)).view(bsz * count, width, heads, n)
                mask = mask.transpose(1, 2)
                targets = subset.dest.reshape(-1)
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, scale=(channels // heads) ** -0.5
            )
            # (B*windows, heads, N, d) -> one row per slot; index_copy_ also undoes the windowing.
            out.index_copy_(0, targets, o.transpose(1, 2).reshape(-1, channels))
            start += count * n
        return out[:n_out]

    def project(self, x: Tensor) -> Tensor:
        return F.dropout(self.attn.proj(x), p=self.attn.dropout, training=self.attn.training)

    def layout_for(self, size: tuple[int, int, int], device: torch.device) -> WindowLayout:
        window, shift = _window_and_shift(self.attn, size)
        return window_layout(size, window, shift, device)

    def __call__(self, x: Tensor) -> Tensor:
        """Drop-in for ``ShiftedWindowAttention3d.forward``: ``(B, T, H, W, C) -> (B, T, H, W, C)``."""
        bsz, t, h, w, c = x.shape
        layout = self.layout_for((t, h, w), x.device)
        length = t * h * w
        rows = self.attn.qkv(x.reshape(bsz, length, c))
        if layout.padded:
            rows = self.pad_row(rows)
        batch_offset = torch.arange(bsz, device=x.device).view(-1, 1) * length
        dest = torch.where(layout.src < length, layout.src + batch_offset, bsz * length)
        out = self.windows(rows, layout.src.expand(bsz, -1), dest, layout, bsz * length)
        return self.project(out.view(bsz, length, c)).view(bsz, t, h, w, c)


def fused_attention_forward(helper: FusedWindowAttention):
    def forward(self, x: Tensor) -> Tensor:
        return helper(x)

    return forward




# --- pruned stage -------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuerySubset:
    """The query slots one shift-pattern group of windows computes: ``slots`` ``(B*windows, Q)``
    in-window slot of each query (kept ones first, padded with repeats), ``dest`` ``(B*windows*Q,)``
    output row of each (the sink for padding)."""

    slots: Tensor
    dest: Tensor


# Compute only kept queries when the fullest window of a group keeps at most this fraction of
# its slots. The gathered mask rows cost memory traffic comparable to the attention they save:
# on swin3d_t 32x224² at r1=320, stage 2 (~65% of slots in the fullest window) got slower with
# the subset, stages 3-4 (~40% and ~18%) faster; the whole forward ~8% faster at 0.5.
QUERY_SUBSET_MAX_FILL = 0.5


def query_subsets(dest: Tensor, sink: int, layout: WindowLayout) -> list[QuerySubset | None]:
    """Per shift-pattern group, the kept-query subset (None where computing every query is cheaper).

    Args:
        dest: ``(B, Lw)`` output row of every window slot, ``sink`` where the output is unused.
    """
    bsz = dest.shape[0]
    n = layout.window_volume
    if torch.compiler.is_compiling():  # the subset's width is data-dependent: compute every query
        return [None] * len(layout.groups)
    out: list[QuerySubset | None] = []
    start = 0
    for count, _ in layout.groups:
        group = dest[:, start:start + count * n].reshape(bsz * count, n)
        start += count * n
        kept = group != sink
        width = int(kept.sum(-1).max())
        if width > QUERY_SUBSET_MAX_FILL * n:
            out.append(None)
            continue
        # Stable sort puts each window's kept slots first, in slot order; the tail pads to `width`.
        slots = torch.sort((~kept).to(torch.uint8), dim=-1, stable=True).indices[:, :max(1, width)]
        out.append(QuerySubset(slots.contiguous(), group.gather(1, slots)))
    return out


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
            fill = torch.cat([self.fill, self.fill.new_full((bsz, 1), n_keep)], dim=1)
            rows = fill.index_select(1, layout.src)
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


def _qkv_slice(block: nn.Module, tokens: Tensor, part: int) -> tuple[Tensor, Tensor]:
    """LayerNorm-ed tokens ``(B, L, C)`` and one slice (0 q, 1 k, 2 v) of the first block's qkv
    projection ``(B, L, C)``, for every token of the stage input."""
    y = block.norm1(tokens)
    c = tokens.shape[-1]
    qkv = block.attn.qkv
    bias = None if qkv.bias is None else qkv.bias[part * c : (part + 1) * c]
    return y, F.linear(y, qkv.weight[part * c : (part + 1) * c], bias)


def _kept_qkv(block: nn.Module, y: Tensor, sliced: Tensor, part: int, keep: Tensor) -> Tensor:
    """First block's qkv of kept tokens ``(B, K, 3C)``, reusing the slice computed on all tokens."""
    c = y.shape[-1]
    qkv = block.attn.qkv
    y_kept = gather_tokens(y, keep)
    pieces = []
    for i in range(3):
        if i == part:
            pieces.append(gather_tokens(sliced, keep))
        else:
            bias = None if qkv.bias is None else qkv.bias[i * c : (i + 1) * c]
            pieces.append(F.linear(y_kept, qkv.weight[i * c : (i + 1) * c], bias))
    return torch.cat(pieces, dim=-1)


def _select(p: Patch, stage: Stage, tokens: Tensor, metric: Tensor | None, grid_hw: tuple[int, int]) -> Tensor:
    """Kept positions ``(B, K)`` of one stage, sorted ascending."""
    bsz, length, _ = tokens.shape
    positions = torch.arange(length, device=tokens.device).expand(bsz, -1)
    keep = p.keep_indices(stage, tokens, metric, positions, grid_hw)
    return keep.sort(dim=1).values


def _make_stage(p: Patch, index: int, helpers: dict[nn.Module, FusedWindowAttention]):
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
        part = _QKV_SLICE.get(p.config.similarity) if p.config.method == "sta" else None
        if part is not None:
            # The metric needs every token's slice; kept tokens' slices are reused by block 1.
            y, sliced = _qkv_slice(blocks[0], tokens, part)
            metric = head_mean(sliced.view(bsz, t * h * w, blocks[0].attn.num_heads, -1).transpose(1, 2))
        keep = _select(p, stage, tokens, metric, (h, w))
        if part is not None:
            first_qkv = _kept_qkv(blocks[0], y, sliced, part, keep)
        grid = _PrunedGrid(keep, nearest_kept_fill(keep, t, (h, w)), (t, h, w))
        out = gather_tokens(tokens, keep)
        for i, block in enumerate(blocks):
            out = _pruned_block(block, helpers[block.attn], out, grid, first_qkv if i == 0 else None)
        state.record(stage, keep)
        return gather_tokens(out, grid.fill).view(bsz, t, h, w, c)

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


def patch_swin3d(model: nn.Module, config: STAConfig) -> nn.Module:
    """Patch a torchvision ``SwinTransformer3d`` in place (see :func:`staprune.patch`).

    The config is validated now against the paper's 32x224² input and again for every input
    geometry seen at run time (``ValueError`` naming the largest valid r1).
    """
    _check_structure(model)
    p = Patch(config)
    plans: dict[tuple[int, int, int], PruningPlan] = {}

    def plan_for(frames: int, height: int, width: int) -> PruningPlan:
        key = (frames, height, width)
        if key not in plans:
            t, grids = stage_grids(model, frames, height, width)
            plans[key] = resolve_swin_plan(config, t, grids[1:])
        return plans[key]

    nominal = FAMILY.spec_of(model)
    plan_for(nominal.frames, nominal.size, nominal.size)  # validate now, before any forward

    def start(module: nn.Module, args: tuple) -> None:
        pixels = args[0]
        plan = plan_for(*pixels.shape[-3:])
        _, grids = stage_grids(model, *pixels.shape[-3:])
        p.start(plan, pixels, grids[1], pixels.device)

    p.hook(model, start, pre=True)
    helpers: dict[nn.Module, FusedWindowAttention] = {}
    for stage in _stages(model):
        for block in stage:
            helper = helpers[block.attn] = FusedWindowAttention(block.attn)
            p.override_forward(block.attn, MethodType(fused_attention_forward(helper), block.attn))
    for index, stage in enumerate(_stages(model)):
        if index > 0:
            p.override_forward(stage, MethodType(_make_stage(p, index, helpers), stage))
    model._staprune = p
    return model



# --- pruning plan ------------------------------------------------------------------------------
def swin_stage_drops(r1: int) -> tuple[int, int, int]:
    """Per-frame drops at the start of Swin stages 2, 3 and 4: ``r1, 1.5*r1/4, 2*r1/16``.

    Rounded half-up to whole tokens (r1 = 192/256/320 give exact integers: 72/96/120, 24/32/40).
    """
    return (r1, int(1.5 * r1 / 4 + 0.5), int(2 * r1 / 16 + 0.5))


def _swin_stages(config: STAConfig, r1: int, frames: int, grids: Sequence[tuple[int, int]]) -> list[Stage]:
    if isinstance(config.schedule, str):
        # Smaller Swins (2 or 3 stages) prune after each of their patch mergings with the first
        # drops of the paper's schedule; a deeper one has no published drops for stage 5 on.
        if len(grids) > 3:
            raise ConfigError(
                f"this Video Swin has {len(grids) + 1} stages; the paper's r1 schedule covers stages 2-4 "
                f"only: pass schedule=[(units, r), ...] with {len(grids)} pairs"
            )
        drops = swin_stage_drops(r1)[: len(grids)]
        units = [frames] * len(drops)
    else:
        if len(config.schedule) != len(grids):
            raise ConfigError(
                f"explicit Swin schedule needs {len(grids)} (units, r) pairs, got {config.schedule}"
            )
        units = [u for u, _ in config.schedule]
        drops = tuple(r for _, r in config.schedule)
    order = stage_directions(config, len(grids))
    stages = []
    for k, ((h, w), u, r_k, direction) in enumerate(zip(grids, units, drops, order, strict=True)):
        if frames % u:
            raise ConfigError(
                f"{frames} temporal positions cannot be split into {u} units at Swin stage {k + 2}"
            )
        stages.append(Stage(k + 1, u, r_k, direction == "F", frames // u * h * w))
    return stages


def resolve_swin_plan(config: STAConfig, frames: int, grids: Sequence[tuple[int, int]]) -> PruningPlan:
    """Stages for a Video Swin: one per pruned Swin stage (2, 3, 4; 2 and 3 in smaller Swins), each per frame.

    Each Swin stage starts from a full grid (the grid is refilled before patch merging), so every
    stage prunes ``frames`` units of ``h*w`` tokens independently. ``Stage.layer`` is the 0-based
    Swin stage index (1, 2, 3).

    Args:
        frames: temporal positions ``T`` after patch embedding (16 for 32-frame input).
        grids: spatial token grid ``(h, w)`` of Swin stages 2, 3 and 4 (of every stage after the
            first, for models with fewer stages).
    """
    FAMILY.check_method(config)
    stages = _swin_stages(config, config.r, frames, grids)
    for stage in stages:
        if not stage_feasible(config, stage):
            h, w = grids[stage.layer - 1]
            raise ConfigError(
                f"r={config.r} is too large for this Video Swin input: stage {stage.layer + 1} has {h}x{w} "
                f"tokens per frame and would drop {stage.r} per unit; the largest valid r1 is "
                f"{_largest_valid_swin_r(config, frames, grids)}"
            )
    return PruningPlan(config, len(grids) + 1, frames, grids[0][0] * grids[0][1], tuple(stages))


def _largest_valid_swin_r(config: STAConfig, frames: int, grids: Sequence[tuple[int, int]]) -> int:
    best = 0
    for r in range(1, grids[0][0] * grids[0][1]):
        if not all(stage_feasible(config, s) for s in _swin_stages(config, r, frames, grids)):
            break
        best = r
    return best


# --- spec and FLOPs -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SwinSpec(Spec):
    """A torchvision ``SwinTransformer3d``: 4 stages (the demo Swin: 2), channels ``embed * 2**i``."""

    family = "swin3d"
    embed: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    heads: tuple[int, ...] = (3, 6, 12, 24)
    window: tuple[int, int, int] = (8, 7, 7)
    patch: tuple[int, int, int] = (2, 4, 4)
    frames: int = 32
    size: int = 224
    num_classes: int = 400
    mlp_ratio: float = 4.0
    in_chans: int = 3

    @property
    def temporal(self) -> int:
        """Temporal positions after patch embedding (16 for 32 frames)."""
        return _ceil_div(self.frames, self.patch[0])

    def grids(self) -> list[tuple[int, int]]:
        """Spatial token grid ``(h, w)`` of each stage (56, 28, 14, 7 at 224²).

        Patch embedding pads to a multiple of the patch; patch merging pads odd grids to even.
        """
        h, w = _ceil_div(self.size, self.patch[1]), _ceil_div(self.size, self.patch[2])
        out = [(h, w)]
        for _ in self.depths[1:]:
            h, w = _ceil_div(h, 2), _ceil_div(w, 2)
            out.append((h, w))
        return out


def _window(spec: SwinSpec, t: int, h: int, w: int) -> tuple[tuple[int, int, int], int]:
    """Effective window (torchvision clips it to the grid) and the padded token count it tiles."""
    win = tuple(min(wd, size) for wd, size in zip(spec.window, (t, h, w), strict=True))
    padded = math.prod(math.ceil(size / wd) * wd for wd, size in zip(win, (t, h, w), strict=True))
    return win, padded


def swin_kept_per_stage(spec: SwinSpec, config: STAConfig) -> list[int]:
    """Tokens that qkv/proj/MLP see in each stage (stage 1 is never pruned)."""
    t, grids = spec.temporal, spec.grids()
    full = [t * h * w for h, w in grids]
    if config.method == "none" or config.r == 0:
        return full
    plan = resolve_swin_plan(config, t, grids[1:])
    return [full[0]] + [full[s.layer] - s.units * s.r for s in plan.stages]


def swin_flops(spec: SwinSpec, config: STAConfig) -> FlopCount:
    """Analytic FLOPs of a torchvision Video Swin under ``config``.

    A block with ``N`` tokens, ``w`` tokens per window: qkv 3NC² + proj NC² + MLP 2·ratio·NC² +
    window attention 2·N_pad·w·C. In a pruned stage only qkv, projection and MLP run on the kept
    tokens; window attention and patch merging stay dense (the convention that reproduces Table 3).
    This counts what the patched model runs: where the window does not tile a grid, torchvision's
    stock forward also projects the padding (qkv and proj on ``N_pad`` tokens), the fused attention
    does not (no grid of the paper's models needs padding).
    """
    t, grids = spec.temporal, spec.grids()
    kept = swin_kept_per_stage(spec, config)
    h0, w0 = grids[0]
    parts: dict[str, float] = {"embed": t * h0 * w0 * spec.embed * spec.in_chans * math.prod(spec.patch)}
    linear = 4 + 2 * spec.mlp_ratio  # qkv 3 + proj 1 + MLP 2·ratio, times N·C²
    for i, ((h, w), depth, n_kept) in enumerate(zip(grids, spec.depths, kept, strict=True)):
        c = spec.embed * 2**i
        if i > 0:  # patch merging into this stage: 4·C_prev -> 2·C_prev per output token, dense
            add_parts(parts, merge=t * h * w * 4 * (c // 2) * c)
        win, padded = _window(spec, t, h, w)
        add_parts(parts, attention=depth * 2 * padded * math.prod(win) * c)
        add_parts(parts, qkv=depth * 3 * n_kept * c * c, proj=depth * n_kept * c * c)
        add_parts(parts, mlp=depth * (linear - 4) * n_kept * c * c)
    parts["head"] = spec.embed * 2 ** (len(spec.depths) - 1) * spec.num_classes
    return FlopCount(sum(parts.values()), swin_selection_flops(spec, config), parts)


def swin_selection_flops(spec: SwinSpec, config: STAConfig) -> float:
    """STA's own multiply-adds in a Video Swin (this adapter).

    The metric of a stage is the head-averaged key (or query/value) slice of its first block's qkv,
    computed on every stage-input token: the kept tokens reuse it in that block, so the extra work
    is the slice's projection of the *dropped* tokens (``dropped·C²``), plus the matching and
    transitions on ``c = C / heads`` dims. ``similarity="hidden"`` uses the tokens (``c = C``).
    """
    if config.method != "sta" or config.r == 0:
        return 0.0
    flops = 0.0
    for s in resolve_swin_plan(config, spec.temporal, spec.grids()[1:]).stages:
        channels = spec.embed * 2**s.layer
        flops += sta_selection_flops(s, metric_dim(config, channels, spec.heads[s.layer]), config)
        if config.similarity != "hidden":
            flops += s.units * s.r * channels * channels
    return flops


# --- loading ------------------------------------------------------------------------------------
SWIN_NAMES: tuple[str, ...] = ("swin3d_t", "swin3d_s", "swin3d_b")
# (embed dim, blocks in stage 3 = features.4) -> torchvision builder name; how a bare Swin file reveals its size.
_SWIN_BY_SHAPE: dict[tuple[int, int], str] = {(96, 6): "swin3d_t", (96, 18): "swin3d_s", (128, 18): "swin3d_b"}


def swin_name_from_state(state: Mapping[str, Tensor]) -> str:
    """Which of swin3d_t/s/b a torchvision Swin3D state dict belongs to (embed dim, stage-3 depth)."""
    embed = int(state["patch_embed.proj.weight"].shape[0])
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"^features\.4\.(\d+)\.", k))}
    name = _SWIN_BY_SHAPE.get((embed, len(blocks)))
    if name is None:
        raise CheckpointError(f"unknown Swin3D geometry: embed {embed}, {len(blocks)} blocks in stage 3")
    return name


def load_torchvision_swin(name: str | None, weights: str | Path, state: Mapping[str, Tensor] | None = None) -> LoadedModel:
    """torchvision ``swin3d_{t,s,b}`` with weights from a local file, verified.

    ``name=None`` infers the variant from the tensors. The class count comes from ``head.weight``.
    Preprocessing: :meth:`Preprocessing.kinetics_swin` (ImageNet mean/std, 224).
    """
    import torchvision.models.video as tvv

    state = read_state_dict(weights) if state is None else state
    if "patch_embed.proj.weight" not in state or "head.weight" not in state:
        raise CheckpointError(f"{weights}: not a torchvision Swin3D state dict (keys: {listing(state)})")
    name = name or swin_name_from_state(state)
    if name not in SWIN_NAMES:
        raise UnknownModelError(f"unknown Swin3D {name!r}; valid: {', '.join(SWIN_NAMES)}")
    model = getattr(tvv, name)(weights=None, num_classes=int(state["head.weight"].shape[0]))
    load_verified(model, state, f"checkpoint {weights}")
    return FAMILY.wrap(model, f"torchvision:{name}:{weights}")


# --- the family ---------------------------------------------------------------------------------
class Swin3dFamily(Family):
    name = "swin3d"
    title = "Video Swin (torchvision SwinTransformer3d)"
    classes = ("torchvision SwinTransformer3d (swin3d_t/s/b)",)
    input_layout = "BCTHW"
    protocols = {
        "k400": ViewProtocol(clips=4, crops=3, frames=32, stride=2, sampling="uniform"),
        "ssv2": ViewProtocol(clips=1, crops=3, frames=32, stride=2, sampling="uniform"),
    }
    r_name = "r1"
    builder_names = SWIN_NAMES
    tome_refusal = "window attention needs a full grid"
    block_locations = False  # prunes at the start of its stages, not after blocks of one stack
    stock_kernels_at_r0 = False  # the patch fuses window attention even when nothing is dropped
    no_weight_decay = ("relative_position",)  # the relative-position bias tables, as Video Swin's recipe

    def recognizes(self, model: nn.Module) -> bool:
        return is_swin3d(model)

    def patch(self, model: nn.Module, config: STAConfig) -> nn.Module:
        return patch_swin3d(model, config)

    def spec_of(self, model: nn.Module, frames: int | None = None, size: int | None = None) -> SwinSpec:
        """Read the geometry off a built Swin; the input defaults to 32x224² (the paper's), or to
        the grid of absolute positions installed as ``pos_drop`` (the demo Swin's)."""
        stages = _stages(model)
        first = stages[0][0]
        patch = tuple(model.patch_embed.tuple_patch_size)
        table = getattr(model.pos_drop, "table", None)
        default_frames, default_size = (table.shape[1] * patch[0], table.shape[2] * patch[1]) if table is not None else (32, 224)
        return SwinSpec(
            embed=model.patch_embed.proj.out_channels,
            depths=tuple(len(s) for s in stages),
            heads=tuple(s[0].attn.num_heads for s in stages),
            window=tuple(first.attn.window_size),
            patch=patch,
            frames=default_frames,
            size=default_size,
            num_classes=model.head.out_features,
            mlp_ratio=first.mlp[0].out_features / first.mlp[0].in_features,
        ).with_input(frames, size)

    def geometry(self, spec: SwinSpec) -> TokenGeometry:
        grids = tuple(
            StageGrid(f"stage {k + 1}", spec.temporal, h, w, spec.patch[1] * 2**k)
            for k, (h, w) in enumerate(spec.grids())
        )
        return TokenGeometry(spec.frames, spec.size, spec.patch[0], grids)

    def plan(self, spec: SwinSpec, config: STAConfig) -> PruningPlan:
        return resolve_swin_plan(config, spec.temporal, spec.grids()[1:])

    def levels(self, spec: SwinSpec) -> tuple[int, ...]:
        """The paper's r1 = 192/256/320 of Swin stage 2's 28x28 tokens per frame, scaled to the grid."""
        h, w = spec.grids()[1] if len(spec.depths) > 1 else spec.grids()[0]
        return scaled_levels(h * w, PAPER_R[1:], of=784)

    def flops(self, spec: SwinSpec, config: STAConfig) -> FlopCount:
        return swin_flops(spec, config)

    def build(self, spec: SwinSpec, attn_implementation: str = "sdpa") -> nn.Module:
        from torchvision.models.video.swin_transformer import SwinTransformer3d

        return SwinTransformer3d(
            patch_size=list(spec.patch),
            embed_dim=spec.embed,
            depths=list(spec.depths),
            num_heads=list(spec.heads),
            window_size=list(spec.window),
            stochastic_depth_prob=0.0,
            num_classes=spec.num_classes,
        ).eval()

    def preprocessing(self, size: int) -> Preprocessing:
        return Preprocessing.kinetics_swin(size)

    def wrap(self, model: nn.Module, source: str, folder: Path | None = None) -> LoadedModel:
        return LoadedModel(
            model=model.eval(),
            family=self,
            preprocessing=self.preprocessing(224),
            num_classes=int(model.head.out_features),
            frames=None,
            image_size=None,
            source=source,
        )

    def claims_file(self, state: Mapping[str, Tensor]) -> bool:
        return any(k.startswith("features.") for k in state) and "patch_embed.proj.weight" in state

    def load_file(self, path: Path, state: Mapping[str, Tensor], **geometry: Any) -> LoadedModel:
        return load_torchvision_swin(None, path, state)

    def load_builder(self, name: str, weights: str | Path) -> LoadedModel:
        """``swin3d_t|s|b`` with a local weights file."""
        return load_torchvision_swin(name, weights)

    # analysis
    def blocks(self, model: nn.Module) -> list[tuple[nn.Module, int]]:
        return [(block, k) for k, stage in enumerate(_stages(model)) for block in stage]

    def kept_grid_index(self, stage: Stage) -> int:
        return stage.layer  # Swin plans use the Swin stage index as the layer

    def final_features(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The last stage's output before the final norm; when that stage was pruned only its kept
        positions (the refilled ones are copies)."""
        from ...adapters.state import final_kept, kept_stages

        tokens = capture_output(model.features[-1], lambda: model(x)).flatten(1, 3)  # (B, T, h, w, C) -> (B, L, C)
        source = final_kept(model)
        last_stage = len(_stages(model)) - 1
        if source is None or kept_stages(model)[-1].layer != last_stage:
            return tokens, None
        return tokens.gather(1, source.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])), source


FAMILY = Swin3dFamily()
PAPER_R = (0, 192, 256, 320)


def _entry(name: str, spec: SwinSpec, paper: tuple[float, ...], description: str) -> ModelEntry:
    return ModelEntry(name, FAMILY.name, spec, levels=PAPER_R[1:], paper_gflops=dict(zip(PAPER_R, paper, strict=True)),
                      description=description)


REGISTRATION = FamilyModels(
    FAMILY,
    (
        _entry("VideoSwin-T", SwinSpec(96, (2, 2, 6, 2), (3, 6, 12, 24)), (88, 68, 61, 54), "Video Swin-T, 32x224²"),
        _entry("VideoSwin-S", SwinSpec(96, (2, 2, 18, 2), (3, 6, 12, 24)), (166, 121, 106, 91), "Video Swin-S, 32x224²"),
        _entry("VideoSwin-B", SwinSpec(128, (2, 2, 18, 2), (4, 8, 16, 32)), (282, 202, 176, 149), "Video Swin-B (K400), 32x224²"),
        _entry(
            "VideoSwin-B-SSV2",
            SwinSpec(128, (2, 2, 18, 2), (4, 8, 16, 32), window=(16, 7, 7), num_classes=174),
            (321, 241, 215, 188),
            "Video Swin-B (SSV2, window 16x7x7), 32x224²",
        ),
    ),
)

__all__ = [
    "FAMILY",
    "REGISTRATION",
    "SWIN_NAMES",
    "FusedWindowAttention",
    "SwinSpec",
    "Swin3dFamily",
    "WindowLayout",
    "is_swin3d",
    "nearest_kept_fill",
    "patch_swin3d",
    "resolve_swin_plan",
    "shift_mask",
    "stage_grids",
    "swin_stage_drops",
    "window_layout",
]

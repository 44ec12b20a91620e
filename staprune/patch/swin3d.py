"""Adapter for torchvision's Video Swin (``SwinTransformer3d``: ``swin3d_t``/``swin3d_s``/``swin3d_b``).

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
from dataclasses import dataclass, field
from functools import lru_cache
from types import MethodType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import PruningPlan, STAConfig, Stage, resolve_swin_plan
from ..score import gather_tokens, head_mean
from .common import Patch

MASK_VALUE = -100.0  # torchvision's shift-mask value (not -inf): kept for exact equality
NOMINAL_INPUT = (32, 224, 224)  # frames, height, width checked at patch time (the paper's input)
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


@lru_cache(maxsize=64)
def window_layout(
    size: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int], device: torch.device
) -> WindowLayout:
    """Build (and cache) the :class:`WindowLayout` of a ``(T, H, W)`` grid."""
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


# --- nearest kept fill --------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _squared_distances(h: int, w: int, device: torch.device) -> Tensor:
    """``(h*w, h*w)`` squared Euclidean distances between grid cells (exact in float32)."""
    with torch.inference_mode(False):
        rows = torch.arange(h * w) // w
        cols = torch.arange(h * w) % w
        d = (rows.view(-1, 1) - rows.view(1, -1)) ** 2 + (cols.view(-1, 1) - cols.view(1, -1)) ** 2
        return d.float().to(device)


def nearest_kept_fill(keep: Tensor, frames: int, grid_hw: tuple[int, int], chunk: int = 1 << 23) -> Tensor:
    """For every grid position, the kept token whose value it takes.

    Kept positions map to themselves. A dropped position takes its nearest kept token in the
    same frame by Euclidean distance on ``(row, col)``; ties go to the lowest flat index
    (smallest row, then smallest column).

    Args:
        keep: ``(B, K)`` kept flat positions ``t*h*w + row*w + col`` (any order, no repeats).
        frames: ``T``; grid_hw: ``(h, w)``.
        chunk: cap on distance-matrix entries per step (memory bound).
    Returns:
        ``(B, T*h*w)`` long indices into ``keep``'s K tokens.
    Raises:
        ValueError: a frame has no kept token.
    """
    bsz, n_keep = keep.shape
    h, w = grid_hw
    n = h * w
    kept = torch.zeros(bsz, frames * n, dtype=torch.bool, device=keep.device).scatter_(1, keep, True)
    kept = kept.view(bsz * frames, n)
    if not bool(kept.any(-1).all()):
        raise ValueError("a frame has no kept token; nearest-kept filling needs at least one per frame")
    dist = _squared_distances(h, w, keep.device)
    nearest = torch.empty(bsz * frames, n, dtype=torch.long, device=keep.device)
    step = max(1, chunk // (n * n))
    for i in range(0, bsz * frames, step):
        masked = dist.masked_fill(~kept[i : i + step, None, :], float("inf"))  # (step, n, n)
        nearest[i : i + step] = masked.argmin(-1)  # first minimum = lowest flat index
    offsets = torch.arange(frames, device=keep.device).repeat(bsz).view(-1, 1) * n
    nearest = (nearest + offsets).view(bsz, frames * n)
    slot = torch.full((bsz, frames * n), -1, dtype=torch.long, device=keep.device)
    slot.scatter_(1, keep, torch.arange(n_keep, device=keep.device).expand(bsz, -1))
    return slot.gather(1, nearest)


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
        stage = None if state is None else next((s for s in state.plan.stages if s.layer == index), None)
        if stage is None or stage.r == 0 or p.config.method == "none":
            return nn.Sequential.forward(self, x)
        bsz, t, h, w, c = x.shape
        if t * h * w != stage.units * stage.tokens_in:
            raise ValueError(f"Swin stage {index + 1} got a {t}x{h}x{w} grid, the plan expected other geometry")
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
        raise TypeError(
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

    plan_for(*NOMINAL_INPUT)

    def start(module: nn.Module, args: tuple) -> None:
        pixels = args[0]
        plan = plan_for(*pixels.shape[-3:])
        _, grids = stage_grids(model, *pixels.shape[-3:])
        p.start(plan, pixels, grids[1], pixels.device)

    p.add_hook(model.register_forward_pre_hook(start))
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


__all__ = [
    "FusedWindowAttention",
    "WindowLayout",
    "is_swin3d",
    "nearest_kept_fill",
    "patch_swin3d",
    "shift_mask",
    "stage_grids",
    "window_layout",
]

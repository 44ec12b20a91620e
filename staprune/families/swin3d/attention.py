"""Fused window attention for torchvision's ``ShiftedWindowAttention3d``, and the kept-query subsets
a pruned stage computes.

Every patched ``ShiftedWindowAttention3d`` runs through ``F.scaled_dot_product_attention`` with the
relative-position bias and the shift mask added as one additive ``attn_mask``, on the slots of a
:class:`~.windows.WindowLayout`, so an unpruned patched model matches stock to float rounding.
Windows are grouped by their shift-mask pattern (at most 8 patterns: "last window along T / H / W
or not"), so each SDPA call takes one ``(1, heads, N, N)`` mask that broadcasts over its windows
instead of a per-window mask as large as the scores. Padded positions get ``q, k, v = qkv bias``,
exactly what torchvision's linear layer gives its zero padding.

In a pruned stage, where every window of a shift pattern keeps at most
:data:`QUERY_SUBSET_MAX_FILL` of its slots, only the kept queries are computed (padded to the
fullest window), against all keys (:func:`query_subsets`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.score import true_first
from ...core.tracing import tracing
from .windows import WindowLayout, relative_position_bias, shift_mask, window_and_shift, window_layout


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
    if tracing():  # the subset's width is data-dependent: compute every query
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
        # Each window's kept slots first, in slot order; the tail pads to `width`.
        slots = true_first(kept)[:, :max(1, width)]
        out.append(QuerySubset(slots.contiguous(), group.gather(1, slots)))
    return out


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
        if (torch.is_grad_enabled() and table.requires_grad) or torch.compiler.is_exporting():
            return self._build_masks(layout, device, dtype, query_major)  # in the graph, never cached
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
        bias = bias() if callable(bias) else bias  # a dynamically quantized Linear returns its bias by call
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
            rows_out = o.transpose(1, 2)  # SDPA's kernels write (N, heads) order: a free reshape below
            if torch.compiler.is_exporting():  # an exporter's SDPA may not: copy where the graph says so
                rows_out = rows_out.clone(memory_format=torch.contiguous_format)
            out.index_copy_(0, targets, rows_out.reshape(-1, channels))
            start += count * n
        return out[:n_out]

    def project(self, x: Tensor) -> Tensor:
        """The module's output projection and dropout: ``(..., C) -> (..., C)``."""
        return F.dropout(self.attn.proj(x), p=self.attn.dropout, training=self.attn.training)

    def layout_for(self, size: tuple[int, int, int], device: torch.device) -> WindowLayout:
        """The (cached) layout of a ``(T, H, W)`` grid under this module's window and shift."""
        window, shift = window_and_shift(self.attn, size)
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


def fused_attention_forward(helper: FusedWindowAttention) -> Callable[[nn.Module, Tensor], Tensor]:
    """A ``forward`` for ``helper``'s attention module (bound with ``MethodType``) that runs through it."""

    def forward(self, x: Tensor) -> Tensor:
        return helper(x)

    return forward


__all__ = ["QUERY_SUBSET_MAX_FILL", "FusedWindowAttention", "QuerySubset", "fused_attention_forward", "query_subsets"]

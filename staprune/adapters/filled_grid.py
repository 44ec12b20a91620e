"""The filled-grid recipe (the paper's Video Swin recipe, also used for TimeSformer): attention that
needs a full grid runs on one, every dropped position taking a copy of its nearest kept token.

Written once here for every family whose attention needs full grids (Video Swin's windows,
TimeSformer's divided attention), so the families only find their tensors and apply the indices:

* the fill map (:func:`nearest_kept_fill`): the kept token each grid position copies;
* the qkv rows the grid reads through it: :func:`fill_grid` gathers a full grid of rows,
  :func:`fill_rows` gives the row index of chosen positions (padding included) for an attention
  that gathers rows itself;
* the similarity metric read off one slice (query, key or value) of a packed qkv projection:
  :func:`qkv_part` picks the slice from the config, :func:`project_slice` computes it alone,
  :func:`kept_qkv` packs the kept tokens' qkv around an already computed slice (cutting a slice out
  of a computed projection and averaging its heads are tensor functions every family uses:
  :func:`staprune.core.score.packed_slice`, :func:`staprune.core.score.slice_metric`).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import STAConfig
from ..core.errors import ConfigError
from ..core.score import gather_tokens, packed_slice
from ..core.tracing import tracing

# Where each similarity source sits in a packed ``[q | k | v]`` projection.
QKV_PARTS = {"query": 0, "key": 1, "value": 2}


def _grid_distances(h: int, w: int, device: torch.device) -> Tensor:
    """``(h*w, h*w)`` squared Euclidean distances between grid cells (exact in float32)."""
    rows = torch.arange(h * w, device=device) // w
    cols = torch.arange(h * w, device=device) % w
    d = (rows.view(-1, 1) - rows.view(1, -1)) ** 2 + (cols.view(-1, 1) - cols.view(1, -1)) ** 2
    return d.float()


@lru_cache(maxsize=16)
def _cached_distances(h: int, w: int, device: torch.device) -> Tensor:
    with torch.inference_mode(False):  # cached: must be usable outside inference mode
        return _grid_distances(h, w, device)


def _squared_distances(h: int, w: int, device: torch.device) -> Tensor:
    # Under torch.compile the table is part of the graph (a cache lookup cannot be traced).
    return _grid_distances(h, w, device) if tracing() else _cached_distances(h, w, device)


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
    if not tracing() and not bool(kept.any(-1).all()):
        raise ConfigError("a frame has no kept token; nearest-kept filling needs at least one per frame")
    dist = _squared_distances(h, w, keep.device)
    if torch.compiler.is_exporting():
        # One frame of every clip per step: steps that do not depend on the batch size, which
        # stays a dynamic axis of the exported graph.
        per_frame = kept.view(bsz, frames, n)
        nearest = torch.stack([dist.masked_fill(~per_frame[:, t, None, :], float("inf")).argmin(-1)
                               for t in range(frames)], dim=1).view(bsz * frames, n)
    else:
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


def fill_grid(rows: Tensor, fill: Tensor) -> Tensor:
    """The full grid from the kept tokens' rows: every position a copy of its fill token's row.

    Args:
        rows: ``(B, K, ...)`` one row per kept token (qkv, hidden states, ...).
        fill: ``(B, L)`` from :func:`nearest_kept_fill`.
    Returns:
        ``(B, L, ...)``.
    """
    return gather_tokens(rows, fill)


def fill_rows(fill: Tensor, positions: Tensor, n_keep: int) -> Tensor:
    """The kept row each of ``positions`` reads through the fill, for attention that gathers rows.

    Args:
        fill: ``(B, L)`` from :func:`nearest_kept_fill`, indices into ``K = n_keep`` kept rows.
        positions: ``(P,)`` flat grid positions in ``[0, L]``; ``L`` marks padding.
        n_keep: ``K``; padding reads row ``K`` (the caller appends a padding row after the kept ones).
    Returns:
        ``(B, P)`` row indices in ``[0, K]``.
    """
    padded = torch.cat([fill, fill.new_full((fill.shape[0], 1), n_keep)], dim=1)
    return padded.index_select(1, positions)


def qkv_part(config: STAConfig) -> int | None:
    """The slice of a packed qkv projection that gives STA's metric (0 query, 1 key, 2 value), or
    None when no metric is read off the attention (a method other than ``sta``, or ``similarity="hidden"``)."""
    return QKV_PARTS.get(config.similarity) if config.method == "sta" else None


def project_slice(qkv: nn.Linear, x: Tensor, part: int) -> Tensor:
    """Slice ``part`` of the packed projection ``qkv`` (``C -> 3C``), computed alone:
    ``(B, L, C) -> (B, L, C)``."""
    if not isinstance(qkv.weight, Tensor):  # a dynamically quantized Linear: no float weight to slice
        return packed_slice(qkv(x), part)
    c = qkv.weight.shape[0] // 3
    bias = None if qkv.bias is None else qkv.bias[part * c : (part + 1) * c]
    return F.linear(x, qkv.weight[part * c : (part + 1) * c], bias)


def kept_qkv(qkv: nn.Linear, x_kept: Tensor, part: int, sliced_kept: Tensor) -> Tensor:
    """The packed projection ``(B, K, 3C)`` of kept tokens ``x_kept`` ``(B, K, C)``, reusing slice
    ``part`` (``sliced_kept`` ``(B, K, C)``, computed for the metric) and computing the other two."""
    pieces = [sliced_kept if i == part else project_slice(qkv, x_kept, i) for i in range(3)]
    return torch.cat(pieces, dim=-1)

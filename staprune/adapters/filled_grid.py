"""The filled-grid recipe (the paper's Video Swin recipe, also used for TimeSformer): attention that
needs a full grid runs on one, every dropped position taking a copy of its nearest kept token.

Written once here for every family whose attention needs full grids: the fill map
(:func:`nearest_kept_fill`), the qkv rows each grid position reads, and the similarity metric read
off one slice of a packed qkv projection.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from ..core.errors import ConfigError


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
    return _grid_distances(h, w, device) if torch.compiler.is_compiling() else _cached_distances(h, w, device)


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
    if not torch.compiler.is_compiling() and not bool(kept.any(-1).all()):
        raise ConfigError("a frame has no kept token; nearest-kept filling needs at least one per frame")
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

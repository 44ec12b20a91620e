"""Window layout of torchvision's Video Swin: stage grids, where every token sits once a grid is
padded, rolled and cut into windows, the shift masks and the relative-position bias.

Pure index bookkeeping, kept apart from the attention that uses it: a :class:`WindowLayout` is built
once per geometry (and cached), then every window attention of that geometry gathers and scatters
with it. Padding, cyclic shift, window order, masks (-100) and bias follow torchvision exactly, so
attention run through a layout matches the stock module.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...core.tracing import shape_constant

MASK_VALUE = -100.0  # torchvision's shift-mask value (not -inf): kept for exact equality


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive integers."""
    return -(-a // b)


def stage_grids(model: nn.Module, frames: int, height: int, width: int) -> tuple[int, list[tuple[int, int]]]:
    """Temporal positions and the ``(h, w)`` token grid of every Swin stage for an input size.

    Patch embedding pads up to a multiple of the patch size; each patch merging pads to even.
    """
    pt, ph, pw = model.patch_embed.tuple_patch_size
    h, w = ceil_div(height, ph), ceil_div(width, pw)
    grids = [(h, w)]
    for _ in range(len(stage_modules(model)) - 1):
        h, w = ceil_div(h, 2), ceil_div(w, 2)
        grids.append((h, w))
    return ceil_div(frames, pt), grids


def stage_modules(model: nn.Module) -> list[nn.Sequential]:
    """The Swin stages of ``model.features`` (the even entries; the odd ones are patch mergings)."""
    return [m for i, m in enumerate(model.features) if i % 2 == 0]


def window_and_shift(
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
        padded: whether any slot is padding. window_volume: ``N``.
    """

    src: Tensor
    slot: Tensor
    groups: tuple[tuple[int, tuple[bool, bool, bool]], ...]
    window: tuple[int, int, int]
    shift: tuple[int, int, int]
    padded: bool
    window_volume: int  # N (a field, not a property: Dynamo reads the layout as a traced constant)


_LAYOUTS: dict[tuple, WindowLayout] = {}
_MAX_LAYOUTS = 64


def window_layout(
    size: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int], device: torch.device
) -> WindowLayout:
    """The (cached) :class:`WindowLayout` of a ``(T, H, W)`` grid.

    Layouts are index bookkeeping built once per geometry, from the shape alone: while
    ``torch.export`` or ``torch.compile`` trace a new input size, the layout is still built eagerly
    and enters the graph as a constant (:func:`staprune.core.tracing.shape_constant`).
    """
    return _cached_layout(size, window, shift, device)


@shape_constant
def _cached_layout(
    size: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int], device: torch.device
) -> WindowLayout:
    key = (size, window, shift, device)
    if key not in _LAYOUTS:
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
        return WindowLayout(src.to(device), slot[:length].to(device), groups, window, shift, padded, math.prod(window))


def _window_positions(
    size: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int]
) -> tuple[Tensor, list[int]]:
    """Flat grid position (``L`` = padding) of every in-window slot, ``(windows, N)`` in
    torchvision's window order, and the window count along each axis."""
    coords, valids, counts = [], [], []
    for axis, (s, w, sh) in enumerate(zip(size, window, shift, strict=True)):
        n = ceil_div(s, w)
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


__all__ = [
    "MASK_VALUE",
    "WindowLayout",
    "ceil_div",
    "relative_position_bias",
    "shift_mask",
    "stage_grids",
    "stage_modules",
    "window_and_shift",
    "window_layout",
]

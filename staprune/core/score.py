"""STA as tensor functions (docs/algorithm/index.md, "The algorithm as published", steps 1-8).

Nothing here knows about models: callers pass hidden states and a similarity metric laid out
as ``(B, L, ·)`` with ``L = units * n`` (units contiguous, temporal order) and get back the
indices of the tokens to keep. Everything is batched over ``B``; only the walk over temporal
units is a Python loop (it is sequential by definition). Index selection never carries
gradients; callers gather with the returned indices so kept tokens keep theirs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import largest_square_grid
from .selection_hook import selection_function


# --- randomness -------------------------------------------------------------------------------
class PerSampleRandom:
    """Uniform noise drawn from one independent, seeded stream per clip.

    One stream per clip (instead of one for the batch) makes random choices independent of what
    else is in the batch: a clip gets the same draws alone or batched.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.generators = []
        for s in seeds:
            g = torch.Generator(device="cpu")
            g.manual_seed(int(s))
            self.generators.append(g)
        self.device = torch.device(device)

    def rand(self, *shape: int) -> Tensor:
        """Noise of shape ``(B, *shape)`` in [0, 1), row ``b`` from clip ``b``'s stream."""
        rows = [torch.rand(shape, generator=g) for g in self.generators]
        return torch.stack(rows).to(self.device)


def sample_seeds(pixels: Tensor, seed: int) -> list[int]:
    """Derive one seed per clip from ``seed`` and the clip's own pixels ``(B, ...)``.

    Hashes a fixed strided subsample (a few thousand values) so it costs nothing next to a
    forward pass, yet two different clips practically never share a stream.
    """
    flat = pixels.detach().reshape(pixels.shape[0], -1)
    step = max(1, flat.shape[1] // 4096)
    sub = flat[:, ::step].float().cpu().contiguous()
    seeds = []
    for row in sub:
        h = hashlib.blake2b(row.numpy().tobytes(), digest_size=8, key=str(seed).encode())
        seeds.append(int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return seeds


# --- scores -----------------------------------------------------------------------------------
def _at_least_fp32(t: Tensor) -> Tensor:
    """Scores are ranked, so half precision would create ties: compute in fp32 (fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def normalize_metric(metric: Tensor) -> Tensor:
    """L2-normalise the last dim (fp32 or wider) so dot products are cosine similarities. ``(..., c)``."""
    return F.normalize(_at_least_fp32(metric), dim=-1)


def head_mean(t: Tensor) -> Tensor:
    """Per-head attention tensor ``(B, heads, L, d)`` -> normalised head average ``(B, L, d)``."""
    return normalize_metric(_at_least_fp32(t).mean(1))


def semantic_score(x: Tensor) -> Tensor:
    """Eq. (4) with the paper's min-max normalisation inside each unit.

    Args:
        x: hidden states ``(B, U, n, C)``.
    Returns:
        ``F`` of shape ``(B, U, n)`` in [0, 1]; a unit whose tokens all have the same activation
        sum gets F = 0 everywhere (never NaN).
    """
    f = _at_least_fp32(x).abs().sum(-1)
    lo = f.amin(-1, keepdim=True)
    span = f.amax(-1, keepdim=True) - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (f - lo) / safe, torch.zeros_like(f))


def transition(m_cur: Tensor, m_prev: Tensor) -> Tensor:
    """Eq. (3): ``P = softmax over current tokens of m_cur · m_prevᵀ``.

    Args:
        m_cur: ``(B, n, c)`` normalised metric of the current unit.
        m_prev: ``(B, k, c)`` normalised metric of the previous unit's (kept) tokens.
    Returns:
        ``(B, n, k)``; each column sums to 1.
    """
    return torch.softmax(m_cur @ m_prev.transpose(1, 2), dim=1)


def combine_scores(accumulated: Tensor | None, semantic: Tensor, score: str) -> Tensor:
    """Eq. (5) and its ablations: ``sta`` A*(1-F), ``temporal`` A, ``semantic`` 1-F. ``(B, n)``."""
    if score == "semantic":
        return 1.0 - semantic
    assert accumulated is not None
    if score == "temporal":
        return accumulated
    return accumulated * (1.0 - semantic)


# --- orderings every exporter can lower ----------------------------------------------------------
def stable_argsort(values: Tensor, descending: bool = False) -> Tensor:
    """``values.argsort(dim=-1, stable=True)``: ties keep index order (the published tie-breaking).

    ONNX has no stable sort (``aten.sort.stable`` has no ONNX function), so while ``torch.export``
    (or ``torch.onnx.export``) traces, the order comes from ranks instead: a value's rank is how many
    values sort before it, ties broken by index, the same order, from comparisons and a sum. ``O(n²)``
    per row, hence only there.
    """
    if not torch.compiler.is_exporting():
        return values.argsort(dim=-1, descending=descending, stable=True)
    n = values.shape[-1]
    mine, other = values.unsqueeze(-1), values.unsqueeze(-2)  # (..., n, 1), (..., 1, n)
    index = torch.arange(n, device=values.device)
    earlier = index.view(1, n) < index.view(n, 1)  # [i, j]: j comes before i on a tie
    before = (other > mine) if descending else (other < mine)
    rank = (before | ((other == mine) & earlier)).sum(-1)
    return torch.zeros_like(rank).scatter(-1, rank, index.expand_as(rank))


def lowest_k(values: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` lowest values along the last axis, lowest first, equal values by index.

    Where no two values are equal this is ``values.topk(k, largest=False).indices``, bit for bit.
    Among equal values topk's choice is unspecified (CPU: ``std::nth_element`` or ``partial_sort``;
    ONNX ``TopK``: lowest index first), so an exported graph could keep other tokens than PyTorch; a
    stable order is the same everywhere (while exporting, :func:`stable_argsort`'s ranks). Video Swin
    makes equal scores common: patch merging turns identical 2x2 blocks of a refilled grid into
    identical tokens.
    """
    return stable_argsort(values)[..., :k]


def true_first(mask: Tensor) -> Tensor:
    """The positions along the last axis with ``mask`` True, then those with it False, each in index
    order (a stable sort of ``~mask``), from cumulative sums: exact, linear, and exportable."""
    flag = mask.long()
    rank = torch.where(mask, flag.cumsum(-1), flag.sum(-1, keepdim=True) + (1 - flag).cumsum(-1)) - 1
    index = torch.arange(mask.shape[-1], device=mask.device).expand_as(rank)
    return torch.zeros_like(rank).scatter(-1, rank, index)


# --- first-unit pruners -----------------------------------------------------------------------
# Each returns a permutation (B, n) of the unit's tokens: the n-r kept ones first, then the r
# dropped ones. The published "all tokens of the first unit" transition uses the whole permutation.
def bipartite_first_unit(metric: Tensor, r: int) -> Tensor:
    """Bipartite drop (ToMe's matching, dropping instead of merging), docs/algorithm/index.md step 5.

    A = even positions, B = odd. Each A token's best cosine match in B; the r A tokens with the
    highest best match are dropped. Kept order: all B tokens, then the other A tokens by best
    match ascending. One round can drop at most |B| = floor(n/2) tokens; a larger r (Video
    Swin's later stages drop up to 60-80% of a frame) repeats the round on the kept tokens.

    Args: metric ``(B, n, c)`` normalised. Returns ``(B, n)``: kept first, then dropped.
    """
    ids = torch.arange(metric.shape[1], device=metric.device).expand(metric.shape[0], -1)
    dropped: list[Tensor] = []
    while r > 0:
        step = min(r, metric.shape[1] // 2)
        order = _bipartite_round(metric, step)
        kept_local = order[:, : metric.shape[1] - step]
        dropped.insert(0, ids.gather(1, order[:, metric.shape[1] - step :]))
        ids, metric, r = ids.gather(1, kept_local), _take(metric, kept_local), r - step
    return torch.cat([ids, *dropped], dim=1)


def _bipartite_round(metric: Tensor, r: int) -> Tensor:
    bsz, n, _ = metric.shape
    a, b = metric[:, 0::2], metric[:, 1::2]
    best = (a @ b.transpose(1, 2)).amax(-1)  # (B, |A|)
    by_match_desc = stable_argsort(best, descending=True)
    dropped_a = by_match_desc[:, :r]
    kept_a = by_match_desc[:, r:].flip(-1)  # ascending best match
    pos_b = torch.arange(1, n, 2, device=metric.device).expand(bsz, -1)
    return torch.cat([pos_b, 2 * kept_a, 2 * dropped_a], dim=1)


def random_first_unit(noise: Tensor, r: int) -> Tensor:
    """Drop the r tokens with the largest noise ``(B, n)``; kept tokens in their original order."""
    n = noise.shape[1]
    dropped = noise.topk(r, dim=-1).indices if r else noise.new_zeros(noise.shape[0], 0, dtype=torch.long)
    keep_mask = torch.ones_like(noise, dtype=torch.bool).scatter(1, dropped, False)
    kept = torch.arange(n, device=noise.device).expand_as(noise)[keep_mask].view(noise.shape[0], n - r)
    return torch.cat([kept, dropped], dim=1)


def grid_first_unit(noise: Tensor, positions: Tensor, grid_hw: tuple[int, int], r: int) -> Tensor:
    """Grid drop: split the frame into a g x g grid (g = ceil(sqrt r)) and drop one random token
    per cell (the paper's sqrt(r) x sqrt(r) grid for square r).

    When there are more cells than r (non-square r) the cells that lose a token are chosen at
    random; when a unit has fewer occupied cells than r (later stages), the remaining drops are
    random tokens. Args: noise ``(B, n)``, positions ``(B, n)`` original flat token index
    ``t * H * W + row * W + col``, grid_hw = (H, W). Returns ``(B, n)`` as the other pruners.
    """
    h, w = grid_hw
    g = largest_square_grid(r)
    spatial = positions % (h * w)
    cell = (spatial // w * g // h) * g + (spatial % w * g // w)
    cell_max = torch.full((noise.shape[0], g * g), -1.0, device=noise.device, dtype=noise.dtype)
    cell_max = cell_max.scatter_reduce(1, cell, noise, reduce="amax")
    is_representative = noise == cell_max.gather(1, cell)
    return random_first_unit(noise + is_representative.to(noise.dtype), r)


# --- STA selection ----------------------------------------------------------------------------
@selection_function
def sta_keep_indices(
    hidden: Tensor,
    metric: Tensor,
    units: int,
    r: int,
    *,
    forward: bool = True,
    first_unit: str = "bipartite",
    score: str = "sta",
    first_transition: str = "all",
    rng: PerSampleRandom | None = None,
    positions: Tensor | None = None,
    grid_hw: tuple[int, int] | None = None,
) -> Tensor:
    """Select the tokens STA keeps at one stage (docs/algorithm/index.md steps 2-8).

    Args:
        hidden: block output ``(B, L, C)``, ``L = units * n``, units contiguous in temporal order.
        metric: similarity features ``(B, L, c)`` (normalised here).
        units: temporal units at this stage; ``r`` tokens are dropped from each.
        forward: walk units first-to-last (``F``) or last-to-first (``B``).
        first_unit: ``bipartite`` | ``random`` | ``grid`` (the latter two need ``rng``; grid
            also ``positions`` ``(B, L)`` and ``grid_hw``).
        score: ``sta`` | ``temporal`` | ``semantic``.
        first_transition: ``all`` | ``kept`` (see STAConfig).
    Returns:
        ``(B, units * (n - r))`` indices into ``L``: units in temporal order, each unit's kept
        tokens in selection order (topk order; the first unit in its pruner's order).
    """
    bsz, length, channels = hidden.shape
    n = length // units
    if r == 0:
        return torch.arange(length, device=hidden.device).expand(bsz, -1)
    keep = n - r
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        sem = semantic_score(hidden.detach().reshape(bsz, units, n, channels))
        m = normalize_metric(metric.detach()).reshape(bsz, units, n, -1)
        kept_per_unit: list[Tensor] = [hidden.new_empty(0)] * units
        walk = range(units) if forward else range(units - 1, -1, -1)
        m_prev = a_prev = None
        for step, u in enumerate(walk):
            if step == 0:
                if first_unit == "bipartite":
                    perm = bipartite_first_unit(m[:, u], r)
                else:
                    assert rng is not None, "random/grid first-unit pruning needs a PerSampleRandom"
                    noise = rng.rand(n)
                    if first_unit == "grid":
                        assert positions is not None and grid_hw is not None
                        pos = positions.reshape(bsz, units, n)[:, u]
                        perm = grid_first_unit(noise, pos, grid_hw, r)
                    else:
                        perm = random_first_unit(noise, r)
                kept = perm[:, :keep]
                if first_transition == "all":
                    m_prev = m[:, u]  # order is irrelevant: A = P · 1 sums over all of them
                    a_prev = m.new_ones(bsz, n)
                else:
                    m_prev = _take(m[:, u], kept)
                    a_prev = m.new_full((bsz, keep), 1.0 / keep)
            else:
                if score == "semantic":
                    acc = None
                else:
                    acc = (transition(m[:, u], m_prev) @ a_prev.unsqueeze(-1)).squeeze(-1)
                s = combine_scores(acc, sem[:, u], score)
                kept = lowest_k(s, keep)
                if acc is not None:
                    a_kept = acc.gather(1, kept)
                    a_prev = a_kept / a_kept.sum(-1, keepdim=True)
                    m_prev = _take(m[:, u], kept)
            kept_per_unit[u] = kept
        offsets = torch.arange(units, device=hidden.device).view(1, units, 1) * n
        return (torch.stack(kept_per_unit, dim=1) + offsets).reshape(bsz, units * keep)


def _take(x: Tensor, index: Tensor) -> Tensor:
    """Gather rows: x ``(B, n, C)``, index ``(B, k)`` -> ``(B, k, C)``."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Keep tokens ``index`` ``(B, k)`` of ``x`` ``(B, L, ...)`` (gradients flow to kept tokens)."""
    bsz, length = x.shape[:2]
    if x.stride(0) != x.stride(1) * length:  # batch and token axes cannot merge without a copy
        idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        return x.gather(1, idx)
    # Whole rows by index_select on the merged (batch, token) axis: the same values as gather, but a
    # row copy instead of one index per element (about 5x faster on CPU for 768-wide rows).
    rows = (index + torch.arange(bsz, device=index.device).view(-1, 1) * length).reshape(-1)
    return x.flatten(0, 1).index_select(0, rows).view(bsz, index.shape[1], *x.shape[2:])


# --- key metrics from attention projections ---------------------------------------------------
def packed_slice(qkv: Tensor, part: int) -> Tensor:
    """Slice ``part`` (0 query, 1 key, 2 value) of a computed packed projection: ``(..., 3C) -> (..., C)``."""
    c = qkv.shape[-1] // 3
    return qkv[..., part * c : (part + 1) * c]


def slice_metric(sliced: Tensor, heads: int) -> Tensor:
    """STA's metric from one qkv slice: split ``(B, L, C)`` into ``heads`` and average them,
    normalised: ``(B, L, C / heads)``."""
    return head_mean(sliced.view(*sliced.shape[:2], heads, -1).transpose(1, 2))

"""Baselines under STA's interface: random dropping, whole evenly spaced units and static-patch
dropping (video LLMs), and ToMe merging, as tensor functions.

``random_keep_indices`` returns keep indices exactly like :func:`staprune.core.score.sta_keep_indices`.
ToMe changes token values (size-weighted averages), so :func:`tome_merge` returns the merged
tokens together with their sizes and representative source indices.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .score import PerSampleRandom, gather_tokens, normalize_metric, random_first_unit, stable_argsort
from .selection_hook import selection_function


@selection_function
def random_keep_indices(rng: PerSampleRandom, bsz: int, units: int, n: int, r: int) -> Tensor:
    """Drop ``r`` uniformly random tokens in each of ``units`` units of ``n`` tokens.

    Returns ``(B, units * (n - r))`` indices, units in temporal order, original order inside.
    """
    noise = rng.rand(units, n).reshape(bsz * units, n)
    kept = random_first_unit(noise, r)[:, : n - r].reshape(bsz, units, n - r)
    offsets = torch.arange(units, device=kept.device).view(1, units, 1) * n
    return (kept + offsets).reshape(bsz, units * (n - r))


def uniform_unit_count(units: int, n: int, keep: int) -> int:
    """Whole units :func:`uniform_unit_indices` keeps: ``round(units * keep / n)``, at least 1."""
    return max(1, min(units, round(units * keep / n)))


def uniform_unit_indices(units: int, n: int, keep: int, device: torch.device | str = "cpu") -> Tensor:
    """Keep whole temporal units, evenly spaced (fewer frames: how video-LLM users usually save tokens),
    about as many tokens as keeping ``keep`` of each unit's ``n``.

    Returns ``(m * n,)`` ascending indices into ``units * n``, ``m = round(units * keep / n)`` (at least 1)
    units spread from the first to the last.
    """
    chosen = torch.linspace(0, units - 1, uniform_unit_count(units, n, keep), device=device).round().long().unique()
    return (chosen.view(-1, 1) * n + torch.arange(n, device=device)).reshape(-1)


def static_keep_indices(change: Tensor, keep: int) -> Tensor:
    """Keep the ``keep`` tokens of each temporal unit whose pixels changed most (EVS and RLT drop the
    patches that stayed still), at STA's per-unit counts so the two differ only in which tokens.

    Args:
        change: ``(units, n)`` how much each token's pixels changed since the previous unit (the
            first unit: towards the next one, as it has no previous one).
    Returns:
        ``(units * keep,)`` ascending indices into ``units * n``; ties keep the earlier token.
    """
    units, n = change.shape
    kept = stable_argsort(change, descending=True)[:, :keep].sort(dim=1).values
    return (kept + torch.arange(units, device=change.device).view(-1, 1) * n).reshape(-1)


def unit_change(unit_pixels: Tensor) -> Tensor:
    """Each token's pixel change between neighbouring temporal units, for :func:`static_keep_indices`.

    Args:
        unit_pixels: ``(units, n, P)`` the (normalised) pixels each token covers, per unit.
    Returns:
        ``(units, n)`` mean absolute difference to the previous unit (unit 0: to unit 1; a video of
        one unit: zeros).
    """
    if unit_pixels.shape[0] < 2:
        return unit_pixels.new_zeros(unit_pixels.shape[:2])
    step = (unit_pixels[1:] - unit_pixels[:-1]).abs().mean(-1)
    return torch.cat([step[:1], step])


@selection_function
def tome_merge(
    x: Tensor, metric: Tensor, size: Tensor, source: Tensor, r: int
) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe's bipartite soft matching with size-weighted merging (Bolya et al., ICLR 2023).

    Tokens alternate into sets A (even positions) and B (odd); each A token's most similar B
    token is its edge; the ``r`` A tokens with the most similar edges are averaged into their B
    partner, weighted by how many original tokens each already stands for.

    Args:
        x: tokens ``(B, L, C)``.
        metric: ``(B, L, c)`` (keys averaged over heads).
        size: tokens represented by each token ``(B, L)``.
        source: original index of each token's representative ``(B, L)``.
        r: tokens to remove (at most ``ceil(L/2)``).
    Returns:
        merged ``x`` ``(B, L-r, C)``, ``size`` ``(B, L-r)``, ``source`` ``(B, L-r)``; unmerged A
        tokens first, then all B tokens.
    """
    if r <= 0:
        return x, size, source
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        m = normalize_metric(metric.detach())
        best, partner = (m[:, 0::2] @ m[:, 1::2].transpose(1, 2)).max(dim=-1)  # (B, |A|)
        order = stable_argsort(best, descending=True)
        merged_a, kept_a = order[:, :r], order[:, r:]
        dst = partner.gather(1, merged_a)
    xa, xb = x[:, 0::2], x[:, 1::2]
    sa, sb = size[:, 0::2].to(x.dtype), size[:, 1::2].to(x.dtype)
    # Sum of size-weighted tokens per B slot, then divide by the summed sizes: a weighted mean.
    weighted_b = (xb * sb.unsqueeze(-1)).scatter_add(
        1, dst.unsqueeze(-1).expand(-1, -1, x.shape[-1]), gather_tokens(xa * sa.unsqueeze(-1), merged_a)
    )
    new_sb = sb.scatter_add(1, dst, sa.gather(1, merged_a))
    new_b = weighted_b / new_sb.unsqueeze(-1)
    x_out = torch.cat([gather_tokens(xa, kept_a), new_b], dim=1)
    size_out = torch.cat([sa.gather(1, kept_a), new_sb], dim=1).to(size.dtype)
    source_out = torch.cat([source[:, 0::2].gather(1, kept_a), source[:, 1::2]], dim=1)
    return x_out, size_out, source_out

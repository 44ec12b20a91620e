"""FastVID (Shen et al., NeurIPS 2025, "FastVID: Dynamic Density Pruning for Fast Video Large Language
Models"), as its release (github.com/LunarShen/FastVID) selects and merges, in the per-segment form of
its LLaVA-Video and Qwen2.5-VL code (``modeling_qwen2.py`` / ``modeling_qwen2_5_vl.py``, "FastVID"):

1. DySeg: each frame's global feature (the mean of its tokens, as the Qwen2.5-VL release takes it),
   L2-normalised; the cosine of each frame with the next; a segment ends after every transition below
   ``fastvid_cut_similarity`` (tau) and after the ``fastvid_min_segments - 1`` (c - 1) lowest ones, so
   there are at least c segments.
2. Budgets: a segment of ``L`` frames keeps ``keep * L`` tokens; ``int(keep * L * d)`` of them
   (``d``: ``fastvid_density_share``) are density (context) tokens, the rest salient. The salient
   count is split evenly over the segment's frames (the first frames take the remainder); the density
   count evenly over its anchor frames (the last frame, then every ``p``-th frame before it, ``p``:
   ``fastvid_anchor_step``; the later anchors take the remainder).
3. Salient tokens (ATS): each frame's tokens of highest vision-tower attention.
4. Density tokens (DPC on each anchor frame's other tokens): with ``dist`` the Euclidean distance over
   ``sqrt(C)``, a token's density is ``exp(-mean dist²)`` over its 4 nearest (itself included), its
   distance indicator the distance to the nearest denser token (the largest distance of the frame for
   the densest); the tokens of highest ``density x indicator`` are the anchor frame's centres.
5. Merging (DTM): for each anchor frame, every token of its segment that is neither a salient token of
   the segment nor one of that frame's centres goes to its most cosine-similar centre; a centre with
   ``n`` tokens becomes ``w x + (1 - w) mean(them)``, ``w = max(1 / (n + 1), beta)`` (``beta``:
   ``fastvid_anchor_weight``). As in the release, a token joins one centre of *each* anchor frame of its
   segment (other anchor frames' centres included), and the salient tokens are kept as they are.

A merged token takes the stock position of its centre (the release passes the centre's index in
``keep_indexs`` as its position id); every kept index is one of the video's own tokens.

Departures: the budget is staprune's (``keep`` per unit, ``units * keep`` in all; the release's
per-frame count is ``int(per_unit * retention)``). Where an anchor frame's salient and density tokens
would outnumber its tokens (``keep`` above about ``1 / (1 + (p - 1) d)`` of a frame, where the release
fails or, for Qwen2.5-VL, caps and loses them), its density count stops at what the frame has and the
rest become salient tokens of the segment's frames with room, spread evenly (earlier frames first).
The release's 1e-6 random jitter on the densities is replaced by position (of equal densities the
earlier token counts as denser); equal scores go by position. The salient scores are staprune's
vision-tower attention (``VideoTokens.attention``), where the release reads SigLIP's attention-pooling
head (LLaVA-OneVision) or a frame-mean query of the last vision block (Qwen2.5-VL); the frame feature
is the mean of the projected tokens for every model (LLaVA-OneVision's release uses SigLIP's pooled
output). The Qwen2.5-VL release's extra step that drops near-duplicate frames inside a segment
(``fastvid_DySeg_ignore``) is not taken; nor is the LLaVA-OneVision release's batched variant, which
counts per frame (``int(keep d)`` each, floored per anchor) instead of per segment.

Defaults are the release's scripts' (``c`` 8, ``tau`` 0.9, ``d`` 0.4, ``p`` 4, ``beta`` 0.6, for
LLaVA-OneVision and LLaVA-Video; its Qwen2.5-VL script sets ``tau`` 0.84); the 4 neighbours are fixed.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import STAConfig
from ..errors import ConfigError
from ..score import stable_argsort
from .registry import MethodOption, Selection, VideoMethod, VideoTokens, method_options, register_video_method

NEIGHBOURS = 4  # the k of the local density's k nearest neighbours (fixed in the release)

MIN_SEGMENTS = MethodOption(
    "fastvid_min_segments", 8, lambda v: v >= 1, "an integer >= 1",
    "c: DySeg also cuts at the c-1 least similar frame transitions, so at least c segments")
CUT_SIMILARITY = MethodOption(
    "fastvid_cut_similarity", 0.9, lambda v: -1.0 <= v <= 1.0, "a number from -1 to 1",
    "tau: DySeg cuts wherever consecutive frames' cosine similarity is below this")
DENSITY_SHARE = MethodOption(
    "fastvid_density_share", 0.4, lambda v: 0.0 <= v <= 1.0, "a number from 0 to 1",
    "d: the share of each segment's budget given to density-peak (merged) tokens; the rest are salient")
ANCHOR_STEP = MethodOption(
    "fastvid_anchor_step", 4, lambda v: v >= 1, "an integer >= 1",
    "p: every p-th frame of a segment (from its last) is an anchor frame that holds the density tokens")
ANCHOR_WEIGHT = MethodOption(
    "fastvid_anchor_weight", 0.6, lambda v: 0.0 <= v <= 1.0, "a number from 0 to 1",
    "beta: the least weight a density token keeps of itself when the tokens assigned to it merge in")


def dynamic_segments(frames: Tensor, min_segments: int, threshold: float) -> list[int]:
    """DySeg: the lengths, in time order, of the segments of ``frames`` ``(T, C)`` (one global feature
    per frame): a cut after each transition of cosine similarity below ``threshold`` and after the
    ``min_segments - 1`` lowest transitions (ties by position)."""
    count = frames.shape[0]
    if count == 1:
        return [1]
    unit = F.normalize(frames, dim=-1)
    similarity = (unit[:-1] * unit[1:]).sum(-1)  # (T-1,): frame t with frame t+1
    cut = similarity < threshold
    cut[stable_argsort(similarity)[: min(min_segments - 1, count - 1)]] = True
    ends = cut.nonzero().flatten().tolist() + [count - 1]  # each segment's last frame
    return [end - start for start, end in zip([-1, *ends[:-1]], ends, strict=True)]


def _even(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` as even as can be, the first parts one more."""
    share, rest = divmod(total, parts)
    return [share + (1 if i < rest else 0) for i in range(parts)]


def _spread(extra: int, room: list[int]) -> list[int]:
    """``extra`` tokens over frames with ``room`` left, evenly (earlier frames first), none past its room."""
    added = [0] * len(room)
    while extra > 0:
        open_frames = [f for f in range(len(room)) if added[f] < room[f]]
        for i, give in enumerate(_even(extra, len(open_frames))):
            f = open_frames[i]
            give = min(give, room[f] - added[f])
            added[f] += give
            extra -= give
    return added


def segment_budgets(sizes: list[int], keep: int, per_unit: int, share: float,
                    step: int) -> tuple[list[int], list[int]]:
    """Each frame's salient and density counts (two lists of ``sum(sizes)``), segment by segment.

    The release's split (module docstring, step 2); an anchor frame's density count stops at the tokens
    its salient ones leave, and the rest goes to the segment's salient tokens (``_spread``).
    """
    salient: list[int] = []
    density: list[int] = []
    for length in sizes:
        total = keep * length
        centres = int(total * share)
        sal = _even(total - centres, length)
        den = [0] * length
        for j, count in enumerate(_even(centres, -(-length // step))):
            den[length - 1 - j * step] = count  # the last frame first, then every step-th one before it
        over = 0
        for f in range(length):  # departure: a frame holds at most per_unit tokens
            excess = max(0, sal[f] + den[f] - per_unit)
            den[f] -= excess
            over += excess
        extra = _spread(over, [per_unit - s - d for s, d in zip(sal, den, strict=True)])
        salient += [s + e for s, e in zip(sal, extra, strict=True)]
        density += den
    return salient, density


def _top(scores: Tensor, counts: Tensor) -> Tensor:
    """``(F, N)`` bool: each row's ``counts`` ``(F,)`` highest ``scores`` (ties by position)."""
    order = stable_argsort(scores, descending=True)
    rank_kept = torch.arange(scores.shape[1], device=scores.device) < counts[:, None]
    return torch.zeros_like(rank_kept).scatter(1, order, rank_kept)


def density_peaks(x: Tensor, candidate: Tensor, counts: Tensor) -> Tensor:
    """DPC on each anchor frame: ``(A, N)`` bool, the ``counts`` ``(A,)`` candidates of highest
    ``density x distance-to-denser``.

    Args:
        x: ``(A, N, C)`` the anchor frames' tokens; candidate: ``(A, N)`` bool, the tokens DPC sees
            (those not salient).
    """
    n, channels = x.shape[1], x.shape[2]
    squared = x.square().sum(-1)
    d2 = (squared[:, :, None] + squared[:, None, :] - 2 * (x @ x.transpose(1, 2))).clamp_min(0)
    d2.diagonal(dim1=1, dim2=2).zero_()
    dist = d2.sqrt() / math.sqrt(channels)  # (A, N, N), as the release scales cdist
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
    k = min(NEIGHBOURS, n)
    nearest = dist.masked_fill(~candidate[:, None, :], inf).topk(k, dim=-1, largest=False).values
    size = candidate.sum(-1).clamp(max=NEIGHBOURS)  # fewer candidates than k: all of them
    within = torch.arange(k, device=x.device) < size[:, None, None]
    density = torch.exp(-torch.where(within, nearest.square(), 0).sum(-1) / size[:, None])  # (A, N)
    index = torch.arange(n, device=x.device)
    theirs, mine = density[:, None, :], density[:, :, None]
    # [a, i, j]: j is denser than i; equal densities: the earlier token (the release's jitter breaks them)
    earlier = index[None, :] < index[:, None]
    denser = ((theirs > mine) | ((theirs == mine) & earlier)) & candidate[:, None, :]
    pair = candidate[:, :, None] & candidate[:, None, :]
    farthest = dist.masked_fill(~pair, -inf).flatten(1).amax(-1)  # (A,): a peak's distance indicator
    indicator = torch.minimum(torch.where(denser, dist, inf).amin(-1), farthest[:, None])
    score = (indicator * density).masked_fill(~candidate, -inf)
    return _top(score, counts)


def _merge(x: Tensor, centres: Tensor, owner: Tensor, merging: Tensor, beta: float) -> Tensor:
    """DTM in ``G`` segments of one length (so of one layout of centres): each anchor frame's centres
    with the tokens assigned to them, ``(G, M, C)``.

    Args:
        x: ``(G, B, C)`` the segments' tokens; centres: ``(G, M)`` ascending indices into ``x`` of the
            anchor frames' centres; owner: ``(M,)`` each centre's anchor frame, ``0 .. A - 1``, ascending;
        merging: ``(G, B)`` bool, the tokens that are not salient.
    """
    groups, channels = x.shape[0], x.shape[2]
    per_anchor = torch.bincount(owner)  # (A,): the anchor frames' centres are consecutive columns
    first = per_anchor.cumsum(0) - per_anchor
    width = torch.arange(int(per_anchor.max()), device=x.device)
    block = first[:, None] + width  # (A, K): each anchor frame's columns, padded past its count
    padded = width >= per_anchor[:, None]
    unit = F.normalize(x, dim=-1)
    targets = unit.gather(1, centres[..., None].expand(-1, -1, channels))  # (G, M, C)
    similarity = (unit @ targets.transpose(1, 2))[..., block.clamp(max=owner.numel() - 1)]  # (G, B, A, K)
    # each anchor frame's most similar centre (the first on a tie), as a column
    nearest = first + similarity.masked_fill(padded, -torch.inf).argmax(-1)  # (G, B, A)
    is_centre_of = centres.new_full(merging.shape, -1).scatter(1, centres, owner.expand(groups, -1))  # (G, B)
    # a token goes to one centre of every anchor frame but its own; the salient tokens stay out
    frames = torch.arange(per_anchor.numel(), device=x.device)
    source = merging[..., None] & (is_centre_of[..., None] != frames)  # (G, B, A)
    assign = x.new_zeros(groups, x.shape[1], owner.numel()).scatter(2, nearest, source.to(x.dtype))
    count = assign.sum(1)[..., None]  # (G, M, 1), assign (G, B, M) one-hot rows
    gathered = (assign.transpose(1, 2) @ x) / count.clamp(min=1)
    weight = (1 / (count + 1)).clamp(min=beta)
    return weight * x.gather(1, centres[..., None].expand(-1, -1, channels)) + (1 - weight) * gathered


def fastvid_select(video: VideoTokens, keep: int, config: STAConfig) -> Selection:
    """FastVID's ``units * keep`` tokens of ``video`` and their merged values (module docstring)."""
    if video.attention is None:
        raise ConfigError("fastvid picks each frame's salient tokens by the attention they receive in the "
                          "vision tower; it runs on a video LLM whose adapter gives that attention")
    options = method_options(config)
    layout = video.layout
    units, n = layout.units, layout.per_unit
    work = torch.promote_types(video.tokens.dtype, torch.float32)
    body = video.tokens[: layout.body]
    x = body.to(work).view(units, n, -1)
    device = x.device
    sizes = dynamic_segments(x.mean(1), int(options["fastvid_min_segments"]),
                             float(options["fastvid_cut_similarity"]))
    salient_n, density_n = segment_budgets(sizes, keep, n, float(options["fastvid_density_share"]),
                                           int(options["fastvid_anchor_step"]))
    attention = video.attention[: layout.body].float().view(units, n)
    salient = _top(attention, torch.tensor(salient_n, device=device))  # (units, N)
    centres = torch.zeros_like(salient)
    anchors = [f for f in range(units) if density_n[f] > 0]
    if anchors:
        frames = torch.tensor(anchors, device=device)
        counts = torch.tensor(density_n, device=device)[frames]
        centres[frames] = density_peaks(x[frames], ~salient[frames], counts)
    kept_mask = (salient | centres).view(-1)
    kept = kept_mask.nonzero().flatten()
    positions, values = [], []
    starts: dict[int, list[int]] = {}  # segment length -> the segments' first frames
    for length, start in zip(sizes, itertools.accumulate([0, *sizes[:-1]]), strict=True):
        starts.setdefault(length, []).append(start)
    beta = float(options["fastvid_anchor_weight"])
    for length, first in starts.items():  # DTM; segments of one length have one layout of counts
        own = [f for f in range(length) if density_n[first[0] + f] > 0]
        if not own:
            continue
        frames = (torch.tensor(first, device=device)[:, None] + torch.arange(length, device=device)).flatten()
        groups, size = len(first), length * n
        centre = centres[frames].view(groups, size).nonzero()[:, 1].view(groups, -1)  # ascending in each row
        rank = torch.full((length,), -1, dtype=torch.long, device=device)
        rank[own] = torch.arange(len(own), device=device)
        values.append(_merge(x[frames].view(groups, size, -1), centre, rank[centre[0] // n],
                             ~salient[frames].view(groups, size), beta).flatten(0, 1))
        positions.append((centre + frames.view(groups, length)[:, :1] * n).flatten())
    merged = body[kept]  # the salient tokens as they are; the centres take their merged values
    if positions:
        merged[torch.searchsorted(kept, torch.cat(positions))] = torch.cat(values).to(body.dtype)
    return Selection(kept, merged)


METHOD = register_video_method(VideoMethod(
    "fastvid", fastvid_select, needs=lambda config: frozenset({"attention"}),
    options=(MIN_SEGMENTS, CUT_SIMILARITY, DENSITY_SHARE, ANCHOR_STEP, ANCHOR_WEIGHT),
    description="FastVID: dynamic segments; per segment the most attended tokens and density-peak tokens "
                "of anchor frames, the rest merged into them"))

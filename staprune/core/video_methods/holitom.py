"""HoliTom, its before-the-language-model part (Shao et al., NeurIPS 2025, "HoliTom: Holistic Token Merging
for Fast Video Large Language Models"), as its release (github.com/cokeshao/HoliTom, ``holitom/llava_arch.py``,
run by ``scripts/eval_ov-7b_holitom.sh`` and ``scripts/eval_vid-7b_holitom.sh``) merges a video's tokens.
HoliTom's third stage, the merging inside the language model (``holitom/modeling_qwen2.py``, switched on by
``HOLITOM_k``/``HOLITOM_r``), is not taken: this is the release's "HoliTom (w/o M)".

On the tokens the language model receives, ``T`` frames of ``N`` tokens, ``r = keep / N``:

1. Similarity: each token's cosine with the same position in the next frame, ``(T-1, N)``; a transition
   is *redundant* above ``tau`` (``holitom_similarity_threshold``).
2. Global segmentation (dynamic programming): a segment ``[s, e]`` of ``W`` frames has ``S`` *static*
   positions, those redundant on every transition inside it; merging them saves ``(W-1) S`` tokens.
   The partition of the frames into consecutive segments that saves the most is found frame by frame
   (``dp[i] = max(dp[i-1], max_W dp[i-W] + saved(i-W+1, i))``, a single frame first, then shorter
   windows first on a tie, as the release's strict ``>``).
3. Temporal merging: each static position of a segment becomes one token, the mean over its ``W``
   frames; the other (*dynamic*) positions stay, one token per frame.
4. Budgets: the retain ratio is rescaled to what temporal merging left, ``r' = min(r T N / (T N -
   saved), 1)``; each frame keeps ``c = ceil(r' L)`` of its ``L`` dynamic tokens, each segment
   ``round(r' S)`` of its static ones.
5. Spatial merging, dynamic tokens: a frame's ``round(c (1-D))`` tokens of highest vision-tower
   attention (``video.attention``) are kept as they are (``D``, ``holitom_contextual_share``, is 0 in
   the release, so all ``c``); the rest of ``c`` are DPC-KNN centres of its other dynamic tokens,
   merged as in step 6.
6. Spatial merging, static tokens (DPC-KNN on the segment's temporally merged tokens): distances are
   Euclidean over ``sqrt(C)``; a token's density is ``exp(-mean d^2)`` over its ``k = min(K, count)``
   nearest (itself included; ``K``: ``holitom_neighbours``), its indicator the distance to the nearest
   denser token (the largest distance of the set for the densest); the ``count`` tokens of highest
   ``density x indicator`` are centres; every other token joins its nearest centre, and a centre with
   members becomes ``beta x centre + (1 - beta) x mean(members)`` (``beta``: ``holitom_centre_weight``;
   the release's default path, ``NO_BETA`` unset).

Stock positions: a static token takes the position of its cluster centre in the segment's *first*
frame. The release places the static tokens there (LLaVA-Video's grid layout sorts them into the
first frame's rows; LLaVA-OneVision's puts them before the segment's frames), and the paper merges
redundant tokens "into their first occurrence". A kept dynamic token keeps its own position, a
contextual (merged) one its centre's.

Departures from the release:

- The count is exactly ``T keep`` (staprune's budget), and ``r = keep / N``, the budget's own share
  (the release's ``RETAIN_RATIO``; the same where ``N keep_ratio`` is whole), so the counts of step 4
  add up to the budget up to their rounding. They are then reconciled: while they exceed it, a
  count loses one where it is most above its exact share ``r' x size`` (a frame's dynamic tokens or a
  segment's static ones; earlier first on a tie), while short, gains one where it is most below.
- Where temporal merging alone leaves no more tokens than the budget (the release then keeps all
  of them, ``r'`` capped at 1, and hands over fewer), the shortfall is made up by splitting the
  merged static runs at their least similar frame transitions (equal ones by position): each split
  adds one token, the later part a mean at its own first frame.
- DPC's 1e-6 random jitter on the densities is replaced by position (of equal densities the earlier
  token counts as denser); equal scores go by position. Scores are computed in float32, and DPC's
  distances on each set's centred tokens, made symmetric, zero on the diagonal (the release's ``cdist``
  on raw tokens carries rounding noise that would break DPC's exact ties instead).
- The release's window cap (``MAX_WINDOW_SIZE``, 1024 frames) is not an option: no cap.
- Tokens sit at their stock positions in ascending order (LLaVA-OneVision's release concatenates a
  segment's static tokens before its frames' tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import STAConfig
from ..errors import ConfigError
from ..score import stable_argsort
from .registry import MethodOption, Selection, VideoMethod, VideoTokens, method_options, register_video_method

THRESHOLD = MethodOption(
    "holitom_similarity_threshold",
    0.8,
    lambda v: -1.0 <= v <= 1.0,
    "a number from -1 to 1",
    "tau: a token is temporally redundant where its cosine with the same position in the next frame is "
    "above this (the release's T; its 10%-budget OneVision script uses 0.65)",
)
NEIGHBOURS = MethodOption(
    "holitom_neighbours",
    7,
    lambda v: v >= 1,
    "an integer >= 1",
    "K: DPC-KNN's local density counts a token's K nearest tokens (at most the cluster count)",
)
CENTRE_WEIGHT = MethodOption(
    "holitom_centre_weight",
    0.6,
    lambda v: 0.0 <= v <= 1.0,
    "a number from 0 to 1",
    "beta: a cluster centre's weight in its merged token; its members' mean gets the rest",
)
CONTEXTUAL_SHARE = MethodOption(
    "holitom_contextual_share",
    0.0,
    lambda v: 0.0 <= v <= 1.0,
    "a number from 0 to 1",
    "D: the share of each frame's dynamic tokens that are DPC-KNN centres merging the others; the rest "
    "are kept by vision-tower attention (0 in the release)",
)


def _options(config: STAConfig) -> tuple[float, int, float, float]:
    """``(tau, K, beta, D)``, the defaults where not given (also before the method is registered)."""
    given = method_options(config)
    tau, k, beta, share = (
        given.get(o.name, o.default) for o in (THRESHOLD, NEIGHBOURS, CENTRE_WEIGHT, CONTEXTUAL_SHARE)
    )
    return float(tau), int(k), float(beta), float(share)


def redundant_runs(above: Tensor) -> Tensor:
    """``(T, N)`` long: from each frame, how many consecutive transitions of each position are redundant.

    Args:
        above: ``(T-1, N)`` bool, transition ``t`` (frame ``t`` to ``t+1``) of each position above tau.
    """
    frames = above.shape[0] + 1
    t = torch.arange(frames, device=above.device).unsqueeze(1)
    first_break = torch.where(~above, t[:-1], frames - 1)  # the first non-redundant transition from t on
    first_break = torch.cat([first_break, first_break.new_full((1, above.shape[1]), frames - 1)])
    first_break = first_break.flip(0).cummin(0).values.flip(0)
    return first_break - t


def segment_frames(runs: Tensor) -> tuple[list[tuple[int, int]], int]:
    """The release's segmentation: the partition of the frames that saves the most tokens by temporal merging.

    Args:
        runs: ``(T, N)`` from :func:`redundant_runs`.

    Returns:
        the segments ``[(start, end), ...]`` in time order (inclusive) and the tokens they save.
    """
    frames = runs.shape[0]
    # static[s][w]: positions redundant on the w transitions from frame s (a window of w+1 frames)
    hist = F.one_hot(runs, frames).sum(1)  # (T, T)
    static = hist.flip(1).cumsum(1).flip(1).tolist()
    best, start = [0] * frames, [0] * frames
    for i in range(frames):  # why Python: ~T^2/2 integer steps, a strict > keeps the first (shortest) best
        value, first = (best[i - 1] if i else 0), i
        for width in range(2, i + 2):
            j = i - width  # segment [j+1, i]
            candidate = (best[j] if j >= 0 else 0) + (width - 1) * static[j + 1][width - 1]
            if candidate > value:
                value, first = candidate, j + 1
        best[i], start[i] = value, first
    segments, i = [], frames - 1
    while i >= 0:
        segments.append((start[i], i))
        i = start[i] - 1
    return segments[::-1], best[-1]


def density_peak_merge(
    points: Tensor, valid: Tensor, counts: Tensor, neighbours: int, beta: float
) -> tuple[Tensor, Tensor]:
    """DPC-KNN over each row's valid points, batched: ``counts`` centres per row and their merged values.

    Args:
        points: ``(B, N, C)`` float; valid: ``(B, N)`` bool, the points of each row's set (the others
            are ignored); counts: ``(B,)`` long, centres per row, from 1 to its valid points.

    Returns:
        ``(B, N)`` bool, the centres, and ``(B, N, C)`` each centre's merged value (at its place).
    """
    rows, size, width = points.shape
    x = points.masked_fill(~valid[..., None], 0.0)
    # (B, N, N) Euclidean over sqrt(C), as the release measures it. cdist's matrix product (the release's
    # path) on raw tokens loses ~1e-3 of a distance to cancellation and need not be symmetric, so the exact
    # ties of DPC (two tokens each other's nearest have equal densities) would fall by rounding, not by
    # position: it runs here on the set's centred points (distances unchanged), symmetrised, zero on itself.
    mean = x.sum(1, keepdim=True) / valid.sum(1).clamp(min=1)[:, None, None]
    centred = (points - mean).masked_fill(~valid[..., None], 0.0)
    dist = torch.cdist(centred, centred, compute_mode="use_mm_for_euclid_dist")
    dist = torch.maximum(dist, dist.mT) / width**0.5
    dist.diagonal(dim1=1, dim2=2).zero_()
    apart = dist.masked_fill(~valid[:, None, :], math.inf)
    k = counts.clamp(max=neighbours)  # the release's k = min(K, cluster count)
    nearest = apart.topk(int(k.max()), dim=-1, largest=False).values  # itself included
    within = torch.arange(nearest.shape[-1], device=x.device) < k[:, None, None]
    density = (-torch.where(within, nearest**2, 0.0).sum(-1) / k[:, None]).exp()  # (B, N)
    index = torch.arange(size, device=x.device)
    # j is denser than i: higher density, or equal and earlier (the release breaks ties by jitter)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (index[None, :] < index[:, None])
    )
    farthest = dist.masked_fill(~(valid[:, None, :] & valid[:, :, None]), 0.0).flatten(1).max(-1).values
    indicator = torch.where(denser & valid[:, None, :], dist, farthest[:, None, None]).min(-1).values
    score = (indicator * density).masked_fill(~valid, -math.inf)
    rank = torch.arange(size, device=x.device) < counts[:, None]
    centre = torch.zeros_like(valid).scatter_(1, stable_argsort(score, descending=True), rank)
    member = valid & ~centre
    assigned = dist.masked_fill(~centre[:, None, :], math.inf).argmin(-1)  # nearest centre, first on a tie
    sums = torch.zeros_like(x).scatter_add_(
        1, assigned[..., None].expand(-1, -1, width), x * member[..., None]
    )
    joined = torch.zeros(rows, size, device=x.device).scatter_add_(1, assigned, member.float())[..., None]
    merged = torch.where(joined > 0, beta * x + (1 - beta) * sums / joined.clamp(min=1), x)
    return centre, merged


def reconcile_counts(counts: list[int], quotas: list[float], sizes: list[int], target: int) -> list[int]:
    """``counts`` brought to sum to ``target``: one off each of those most above their ``quotas`` (onto those most
    below, up to ``sizes``), the earlier first on a tie; a count moves at most once where the quotas sum to
    ``target`` and each count is within one of its quota (the release's ``ceil`` and ``round``)."""
    counts = list(counts)
    while sum(counts) != target:
        over = sum(counts) > target
        if over:
            open_ = [p for p in range(len(counts)) if counts[p] > 0]
            order = sorted(open_, key=lambda p: -(counts[p] - quotas[p]))  # stable: earlier first
        else:
            open_ = [p for p in range(len(counts)) if counts[p] < sizes[p]]
            order = sorted(open_, key=lambda p: -(quotas[p] - counts[p]))
        for p in order[: abs(sum(counts) - target)]:
            counts[p] += -1 if over else 1
    return counts


def _split_runs(
    x: Tensor, sim: Tensor, segments: list[tuple[int, int]], static: Tensor, shortfall: int
) -> tuple[Tensor, Tensor]:
    """Temporal merging alone, with ``shortfall`` static runs split at their least similar transitions.

    Args:
        x: ``(T, N, C)`` float; sim: ``(T-1, N)``; static: ``(T, N)`` bool, a static position of a
            frame's segment.

    Returns:
        kept ``(K,)`` ascending flat indices and their values ``(K, C)`` (each run's mean).
    """
    frames, n, width = x.shape
    starts = torch.ones(frames, n, dtype=torch.bool, device=x.device)
    for s, e in segments:
        starts[s + 1 : e + 1] &= ~static[s + 1 : e + 1]  # inside a segment a static run goes on
    if shortfall:
        joins = (~starts[1:]).flatten().nonzero().flatten()  # transitions t -> t+1 that merge
        cut = joins[stable_argsort(sim.flatten()[joins])[:shortfall]]
        starts.view(-1)[cut + n] = True  # the later frame starts a run of its own
    run = starts.long().cumsum(0) - 1 + torch.arange(n, device=x.device) * frames  # (T, N) run ids
    sums = torch.zeros(frames * n, width, device=x.device).index_add_(0, run.flatten(), x.reshape(-1, width))
    lengths = torch.bincount(run.flatten(), minlength=frames * n).unsqueeze(1)
    kept = starts.flatten().nonzero().flatten()
    return kept, (sums / lengths.clamp(min=1))[run.flatten()[kept]]


def holitom_select(video: VideoTokens, keep: int, config: STAConfig) -> Selection:
    """HoliTom's temporal then spatial merging, ``units * keep`` tokens in all.

    Reads ``video.attention`` ``(L_v,)`` unless ``holitom_contextual_share`` is 1.

    Returns:
        :class:`Selection`: ``kept`` ``(units * keep,)`` ascending and ``merged`` ``(units * keep, C)``.
    """
    layout = video.layout
    frames, n = layout.units, layout.per_unit
    tau, neighbours, beta, share = _options(config)
    if share < 1 and video.attention is None:
        raise ConfigError(
            "holitom keeps each frame's dynamic tokens by the attention they receive in the vision tower; it "
            "runs on a patched video LLM whose adapter computes it, not on tokens alone"
        )
    device, dtype = video.tokens.device, video.tokens.dtype
    x = video.tokens[: layout.body].float().view(frames, n, -1)
    unit = F.normalize(x, dim=-1)
    sim = (unit[:-1] * unit[1:]).sum(-1)  # (T-1, N)
    runs = redundant_runs(sim > tau)
    segments, saved = segment_frames(runs)
    first = torch.tensor(
        [s for s, e in segments for _ in range(s, e + 1)], device=device
    )  # each frame's segment
    length = torch.tensor([e - s for s, e in segments for _ in range(s, e + 1)], device=device)
    static = (runs[first] >= length[:, None]) & (
        length[:, None] > 0
    )  # redundant on all its segment's transitions
    total, target = frames * n, frames * keep
    if target >= total - saved:  # temporal merging alone is within the budget
        kept, values = _split_runs(x, sim, segments, static, target - (total - saved))
        return Selection(kept, values.to(dtype))

    ratio = min(keep / n / ((total - saved) / total), 1.0)  # the release's rescaled retain ratio
    widths = static[[s for s, _ in segments]].sum(1).tolist()
    sizes, counts, owner = [], [], []  # a piece: a segment's static tokens (owner -1 - segment) or a frame's
    for index, ((s, e), width) in enumerate(zip(segments, widths, strict=True)):
        if e > s:
            owner.append(-1 - index)
            sizes.append(width)
            counts.append(round(width * ratio))
        for t in range(s, e + 1):
            owner.append(t)
            sizes.append(n - width)
            counts.append(math.ceil((n - width) * ratio))
    counts = reconcile_counts(counts, [size * ratio for size in sizes], sizes, target)

    kept_parts, value_parts = [], []
    clustered = [(-1 - o, c) for o, c in zip(owner, counts, strict=True) if o < 0 and c > 0]
    if clustered:  # static tokens: the segment's temporal means, DPC-KNN over its static positions
        segment_of = torch.repeat_interleave(
            torch.arange(len(segments), device=device),
            torch.tensor([e - s + 1 for s, e in segments], device=device),
        )
        means = torch.zeros(len(segments), n, x.shape[-1], device=device).index_add_(0, segment_of, x)
        means /= torch.tensor([e - s + 1 for s, e in segments], device=device)[:, None, None]
        chosen = torch.tensor([i for i, _ in clustered], device=device)
        starts = torch.tensor([segments[i][0] for i, _ in clustered], device=device)
        centre, merged = density_peak_merge(
            means[chosen],
            static[starts],
            torch.tensor([c for _, c in clustered], device=device),
            neighbours,
            beta,
        )
        row, place = centre.nonzero().unbind(1)
        kept_parts.append(starts[row] * n + place)  # the centre's place in the segment's first frame
        value_parts.append(merged[centre])
    frame_counts = [c for o, c in zip(owner, counts, strict=True) if o >= 0]  # in frame order
    dominant = [round(c * (1 - share)) for c in frame_counts]
    top = torch.zeros(frames, n, dtype=torch.bool, device=device)
    if sum(dominant):  # dynamic tokens: each frame's most attended
        scores = video.attention[: layout.body].float().view(frames, n).masked_fill(static, -math.inf)
        top.scatter_(
            1,
            stable_argsort(scores, descending=True),
            torch.arange(n, device=device) < torch.tensor(dominant, device=device)[:, None],
        )
        flat = top.flatten().nonzero().flatten()
        kept_parts.append(flat)
        value_parts.append(x.view(total, -1)[flat])
    contextual = [(t, c - d) for t, (c, d) in enumerate(zip(frame_counts, dominant, strict=True)) if c > d]
    if contextual:  # holitom_contextual_share > 0: DPC-KNN over each frame's other dynamic tokens
        chosen = torch.tensor([t for t, _ in contextual], device=device)
        centre, merged = density_peak_merge(
            x[chosen],
            ~static[chosen] & ~top[chosen],
            torch.tensor([c for _, c in contextual], device=device),
            neighbours,
            beta,
        )
        row, place = centre.nonzero().unbind(1)
        kept_parts.append(chosen[row] * n + place)
        value_parts.append(merged[centre])
    kept, order = torch.cat(kept_parts).sort()
    return Selection(kept, torch.cat(value_parts)[order].to(dtype))


METHOD = register_video_method(
    VideoMethod(
        "holitom",
        holitom_select,
        needs=lambda config: frozenset() if _options(config)[3] >= 1 else frozenset({"attention"}),
        options=(THRESHOLD, NEIGHBOURS, CENTRE_WEIGHT, CONTEXTUAL_SHARE),
        description="HoliTom (before the LM): frames segmented to merge the most temporally redundant tokens, "
        "then each frame's most attended dynamic tokens and DPC-KNN clusters of the merged static ones",
    )
)

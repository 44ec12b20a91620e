"""HoliTom before the language model (Shao et al., NeurIPS 2025): the kept set and merged values equal the
release's rule (``holitom/llava_arch.py``: segmentation, temporal then spatial merging, written out below),
with staprune's count reconciliation, the count is the budget, and each option does what the rule says
and refuses values out of range."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import staprune.core.video_methods.holitom as holitom
from staprune.core.config import STAConfig
from staprune.core.errors import ConfigError
from staprune.core.video_methods import (
    VideoLayout,
    VideoTokens,
    kept_per_unit,
    kept_tokens_of,
    method_options,
    needs_of,
    select_video_tokens,
)

DEFAULTS = {"tau": 0.8, "k": 7, "beta": 0.6, "d": 0.0}
NAMES = {
    "tau": "holitom_similarity_threshold",
    "k": "holitom_neighbours",
    "beta": "holitom_centre_weight",
    "d": "holitom_contextual_share",
}


# --- the release's rule, written out --------------------------------------------------------------------
def released_segments(above: list[list[bool]], frames: int) -> tuple[list[tuple[int, int]], int]:
    """``select_static_windows``: saved[s][e] = (e - s) x positions redundant on every transition s..e-1;
    dp over the frames, a single frame first, a longer window only when strictly better."""
    positions = len(above[0]) if above else 0

    def saved(s: int, e: int) -> int:
        return (e - s) * sum(all(above[t][p] for t in range(s, e)) for p in range(positions))

    dp, prev = [0] * frames, [0] * frames
    for i in range(frames):
        best, first = (dp[i - 1] if i > 0 else 0), i
        for window in range(2, i + 2):
            j = i - window
            value = (dp[j] if j >= 0 else 0) + saved(j + 1, i)
            if value > best:
                best, first = value, j + 1
        dp[i], prev[i] = best, first
    out, i = [], frames - 1
    while i >= 0:
        out.append((prev[i], i))
        i = prev[i] - 1
    return out[::-1], dp[-1]


def released_dpc(
    points: torch.Tensor, count: int, k: int, beta: float
) -> tuple[list[int], list[torch.Tensor]]:
    """``cluster_dpc_knn`` + ``merge_tokens_by_clustering``: centres ascending, each centre's merged value."""
    n, c = points.shape
    dist = torch.cdist(points[None], points[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / c**0.5
    k = min(k, count)
    density = []
    for i in range(n):
        nearest = sorted(float(v) for v in dist[i])[:k]
        density.append(math.exp(-sum(v * v for v in nearest) / k))
    score = []
    for i in range(n):  # the release's 1e-6 jitter replaced by position: the earlier of equals is denser
        denser = [j for j in range(n) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        delta = min(float(dist[i, j]) for j in denser) if denser else float(dist.max())
        score.append(delta * density[i])
    centres = sorted(sorted(range(n), key=lambda i: (-score[i], i))[:count])
    members: dict[int, list[int]] = {m: [] for m in centres}
    for i in range(n):
        if i not in members:
            d = [float(dist[i, m]) for m in centres]
            members[centres[d.index(min(d))]].append(i)
    values = []
    for m in centres:
        if members[m]:
            values.append(beta * points[m] + (1 - beta) * points[members[m]].mean(0))
        else:
            values.append(points[m])
    return centres, values


def reconciled(counts: list[int], quotas: list[float], sizes: list[int], target: int) -> list[int]:
    """staprune's departure: one token at a time off the count most above its quota (onto the most below)."""
    counts = list(counts)
    while sum(counts) > target:
        p = max((p for p in range(len(counts)) if counts[p] > 0), key=lambda p: (counts[p] - quotas[p], -p))
        counts[p] -= 1
    while sum(counts) < target:
        p = max(
            (p for p in range(len(counts)) if counts[p] < sizes[p]), key=lambda p: (quotas[p] - counts[p], -p)
        )
        counts[p] += 1
    return counts


def released_holitom(tokens, attention, layout: VideoLayout, keep: int, tau=0.8, k=7, beta=0.6, d=0.0):
    """The kept indices (ascending) and their values, segment by segment, frame by frame."""
    frames, n = layout.units, layout.per_unit
    x = tokens[: layout.body].float().view(frames, n, -1)
    att = attention[: layout.body].float().view(frames, n) if attention is not None else None
    normed = F.normalize(x, dim=-1)
    sim = F.cosine_similarity(normed[:-1], normed[1:], dim=-1)
    above = [[float(sim[t, p]) > tau for p in range(n)] for t in range(frames - 1)]
    segments, saved = released_segments(above, frames)
    static = {}
    for s, e in segments:
        static[s] = [p for p in range(n) if e > s and all(above[t][p] for t in range(s, e))]
    total, target = frames * n, frames * keep
    out: dict[int, torch.Tensor] = {}

    if target >= total - saved:  # departure: split the merged runs at their least similar transitions
        joins = sorted((float(sim[t, p]), t, p) for s, e in segments for p in static[s] for t in range(s, e))
        cuts = {(t, p) for _, t, p in joins[: target - (total - saved)]}
        for s, e in segments:
            for p in range(n):
                if p not in static[s]:
                    for t in range(s, e + 1):
                        out[t * n + p] = x[t, p]
                    continue
                run = [s]
                for t in range(s + 1, e + 2):
                    if t == e + 1 or (t - 1, p) in cuts:
                        out[run[0] * n + p] = x[run, p].mean(0)
                        run = [t]
                    else:
                        run.append(t)
    else:
        ratio = min(keep / n / ((total - saved) / total), 1)
        pieces, counts, sizes = [], [], []
        for s, e in segments:
            if e > s:
                pieces.append((s, e, None))
                sizes.append(len(static[s]))
                counts.append(round(len(static[s]) * ratio))
            for t in range(s, e + 1):
                pieces.append((s, e, t))
                sizes.append(n - len(static[s]))
                counts.append(math.ceil((n - len(static[s])) * ratio))
        counts = reconciled(counts, [z * ratio for z in sizes], sizes, target)
        for (s, e, t), count in zip(pieces, counts, strict=True):
            if t is None:  # the segment's static tokens: temporal mean, then DPC-KNN
                if count:
                    points = x[s : e + 1][:, static[s]].mean(0)
                    centres, values = released_dpc(points, count, k, beta)
                    for m, v in zip(centres, values, strict=True):
                        out[s * n + static[s][m]] = v
                continue
            dynamic = [p for p in range(n) if p not in static[s]]
            dominant_n = round(count * (1 - d))
            dominant = sorted(dynamic, key=lambda p: (-float(att[t, p]), p))[:dominant_n]
            for p in dominant:
                out[t * n + p] = x[t, p]
            if count - dominant_n:
                rest = [p for p in dynamic if p not in dominant]
                centres, values = released_dpc(x[t, rest], count - dominant_n, k, beta)
                for m, v in zip(centres, values, strict=True):
                    out[t * n + rest[m]] = v
    order = sorted(out)
    return torch.tensor(order), torch.stack([out[i] for i in order])


# --- hand-made videos -----------------------------------------------------------------------------------
def make_video(
    layout: VideoLayout,
    seed: int,
    channels: int = 8,
    scenes: int = 3,
    moving: float = 0.3,
    noise: float = 0.25,
) -> VideoTokens:
    """Scenes of alike frames (a base plus noise: redundant over time), with a share of moving tokens
    (fresh every frame); random attention; tail tokens after the body."""
    g = torch.Generator().manual_seed(seed)
    bases = torch.randn(scenes, layout.per_unit, channels, generator=g)
    scene = torch.randint(0, scenes, (layout.units,), generator=g).sort().values
    body = bases[scene] + noise * torch.randn(layout.units, layout.per_unit, channels, generator=g)
    fresh = torch.rand(layout.units, layout.per_unit, generator=g) < moving
    body = torch.where(fresh[..., None], torch.randn(body.shape, generator=g), body)
    tokens = torch.cat([body.reshape(layout.body, channels), torch.randn(layout.tail, channels, generator=g)])
    return VideoTokens(tokens, layout, attention=torch.rand(layout.tokens, generator=g))


def config_of(keep_ratio: float = 0.25, **knobs) -> STAConfig:
    base = STAConfig(keep_ratio=keep_ratio, method="holitom")
    return base.with_options(**{NAMES[k]: v for k, v in knobs.items()}) if knobs else base


def check_against_release(video: VideoTokens, config: STAConfig, knobs: dict) -> None:
    layout = video.layout
    chosen = select_video_tokens(video, config)
    keep = kept_per_unit(config, layout.per_unit)
    kept, values = released_holitom(video.tokens, video.attention, layout, keep, **(DEFAULTS | knobs))
    tail = torch.arange(layout.body, layout.tokens)
    assert torch.equal(chosen.kept, torch.cat([kept, tail]))
    torch.testing.assert_close(chosen.merged, torch.cat([values, video.tokens[tail]]), atol=1e-6, rtol=1e-6)
    assert chosen.merged.dtype == video.tokens.dtype


# --- the rule -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("keep_ratio", [0.25, 0.125])
@pytest.mark.parametrize("layout", [VideoLayout(8, 4, 4), VideoLayout(10, 3, 4, tail=1)])
@pytest.mark.parametrize("knobs", [{}, {"tau": 0.65, "k": 3, "beta": 0.3}, {"d": 0.5, "k": 2}])
def test_holitom_keeps_and_merges_as_the_release(seed, keep_ratio, layout, knobs):
    video = make_video(layout, seed)
    check_against_release(video, config_of(keep_ratio, **knobs), knobs)


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("keep_ratio", [0.5, 0.75])
def test_where_temporal_merging_leaves_too_few_the_runs_split_at_their_least_similar_transitions(
    seed, keep_ratio
):
    layout = VideoLayout(8, 4, 4, tail=1)
    video = make_video(layout, seed, scenes=1, moving=0.05, noise=0.15)  # mostly still: most tokens merge
    frames, n = layout.units, layout.per_unit
    x = F.normalize(video.tokens[: layout.body].view(frames, n, -1), dim=-1)
    runs = holitom.redundant_runs((x[:-1] * x[1:]).sum(-1) > 0.8)
    _, saved = holitom.segment_frames(runs)
    assert frames * round(n * keep_ratio) > frames * n - saved  # the split path is what is tested
    check_against_release(video, config_of(keep_ratio), {})


def test_the_release_counts_are_reconciled_to_the_budget_in_the_cases_tested():
    """A reference case above where the release's counts (ceil per frame, round per segment) miss the budget."""
    layout = VideoLayout(10, 3, 4, tail=1)
    video = make_video(layout, 1)
    x = F.normalize(video.tokens[: layout.body].view(10, 12, -1), dim=-1)
    runs = holitom.redundant_runs((x[:-1] * x[1:]).sum(-1) > 0.8)
    segments, saved = holitom.segment_frames(runs)
    ratio = 3 / 12 / ((120 - saved) / 120)
    release = 0
    for s, e in segments:
        static = int((runs[s] >= e - s).sum()) if e > s else 0
        release += round(static * ratio) + (e - s + 1) * math.ceil((12 - static) * ratio)
    assert saved > 0 and release > 30
    assert select_video_tokens(video, config_of(0.25)).kept.numel() == 30 + 1


@pytest.mark.parametrize("seed", range(20))
def test_reconciliation_moves_the_counts_furthest_from_their_share_both_ways(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 20, (9,), generator=g).tolist()
    target = int(torch.randint(1, max(2, sum(sizes)), (1,), generator=g))
    ratio = target / sum(sizes)
    quotas = [z * ratio for z in sizes]
    rounding = [math.ceil, math.floor, round][seed % 3]  # ceil: too many, floor: too few, round: either
    counts = [rounding(q) for q in quotas]
    moved = holitom.reconcile_counts(counts, quotas, sizes, target)
    assert moved == reconciled(counts, quotas, sizes, target)
    assert sum(moved) == target and all(0 <= c <= z for c, z in zip(moved, sizes, strict=True))
    assert all(abs(c - q) < 1 for c, q in zip(moved, quotas, strict=True))


@pytest.mark.parametrize("seed", range(6))
def test_segmentation_is_the_release_s_dynamic_programme(seed):
    g = torch.Generator().manual_seed(seed)
    frames, n = 9, 5
    above = torch.rand(frames - 1, n, generator=g) < 0.7
    runs = holitom.redundant_runs(above)
    assert holitom.segment_frames(runs) == released_segments(above.tolist(), frames)


def test_segmentation_by_hand():
    # two positions over 5 frames; position 0 redundant on transitions 0, 1, 2; position 1 on 0 and 3
    above = torch.tensor([[True, True], [True, False], [True, False], [False, True]])
    assert holitom.redundant_runs(above).tolist() == [[3, 1], [2, 0], [1, 0], [0, 1], [0, 0]]
    # dp = [0, 2, 2, 3, 3]: [0,1] saves 2 (both positions); at frame 3, [2,3] (1 more) beats [0,3] (3 x 1
    # = 3, not strictly more); at frame 4, [3,4] (2 + 1) only ties frame 4 alone, so it stays alone
    segments, saved = holitom.segment_frames(holitom.redundant_runs(above))
    assert (segments, saved) == ([(0, 1), (2, 3), (4, 4)], 3) == released_segments(above.tolist(), 5)
    assert holitom.segment_frames(holitom.redundant_runs(torch.zeros(0, 3, dtype=torch.bool))) == (
        [(0, 0)],
        0,
    )


def test_a_static_token_takes_its_centre_s_place_in_the_segment_s_first_frame():
    layout = VideoLayout(8, 4, 4)
    video = make_video(layout, 5)
    x = video.tokens.view(8, 16, -1)
    # everything redundant (tau = -1): one segment of 8 frames, 16 static tokens; 0.125 keeps 2 x 8 = 16
    chosen = select_video_tokens(video, config_of(0.125, tau=-1.0))
    assert torch.equal(chosen.kept, torch.arange(16))  # the first frame's positions
    torch.testing.assert_close(chosen.merged, x.mean(0), atol=1e-6, rtol=1e-6)


# --- the budget -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        STAConfig(keep_ratio=0.5, method="holitom"),
        STAConfig(keep_ratio=0.25, method="holitom"),
        STAConfig(keep_ratio=0.1, method="holitom"),
        STAConfig(r=30, method="holitom"),
        STAConfig(keep_ratio=0.75, method="holitom"),
    ],
)
@pytest.mark.parametrize("moving", [0.05, 0.3, 1.0])
def test_the_count_is_the_budget(config, moving):
    layout = VideoLayout(16, 6, 6, tail=1)
    video = make_video(layout, 3, channels=16, moving=moving)
    chosen = select_video_tokens(video, config)
    keep = 6 if config.keep_ratio is None else round(36 * config.keep_ratio)
    assert chosen.kept.numel() == 16 * keep + 1 == kept_tokens_of(layout, config)
    assert torch.equal(chosen.kept, chosen.kept.unique())  # ascending, unique
    assert chosen.merged.shape == (chosen.kept.numel(), 16)


# --- the options ----------------------------------------------------------------------------------------
def test_without_redundancy_each_frame_keeps_its_most_attended_tokens_unmerged():
    layout = VideoLayout(8, 4, 4)
    video = make_video(layout, 4)
    chosen = select_video_tokens(video, config_of(0.25, tau=1.0))  # nothing above 1: every frame alone
    top = video.attention.view(8, 16).argsort(dim=1, descending=True, stable=True)[:, :4]
    assert torch.equal(chosen.kept, (top + 16 * torch.arange(8)[:, None]).flatten().sort().values)
    assert torch.equal(chosen.merged, video.tokens[chosen.kept])
    default = select_video_tokens(video, config_of(0.25))
    assert not torch.equal(default.kept, chosen.kept)  # at tau 0.8 static runs merge


def test_neighbours_change_the_density_peaks():
    layout = VideoLayout(8, 6, 6)
    video = make_video(layout, 6, moving=0.1)
    results = {k: select_video_tokens(video, config_of(0.25, k=k)) for k in (1, 7)}
    assert not torch.equal(results[1].kept, results[7].kept)
    check_against_release(video, config_of(0.25, k=1), {"k": 1})


def test_the_centre_weight_is_how_much_a_centre_keeps_of_itself():
    layout = VideoLayout(8, 4, 4)
    video = make_video(layout, 7, moving=0.1)
    whole = select_video_tokens(video, config_of(0.25, beta=1.0))
    mixed = select_video_tokens(video, config_of(0.25, beta=0.6))
    less = select_video_tokens(video, config_of(0.25, beta=0.2))
    assert torch.equal(mixed.kept, whole.kept) and torch.equal(less.kept, whole.kept)
    moved = (mixed.merged - whole.merged).norm(dim=-1) > 0
    assert 0 < int(moved.sum()) < mixed.kept.numel()  # cluster centres moved, dominant tokens did not
    shift = (mixed.merged - whole.merged).norm(dim=-1)[moved]
    assert ((less.merged - whole.merged).norm(dim=-1)[moved] > shift).all()  # a lower beta moves them further


def test_the_contextual_share_merges_dynamic_tokens_into_centres():
    layout = VideoLayout(8, 4, 4)
    video = make_video(layout, 8, moving=1.0)  # nothing redundant: every token dynamic
    plain = select_video_tokens(video, config_of(0.5))
    assert torch.equal(plain.merged, video.tokens[plain.kept])  # D = 0: kept as they are, by attention
    all_merged = select_video_tokens(video, config_of(0.5, d=1.0))
    assert not torch.equal(all_merged.kept, plain.kept)
    assert not torch.equal(all_merged.merged, video.tokens[all_merged.kept])
    assert needs_of(config_of(0.5, d=1.0)) == frozenset()  # no attention read
    blind = select_video_tokens(VideoTokens(video.tokens, layout), config_of(0.5, d=1.0))
    assert torch.equal(blind.kept, all_merged.kept)
    check_against_release(video, config_of(0.5, d=1.0), {"d": 1.0})


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("holitom_similarity_threshold", 1.5),
        ("holitom_similarity_threshold", -1.1),
        ("holitom_neighbours", 0),
        ("holitom_neighbours", 2.5),
        ("holitom_centre_weight", 1.5),
        ("holitom_centre_weight", -0.5),
        ("holitom_contextual_share", -0.1),
        ("holitom_contextual_share", 1.2),
    ],
)
def test_an_option_out_of_range_is_refused(name, bad):
    with pytest.raises(ConfigError, match=f"{name}="):
        STAConfig(method="holitom", keep_ratio=0.25).with_options(**{name: bad})


def test_defaults_are_the_release_s_and_it_reads_the_vision_attention():
    assert method_options(STAConfig(method="holitom")) == {NAMES[k]: v for k, v in DEFAULTS.items()}
    assert needs_of(STAConfig(method="holitom", keep_ratio=0.25)) == {"attention"}
    video = make_video(VideoLayout(4, 4, 4), 9)
    with pytest.raises(ConfigError, match="attention"):
        select_video_tokens(VideoTokens(video.tokens, video.layout), config_of(0.25))
    first, again = (select_video_tokens(video, config_of(0.25)) for _ in range(2))
    assert torch.equal(first.kept, again.kept) and torch.equal(first.merged, again.merged)


def test_half_precision_tokens_come_back_in_their_dtype():
    video = make_video(VideoLayout(6, 4, 4, tail=1), 10)
    half = VideoTokens(video.tokens.to(torch.bfloat16), video.layout, attention=video.attention)
    chosen = select_video_tokens(half, config_of(0.25))
    assert chosen.merged.dtype == torch.bfloat16 and chosen.kept.numel() == 6 * 4 + 1

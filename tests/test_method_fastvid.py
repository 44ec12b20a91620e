"""FastVID (Shen et al., NeurIPS 2025): the kept set and merged values equal the release's per-segment rule
(LLaVA-Video / Qwen2.5-VL ``modeling_qwen2*.py``, written out below), the count is the budget, and each
option does what the rule says and refuses values out of range."""

from __future__ import annotations

import math

import pytest
import torch

import staprune.core.video_methods.fastvid as fastvid
from staprune.core.config import STAConfig
from staprune.core.errors import ConfigError
from staprune.core.video_methods import (
    VideoLayout,
    VideoTokens,
    kept_tokens_of,
    needs_of,
    select_video_tokens,
)

DEFAULTS = {"c": 8, "tau": 0.9, "d": 0.4, "p": 4, "beta": 0.6}
NAMES = {"c": "fastvid_min_segments", "tau": "fastvid_cut_similarity", "d": "fastvid_density_share",
         "p": "fastvid_anchor_step", "beta": "fastvid_anchor_weight"}


# --- the release's rule, written out --------------------------------------------------------------------
def released_segments(frames: torch.Tensor, c: int, tau: float) -> list[int]:
    """DySeg: cut after transition i where cos(frame i, frame i+1) < tau, and at the c-1 lowest."""
    units = frames.shape[0]
    g = frames / frames.norm(dim=1, keepdim=True)
    sim = [float((g[i] * g[i + 1]).sum()) for i in range(units - 1)]
    cuts = {i for i in range(units - 1) if sim[i] < tau}
    cuts |= set(sorted(range(units - 1), key=lambda i: (sim[i], i))[: c - 1])
    sizes, start = [], 0
    for end in [*sorted(cuts), units - 1]:
        sizes.append(end + 1 - start)
        start = end + 1
    return sizes


def released_counts(length: int, keep: int, per_unit: int, d: float, p: int) -> tuple[list[int], list[int]]:
    """One segment's per-frame salient and context counts as the release splits them, then staprune's
    departure (an anchor frame holds at most per_unit; the rest become salient tokens, spread evenly)."""
    total = keep * length
    context = int(total * d)
    salient_total = total - context
    salient = [salient_total // length + (1 if i < salient_total % length else 0) for i in range(length)]
    anchors = (length + p - 1) // p
    shares = [context // anchors + (1 if i < context % anchors else 0) for i in range(anchors)]
    ctx, j = [], 0
    for i in range(length):  # the release lists anchors from the front, then reverses the list
        if i % p == 0:
            ctx.append(shares[j])
            j += 1
        else:
            ctx.append(0)
    ctx.reverse()
    over = 0
    for f in range(length):
        excess = max(0, salient[f] + ctx[f] - per_unit)
        ctx[f] -= excess
        over += excess
    while over:
        open_frames = [f for f in range(length) if salient[f] + ctx[f] < per_unit]
        share, rest = divmod(over, len(open_frames))
        for i, f in enumerate(open_frames):
            give = min(share + (1 if i < rest else 0), per_unit - salient[f] - ctx[f])
            salient[f] += give
            over -= give
    return salient, ctx


def released_density_peaks(frame: torch.Tensor, remaining: list[int], count: int) -> list[int]:
    """DPC on one anchor frame's remaining tokens: density from the 4 nearest (itself included) on cdist
    over sqrt(C), distance to the nearest denser (the frame's largest distance for the densest)."""
    points = frame[remaining]
    dist = torch.cdist(points[None], points[None])[0] / points.shape[1] ** 0.5
    n = len(remaining)
    density = []
    for i in range(n):
        nearest = sorted(float(v) for v in dist[i])[: min(4, n)]
        density.append(math.exp(-sum(v * v for v in nearest) / len(nearest)))
    score = []
    for i in range(n):
        denser = [j for j in range(n) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        delta = min(float(dist[i, j]) for j in denser) if denser else float(dist.max())
        score.append(delta * density[i])
    chosen = sorted(range(n), key=lambda i: (-score[i], i))[:count]
    return sorted(remaining[i] for i in chosen)


def released_fastvid(tokens: torch.Tensor, attention: torch.Tensor, layout: VideoLayout, keep: int,
                     c: int = 8, tau: float = 0.9, d: float = 0.4, p: int = 4, beta: float = 0.6):
    """The kept indices (ascending) and their values, segment by segment, frame by frame."""
    units, n = layout.units, layout.per_unit
    x = tokens[: layout.body].float().view(units, n, -1)
    att = attention[: layout.body].float().view(units, n)
    kept: dict[int, torch.Tensor] = {}
    start = 0
    for length in released_segments(x.mean(1), c, tau):
        salient_n, context_n = released_counts(length, keep, n, d, p)
        seg = x[start : start + length].reshape(length * n, -1)
        salient, centres = [], []
        for f in range(length):
            top = sorted(range(n), key=lambda i: (-float(att[start + f, i]), i))[: salient_n[f]]
            salient += [f * n + i for i in top]
            if context_n[f] > 0:
                remaining = [i for i in range(n) if i not in top]
                peaks = released_density_peaks(x[start + f], remaining, context_n[f])
                centres.append([f * n + i for i in peaks])
        for i in salient:
            kept[start * n + i] = seg[i]
        unit = seg / seg.norm(dim=-1, keepdim=True)
        for own in centres:  # DTM: every other non-salient token of the segment to its nearest centre
            merging = [i for i in range(length * n) if i not in salient and i not in own]
            assigned: dict[int, list[int]] = {t: [] for t in own}
            for i in merging:
                sims = [float(unit[i] @ unit[t]) for t in own]
                assigned[own[sims.index(max(sims))]].append(i)
            for t in own:
                w = max(1 / (len(assigned[t]) + 1), beta)
                mean = seg[assigned[t]].mean(0) if assigned[t] else torch.zeros_like(seg[t])
                kept[start * n + t] = w * seg[t] + (1 - w) * mean
        start += length
    order = sorted(kept)
    return torch.tensor(order), torch.stack([kept[i] for i in order])


# --- hand-made videos -----------------------------------------------------------------------------------
def make_video(layout: VideoLayout, seed: int, channels: int = 8, scenes: int = 3) -> VideoTokens:
    """Scenes of alike frames (a base plus noise), random attention; tail tokens after the body."""
    g = torch.Generator().manual_seed(seed)
    bases = torch.randn(scenes, layout.per_unit, channels, generator=g)
    scene = torch.randint(0, scenes, (layout.units,), generator=g).sort().values
    body = bases[scene] + 0.4 * torch.randn(layout.units, layout.per_unit, channels, generator=g)
    tokens = torch.cat([body.reshape(layout.body, channels), torch.randn(layout.tail, channels, generator=g)])
    return VideoTokens(tokens, layout, attention=torch.rand(layout.tokens, generator=g))


def config_of(keep_ratio: float = 0.25, **knobs) -> STAConfig:
    """fastvid at ``keep_ratio`` with the knobs given by their paper names (``c``, ``tau``, ...)."""
    options = {NAMES[k]: v for k, v in knobs.items()}
    return STAConfig(keep_ratio=keep_ratio, method="fastvid").with_options(**options)


# --- the rule -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("keep_ratio", [0.25, 0.5])
@pytest.mark.parametrize("layout", [VideoLayout(8, 4, 4), VideoLayout(10, 3, 4, tail=1)])
@pytest.mark.parametrize("knobs", [{}, {"c": 2, "p": 2}, {"c": 1, "tau": -1.0, "p": 3, "beta": 0.3}])
def test_fastvid_keeps_and_merges_as_the_release(seed, keep_ratio, layout, knobs):
    video = make_video(layout, seed)
    config = config_of(keep_ratio, **knobs)
    chosen = select_video_tokens(video, config)
    keep = round(layout.per_unit * keep_ratio)
    kept, values = released_fastvid(video.tokens, video.attention, layout, keep, **(DEFAULTS | knobs))
    tail = torch.arange(layout.body, layout.tokens)
    assert torch.equal(chosen.kept, torch.cat([kept, tail]))
    torch.testing.assert_close(chosen.merged, torch.cat([values, video.tokens[tail]]), atol=1e-6, rtol=1e-6)
    assert chosen.merged.dtype == video.tokens.dtype


def test_dyseg_cuts_below_tau_and_at_the_c_minus_1_lowest_transitions():
    angles = torch.tensor([0.0, 0.1, 0.7, 0.9, 1.9, 1.95])  # transitions' cos: .995 .825 .980 .540 .999
    frames = torch.stack([angles.cos(), angles.sin()], dim=1)
    assert fastvid.dynamic_segments(frames, 1, 0.9) == [2, 2, 2] == released_segments(frames, 1, 0.9)
    assert fastvid.dynamic_segments(frames, 1, -1.0) == [6]
    assert fastvid.dynamic_segments(frames, 2, -1.0) == [4, 2]  # the lowest: .540
    assert fastvid.dynamic_segments(frames, 5, 0.9) == [1, 1, 1, 1, 2] == released_segments(frames, 5, 0.9)
    assert fastvid.dynamic_segments(frames, 1, 1.0) == [1] * 6
    assert fastvid.dynamic_segments(frames, 20, -1.0) == [1] * 6  # more than the transitions: every one
    assert fastvid.dynamic_segments(frames[:1], 8, 0.9) == [1]


def test_the_split_gives_anchors_from_the_last_frame_and_fills_a_full_anchor_frame_with_salient_tokens():
    # 9 frames, p=4: anchors 8, 4, 0 (the later take the remainder); 36 tokens, int(14.4) context
    assert fastvid.segment_budgets([9], 4, 16, 0.4, 4) == ([3, 3, 3, 3, 2, 2, 2, 2, 2],
                                                          [4, 0, 0, 0, 5, 0, 0, 0, 5])
    # 4 frames at 8 of 16: 12 context on the last frame with its 5 salient is 17 > 16: one goes salient
    assert fastvid.segment_budgets([4], 8, 16, 0.4, 4) == ([6, 5, 5, 5], [0, 0, 0, 11])
    for sizes in ([4, 3, 1], [8], [1] * 5, [2, 7]):
        salient, context = fastvid.segment_budgets(sizes, 5, 9, 0.7, 3)
        assert sum(salient) + sum(context) == 5 * sum(sizes)
        assert all(s + c <= 9 for s, c in zip(salient, context, strict=True))
        start = 0
        for length in sizes:
            assert (salient[start:start + length], context[start:start + length]) == released_counts(
                length, 5, 9, 0.7, 3)
            start += length


# --- the budget -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [STAConfig(keep_ratio=0.5, method="fastvid"),
                                    STAConfig(keep_ratio=0.25, method="fastvid"),
                                    STAConfig(keep_ratio=0.1, method="fastvid"),
                                    STAConfig(r=30, method="fastvid"),
                                    STAConfig(keep_ratio=0.75, method="fastvid")])
def test_the_count_is_the_budget(config):
    layout = VideoLayout(16, 6, 6, tail=1)
    video = make_video(layout, 3, channels=16)
    chosen = select_video_tokens(video, config)
    keep = 6 if config.keep_ratio is None else round(36 * config.keep_ratio)
    assert chosen.kept.numel() == 16 * keep + 1 == kept_tokens_of(layout, config)
    assert torch.equal(chosen.kept, chosen.kept.unique())  # ascending, unique
    assert chosen.merged.shape == (chosen.kept.numel(), 16)


# --- the options ----------------------------------------------------------------------------------------
def test_without_density_tokens_each_frame_keeps_its_most_attended_tokens_unmerged():
    layout = VideoLayout(8, 4, 4)
    video = make_video(layout, 4)
    chosen = select_video_tokens(video, config_of(0.25, d=0.0))
    top = video.attention.view(8, 16).argsort(dim=1, descending=True, stable=True)[:, :4]
    assert torch.equal(chosen.kept, (top + 16 * torch.arange(8)[:, None]).flatten().sort().values)
    assert torch.equal(chosen.merged, video.tokens[chosen.kept])
    even = VideoTokens(video.tokens, layout, attention=torch.ones(layout.tokens))  # ties by position
    assert torch.equal(select_video_tokens(even, config_of(0.25, d=0.0)).kept,
                       (torch.arange(4) + 16 * torch.arange(8)[:, None]).flatten())


def test_segments_decide_where_density_tokens_go():
    layout = VideoLayout(8, 4, 4)
    video = make_video(layout, 5)

    def per_frame(**knobs):
        return torch.bincount(select_video_tokens(video, config_of(0.25, **knobs)).kept // 16, minlength=8)

    assert per_frame(tau=1.0).tolist() == [4] * 8  # every frame a segment: its own budget
    # one segment: 32 tokens, int(12.8) = 12 density, 20 salient over 8 frames (the first take the rest)
    one = per_frame(c=1, tau=-1.0, p=8)  # one anchor frame: the last
    assert one.tolist() == [3, 3, 3, 3, 2, 2, 2, 2 + 12]
    several = per_frame(c=1, tau=-1.0, p=2)  # anchors 7, 5, 3, 1: 3 each
    assert several.tolist() == [3, 6, 3, 6, 2, 5, 2, 5]


def test_the_anchor_weight_is_how_much_a_centre_keeps_of_itself():
    layout = VideoLayout(8, 4, 4)
    video = make_video(layout, 6)
    whole = select_video_tokens(video, config_of(0.25, beta=1.0))
    assert torch.equal(whole.merged, video.tokens[whole.kept])
    mixed = select_video_tokens(video, config_of(0.25, beta=0.6))
    assert torch.equal(mixed.kept, whole.kept)
    moved = (mixed.merged - whole.merged).norm(dim=-1) > 0
    assert 0 < int(moved.sum()) < mixed.kept.numel()  # the centres moved, the salient tokens did not
    less = select_video_tokens(video, config_of(0.25, beta=0.2))
    shift = (mixed.merged - whole.merged).norm(dim=-1)[moved]
    assert ((less.merged - whole.merged).norm(dim=-1)[moved] > shift).all()  # a lower beta moves them further


@pytest.mark.parametrize(("name", "bad"), [
    ("fastvid_min_segments", 0), ("fastvid_min_segments", 2.5),
    ("fastvid_cut_similarity", 1.5), ("fastvid_cut_similarity", -1.1),
    ("fastvid_density_share", -0.1), ("fastvid_density_share", 1.2),
    ("fastvid_anchor_step", 0), ("fastvid_anchor_step", 1.0),
    ("fastvid_anchor_weight", 1.5), ("fastvid_anchor_weight", -0.5),
])
def test_an_option_out_of_range_is_refused(name, bad):
    with pytest.raises(ConfigError, match=f"{name}="):
        STAConfig(method="fastvid", keep_ratio=0.25).with_options(**{name: bad})


def test_defaults_are_the_release_s_and_it_reads_the_vision_attention():
    from staprune.core.video_methods import method_options

    assert method_options(STAConfig(method="fastvid")) == {NAMES[k]: v for k, v in DEFAULTS.items()}
    assert needs_of(STAConfig(method="fastvid", keep_ratio=0.25)) == {"attention"}
    video = make_video(VideoLayout(4, 4, 4), 7)
    with pytest.raises(ConfigError, match="attention"):
        select_video_tokens(VideoTokens(video.tokens, video.layout), config_of(0.25))
    first, again = (select_video_tokens(video, config_of(0.25)) for _ in range(2))
    assert torch.equal(first.kept, again.kept) and torch.equal(first.merged, again.merged)

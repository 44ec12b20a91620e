"""VisionZip: per unit, the dominant tokens (most attention received in the vision tower) and contextual
tokens (the rest merged by key similarity into uniformly spaced targets), checked against a plain
transcription of the released rule; the budget, the split, the option and the errors."""

from __future__ import annotations

import pytest
import torch

import staprune.core.video_methods.visionzip as visionzip
from staprune.core.config import STAConfig
from staprune.core.errors import ConfigError
from staprune.core.video_methods import VideoLayout, VideoTokens, needs_of, select_video_tokens


# --- the release's rule, one unit at a time -------------------------------------------------------------
def released_visionzip(tokens, attention, keys, units, per_unit, dominant, contextual):
    """The released rule (visionzip/clip_encoder.py, Qwen2_5_VL/qwen2_5vl_visionzip.py), one unit at a
    time, in plain loops: the ``dominant`` tokens of highest attention; the others in position order,
    every ``step``-th of them a target; each of the rest joins the target of highest cosine key
    similarity; a target's value is itself plus the mean of what joined it. Returns ``{index: value}``."""
    out = {}
    for u in range(units):
        base = u * per_unit
        scores = [float(attention[base + i]) for i in range(per_unit)]
        ranked = sorted(range(per_unit), key=lambda i: (-scores[i], i))
        top = set(ranked[:dominant])
        for i in top:
            out[base + i] = tokens[base + i].double()
        if contextual == 0:
            continue
        rest = [i for i in range(per_unit) if i not in top]
        step = max(1, len(rest) // contextual)
        target_slots = list(range(0, len(rest), step))[:contextual]
        targets = [rest[s] for s in target_slots]
        merging = [rest[s] for s in range(len(rest)) if s not in target_slots]

        def unit_key(i, base=base):
            k = keys[base + i].double()
            return k / k.norm()

        groups = {t: [] for t in targets}
        for i in merging:
            sims = [float(unit_key(i) @ unit_key(t)) for t in targets]
            best = max(range(len(targets)), key=lambda j: (sims[j], -j))  # the first of the highest
            groups[targets[best]].append(i)
        for t in targets:
            value = tokens[base + t].double()
            if groups[t]:
                value = value + torch.stack([tokens[base + i].double() for i in groups[t]]).mean(0)
            out[base + t] = value
    return out


def make_video(layout, seed, channels=6, key_channels=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return VideoTokens(
        torch.randn(layout.tokens, channels, generator=g).to(dtype),
        layout,
        keys=torch.randn(layout.tokens, key_channels, generator=g),
        attention=torch.rand(layout.tokens, generator=g),
    )


def config(keep_ratio=0.25, **options):
    return STAConfig(keep_ratio=keep_ratio, method="visionzip").with_options(**options)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("keep_ratio", [0.5, 0.25])
@pytest.mark.parametrize("layout", [VideoLayout(8, 4, 4), VideoLayout(4, 6, 5, tail=1)])
def test_visionzip_is_the_release_s_rule(seed, keep_ratio, layout):
    video = make_video(layout, seed)
    keep = round(layout.per_unit * keep_ratio)
    dominant, contextual = visionzip.split_budget(keep, 10 / 64)
    chosen = visionzip.visionzip_select(video, keep, config(keep_ratio))
    reference = released_visionzip(
        video.tokens, video.attention, video.keys, layout.units, layout.per_unit, dominant, contextual
    )
    assert chosen.kept.tolist() == sorted(reference)
    expected = torch.stack([reference[i] for i in sorted(reference)]).float()
    assert torch.allclose(chosen.merged, expected, atol=1e-6)
    assert chosen.merged.dtype == video.tokens.dtype


@pytest.mark.parametrize("share", [0.0, 0.3, 0.75])
def test_visionzip_is_the_release_s_rule_at_other_shares(share):
    layout = VideoLayout(6, 5, 5)
    video = make_video(layout, 7)
    keep = 12
    chosen = visionzip.visionzip_select(video, keep, config(visionzip_contextual_share=share))
    reference = released_visionzip(
        video.tokens, video.attention, video.keys, layout.units, layout.per_unit, *visionzip.split_budget(keep, share)
    )
    assert chosen.kept.tolist() == sorted(reference)
    assert torch.allclose(chosen.merged, torch.stack([reference[i] for i in sorted(reference)]).float(), atol=1e-6)


def test_the_split_is_the_release_s():
    # The LLaVA-1.5 release's README setting (54 + 10 of 64) and its two larger budgets at the same share.
    assert [visionzip.split_budget(k, 10 / 64) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    # int() rounding, at least one contextual token when the share is above zero, at least one dominant.
    assert visionzip.split_budget(13, 10 / 64) == (11, 2)
    assert visionzip.split_budget(2, 10 / 64) == (1, 1)
    assert visionzip.split_budget(1, 10 / 64) == (1, 0)
    assert visionzip.split_budget(10, 0.0) == (10, 0)
    assert visionzip.split_budget(10, 1.0) == (1, 9)
    # The Qwen2.5-VL release at 50% of N=100 tokens: 45 dominant + 5 contextual, a share of 0.1.
    assert visionzip.split_budget(50, 0.1) == (45, 5)
    # DyToK's static VisionZip on LLaVA-OneVision (196 pooled tokens a frame), a share of 1/7.
    dytok = [(126, 21), (84, 14), (42, 7), (30, 5), (12, 2)]
    assert [visionzip.split_budget(d + c, 1 / 7) for d, c in dytok] == dytok


@pytest.mark.parametrize("keep_ratio", [0.5, 0.25, 0.1])
def test_the_count_is_units_times_keep(keep_ratio):
    layout = VideoLayout(8, 6, 6, tail=2)
    chosen = select_video_tokens(make_video(layout, 3), config(keep_ratio))
    keep = round(36 * keep_ratio)
    assert chosen.kept.numel() == layout.units * keep + layout.tail
    assert chosen.merged.shape == (layout.units * keep + layout.tail, 6)
    per_unit = torch.bincount(chosen.kept[: layout.units * keep] // 36, minlength=layout.units)
    assert per_unit.tolist() == [keep] * layout.units  # each unit its own budget


def test_the_count_via_r():
    layout = VideoLayout(4, 4, 4)
    chosen = select_video_tokens(make_video(layout, 4), STAConfig(r=11, method="visionzip"))
    assert chosen.kept.numel() == 4 * 5


def test_the_entry_point_appends_the_tail_and_keeps_stock_positions():
    layout = VideoLayout(3, 4, 4, tail=1)
    video = make_video(layout, 5)
    chosen = select_video_tokens(video, config(0.5))
    assert torch.equal(chosen.kept, chosen.kept.sort().values)  # every token at its stock position
    assert chosen.kept[-1] == layout.body and torch.equal(chosen.merged[-1], video.tokens[-1])
    # Dominant tokens carry their own values; contextual ones their target's position and a merged value.
    dominant, contextual = visionzip.split_budget(8, 10 / 64)
    own = (chosen.merged[:-1] == video.tokens[chosen.kept[:-1]]).all(-1)
    assert int(own.sum()) >= layout.units * dominant


def test_no_contextual_share_keeps_the_most_attended_tokens_unchanged():
    layout = VideoLayout(4, 4, 4)
    video = make_video(layout, 6)
    chosen = visionzip.visionzip_select(video, 5, config(visionzip_contextual_share=0.0))
    top = video.attention[: layout.body].view(4, 16).topk(5, dim=1).indices + torch.arange(4).unsqueeze(1) * 16
    assert chosen.kept.tolist() == sorted(top.flatten().tolist())
    assert torch.equal(chosen.merged, video.tokens[chosen.kept])
    assert needs_of(config(visionzip_contextual_share=0.0)) == frozenset({"attention"})
    assert needs_of(config()) == frozenset({"attention", "keys"})
    # Without keys, a share of zero still works; the default asks for them.
    no_keys = VideoTokens(video.tokens, layout, attention=video.attention)
    assert visionzip.visionzip_select(no_keys, 5, config(visionzip_contextual_share=0.0)).kept.numel() == 20
    with pytest.raises(ConfigError, match="vision-key similarity"):
        visionzip.visionzip_select(no_keys, 5, config())


def test_the_share_changes_the_split():
    layout = VideoLayout(2, 8, 8)
    video = make_video(layout, 8)
    small = visionzip.visionzip_select(video, 32, config(visionzip_contextual_share=10 / 64))
    large = visionzip.visionzip_select(video, 32, config(visionzip_contextual_share=0.5))
    changed = lambda s: int((~(s.merged == video.tokens[s.kept]).all(-1)).sum())  # noqa: E731
    assert changed(small) <= 2 * 5 < changed(large) <= 2 * 16
    assert not torch.equal(small.kept, large.kept)


def test_equal_attention_goes_by_position():
    layout = VideoLayout(2, 3, 3)
    video = VideoTokens(torch.randn(18, 4), layout, keys=torch.randn(18, 3), attention=torch.ones(18))
    chosen = visionzip.visionzip_select(video, 4, config(visionzip_contextual_share=0.0))
    assert chosen.kept.tolist() == [0, 1, 2, 3, 9, 10, 11, 12]


def test_a_target_with_nothing_merged_is_itself_and_a_tie_goes_to_the_first_target():
    layout = VideoLayout(1, 1, 6)
    tokens = torch.arange(6.0).unsqueeze(1).repeat(1, 2)
    attention = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0])  # token 5 dominant; rest 0..4, step 2: targets 0, 2
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, 0.2], [1.0, 1.0], [5.0, 5.0]])
    chosen = visionzip.visionzip_select(
        VideoTokens(tokens, layout, keys=keys, attention=attention), 3, config(visionzip_contextual_share=0.7)
    )
    assert chosen.kept.tolist() == [0, 2, 5]
    # tokens 1 and 3 are nearest target 0, token 4 ties and takes the first target: 0 gets 0 + mean(1, 3, 4);
    # target 2 gets nothing and stays itself
    assert torch.allclose(chosen.merged[:, 0], torch.tensor([8 / 3, 2.0, 5.0]))


def test_same_input_same_output_and_dtype_kept():
    layout = VideoLayout(4, 4, 4)
    video = make_video(layout, 9, dtype=torch.bfloat16)
    first = visionzip.visionzip_select(video, 6, config())
    second = visionzip.visionzip_select(video, 6, config())
    assert torch.equal(first.kept, second.kept) and torch.equal(first.merged, second.merged)
    assert first.merged.dtype == torch.bfloat16


def test_tokens_alone_say_they_need_the_tower_s_attention():
    video = VideoTokens(torch.randn(16, 4), VideoLayout(1, 4, 4))
    with pytest.raises(ConfigError, match="attention they receive in the vision tower"):
        select_video_tokens(video, config(0.5))


@pytest.mark.parametrize("bad", [-0.1, 1.5, "half", True])
def test_a_share_out_of_range_is_refused(bad):
    with pytest.raises(ConfigError, match="visionzip_contextual_share=.* is not valid for method='visionzip'"):
        STAConfig(method="visionzip", keep_ratio=0.25).with_options(visionzip_contextual_share=bad)

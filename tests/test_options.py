"""Every STAConfig option changes the result the way its name says; bad values fail clearly."""

from __future__ import annotations

import pytest
import torch
from conftest import clips, tiny_videomae

import staprune
from staprune.core.baselines import random_keep_indices, tome_merge
from staprune.core.config import STAConfig, resolve_plan
from staprune.core.score import (
    PerSampleRandom,
    bipartite_first_unit,
    grid_first_unit,
    semantic_score,
    sta_keep_indices,
)


def _kept(options: dict, x=None, **model_kw) -> list[torch.Tensor]:
    model = tiny_videomae(**model_kw)
    staprune.patch(model, **{"r": 16, **options})
    with torch.no_grad():
        model(clips() if x is None else x)
    return staprune.kept_tokens(model)


def _differs(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return any(not torch.equal(x.sort(-1).values, y.sort(-1).values) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "option,value",
    [
        ("order", "FFF"),
        ("order", "BFB"),
        ("first_transition", "kept"),
        ("first_unit", "random"),
        ("first_unit", "grid"),
        ("similarity", "query"),
        ("similarity", "value"),
        ("similarity", "hidden"),
        ("score", "temporal"),
        ("score", "semantic"),
        ("method", "random"),
        ("schedule", "constant"),
    ],
)
def test_each_option_changes_the_kept_set(option, value):
    assert _differs(_kept({}), _kept({option: value}))


def test_fbf_is_the_default_and_explicit_fbf_matches():
    default, explicit = _kept({}), _kept({"order": "FBF"})
    assert not _differs(default, explicit)


def _stage_inputs(seed=0, batch=2, units=4, n=20, channels=6):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, units * n, channels, generator=g),
        torch.randn(batch, units * n, 5, generator=g),
    )


def test_semantic_score_ignores_temporal_accumulation():
    x, k = _stage_inputs()
    other_metric = torch.randn_like(k)
    a = sta_keep_indices(x, k, 4, 5, score="semantic")
    b = sta_keep_indices(x, other_metric, 4, 5, score="semantic")
    # Units after the first (unit 0 runs the metric-based bipartite pruner) ignore the metric...
    assert torch.equal(a[:, 15:], b[:, 15:])
    # ...and keep exactly the most activated tokens of their unit.
    sem = semantic_score(x.view(2, 4, 20, 6))
    for u in range(1, 4):
        expected = (1 - sem[:, u]).topk(15, largest=False).indices + 20 * u
        assert torch.equal(a[:, 15 * u : 15 * (u + 1)], expected)


def test_temporal_score_ignores_activation_magnitude():
    x, k = _stage_inputs()
    rescaled = x * torch.rand(x.shape[:2] + (1,)) * 10  # changes F, not the metric
    assert torch.equal(
        sta_keep_indices(x, k, 4, 5, score="temporal"), sta_keep_indices(rescaled, k, 4, 5, score="temporal")
    )
    assert not torch.equal(
        sta_keep_indices(x, k, 4, 5, score="sta"), sta_keep_indices(rescaled, k, 4, 5, score="sta")
    )


def test_backward_order_starts_from_the_last_unit():
    x, k = _stage_inputs()
    fwd = sta_keep_indices(x, k, 4, 5, forward=True)
    bwd = sta_keep_indices(x, k, 4, 5, forward=False)
    # The first processed unit is pruned by the bipartite pruner alone: unit 0 forward, unit 3 backward.
    first_fwd = bipartite_first_unit(torch.nn.functional.normalize(k[:, :20], dim=-1), 5)[:, :15]
    first_bwd = bipartite_first_unit(torch.nn.functional.normalize(k[:, 60:], dim=-1), 5)[:, :15] + 60
    assert torch.equal(fwd[:, :15], first_fwd)
    assert torch.equal(bwd[:, 45:], first_bwd)


def test_bipartite_drops_most_redundant_a_tokens():
    # Tokens 0 and 1 identical, 2 and 3 identical; 4 unique: the duplicates in A (0, 2) go first.
    base = torch.eye(5)
    metric = torch.stack([base[0], base[0], base[1], base[1], base[2], base[3]]).unsqueeze(0)
    order = bipartite_first_unit(metric, 2)
    assert sorted(order[0, -2:].tolist()) == [0, 2]
    assert order[0, :3].tolist() == [1, 3, 5]  # all of set B first


def test_bipartite_handles_r_beyond_half_by_repeating():
    metric = torch.nn.functional.normalize(torch.randn(3, 49, 8), dim=-1)
    order = bipartite_first_unit(metric, 40)
    assert order.shape == (3, 49)
    assert all(sorted(row.tolist()) == list(range(49)) for row in order)


def test_grid_drops_one_token_per_cell():
    h = w = 14
    positions = torch.arange(h * w).expand(2, -1)
    rng = PerSampleRandom([1, 2])
    order = grid_first_unit(rng.rand(h * w), positions, (h, w), 16)  # 4x4 grid
    dropped = order[:, -16:]
    for row in dropped:
        cells = {(int(p) // w * 4 // h, int(p) % w * 4 // w) for p in row}
        assert len(cells) == 16


def test_random_baseline_drops_r_per_unit_and_is_seeded():
    a = random_keep_indices(PerSampleRandom([5, 6]), 2, 4, 20, 7)
    b = random_keep_indices(PerSampleRandom([5, 6]), 2, 4, 20, 7)
    c = random_keep_indices(PerSampleRandom([5, 7]), 2, 4, 20, 7)
    assert torch.equal(a, b) and torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    for u in range(4):
        unit = a[:, 13 * u : 13 * (u + 1)]
        assert ((unit >= 20 * u) & (unit < 20 * (u + 1))).all()


def test_tome_merge_conserves_size_weighted_sum():
    x = torch.randn(2, 30, 4)
    size = torch.randint(1, 4, (2, 30)).float()
    source = torch.arange(30).expand(2, -1)
    merged, new_size, new_source = tome_merge(x, torch.randn(2, 30, 3), size, source, 9)
    assert merged.shape == (2, 21, 4) and new_size.shape == (2, 21)
    torch.testing.assert_close((merged * new_size.unsqueeze(-1)).sum(1), (x * size.unsqueeze(-1)).sum(1))
    torch.testing.assert_close(new_size.sum(1), size.sum(1))
    assert len(set(new_source[0].tolist())) == 21


@pytest.mark.parametrize(
    "schedule,r,expected",
    [
        ("decreasing", 64, [1056, 800, 672]),  # {8x64, 8x32, 8x16}
        ("constant", 48, [1184, 800, 416]),  # {8x48, 8x48, 8x48}
        ("increasing", 27, [1352, 920, 56]),  # {8x27, 8x54, 8x108}
        ("per_frame", 64, [1056, 800, 672]),  # paper text: per frame r, r/2, r/4
        (((8, 64), (8, 32), (8, 16)), 0, [1056, 800, 672]),
        (((8, 10), (2, 5)), 0, [1488, 1478]),
    ],
)
def test_schedule_presets_token_counts(schedule, r, expected):
    locations = (0, 4) if len(expected) == 2 else None
    plan = resolve_plan(STAConfig(r=r, schedule=schedule, locations=locations), 12, 8, 196)
    assert plan.tokens_after == expected


def test_per_frame_schedule_keeps_frames_as_units():
    plan = resolve_plan(STAConfig(r=64, schedule="per_frame"), 12, 8, 196)
    assert [(s.units, s.r) for s in plan.stages] == [(8, 64), (8, 32), (8, 16)]


def test_locations_any_number_of_stages():
    plan = resolve_plan(STAConfig(r=16, locations=(1, 5, 9, 11)), 12, 8, 196)
    assert [s.layer for s in plan.stages] == [1, 5, 9, 11]
    assert [s.units for s in plan.stages] == [8, 4, 2, 1]
    assert "".join("F" if s.forward else "B" for s in plan.stages) == "FBFB"
    kept = _kept({"locations": (1, 3)})
    assert len(kept) == 2


@pytest.mark.parametrize(
    "option,value,valid",
    [
        ("method", "drop", "'sta', 'random', 'tome', 'none'"),
        ("first_unit", "center", "'bipartite', 'random', 'grid'"),
        ("similarity", "ffn", "'key', 'query', 'value', 'hidden'"),
        ("score", "both", "'sta', 'temporal', 'semantic'"),
        ("first_transition", "none", "'all', 'kept'"),
        ("schedule", "linear", "'decreasing', 'constant', 'increasing', 'per_frame'"),
    ],
)
def test_invalid_values_list_the_valid_ones(option, value, valid):
    with pytest.raises(ValueError, match=valid):
        STAConfig(**{option: value})


def test_bad_order_and_unknown_option():
    with pytest.raises(ValueError, match="'F' and 'B'"):
        STAConfig(order="FXF")
    with pytest.raises(TypeError, match="valid options"):
        staprune.patch(tiny_videomae(), r=4, ordr="FBF")
    with pytest.raises(ValueError, match="non-negative"):
        STAConfig(r=-1)


def test_r_too_large_states_the_largest_valid_r():
    with pytest.raises(ValueError, match=r"largest valid r for 8x49 tokens is (\d+)") as info:
        staprune.patch(tiny_videomae(), r=64)
    largest = int(info.value.args[0].rsplit(" ", 1)[-1].rstrip("."))
    staprune.patch(tiny_videomae(), r=largest)  # the stated r works...
    with pytest.raises(ValueError):
        staprune.patch(tiny_videomae(), r=largest + 1)  # ...and the next one does not


def test_frames_not_divisible_into_units():
    model = tiny_videomae(num_frames=12)  # 6 tubelet-frames: stage 2 needs units of 4 frames
    with pytest.raises(ValueError, match="6 tubelet-frames.*must be a multiple of 4.*e.g. 8 or 16 frames"):
        staprune.patch(model, r=8)
    staprune.patch(model, r=8, schedule="per_frame")  # per-frame units always divide


def test_input_geometry_is_checked_at_forward_too():
    model = tiny_videomae(num_frames=16)
    staprune.patch(model, r=8, locations=(0, 1, 2, 3))  # needs 8 frames -> units 8, 4, 2, 1: fine
    with torch.no_grad():
        model(clips(batch=1))
    assert [k.shape[1] for k in staprune.kept_tokens(model)] == [8 * 41, 4 * 74, 2 * 140, 272]

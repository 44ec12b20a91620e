"""FLOP counts: the paper's tables, analytic vs FlopCounterMode, budget search, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

import staprune
from staprune.api.flops import analytic_flops, paper_tables, r_for_budget
from staprune.api.loading import load
from staprune.api.models import build_model, example_input, get_spec, names, spec_of_model
from staprune.core.config import STAConfig, resolve_plan
from staprune.core.flops import flop_counter, measure_flops

PAPER_GFLOPS = paper_tables()


# VideoMAE's tiny model small enough for per-test forward passes: 8 x 64² (4x16 tokens), 6 blocks of width 64.
TINY_VIT = dict(frames=8, size=64, hidden=64, num_classes=10)


def _run_cli(*argv: str) -> int:
    from staprune.cli import main

    return main(["flops", *argv])


# --- analytic: the paper's numbers --------------------------------------------------------------
CASES = [(model, r, paper) for model, row in PAPER_GFLOPS.items() for r, paper in row.items()]


@pytest.mark.parametrize(("model", "r", "paper"), CASES, ids=[f"{m}-r{r}" for m, r, _ in CASES])
def test_analytic_matches_paper_tables(model, r, paper):
    ours = analytic_flops(model, r).gflops
    # The paper rounds to integers: accept 1% or half a unit of rounding, whichever is larger.
    assert abs(ours - paper) <= max(0.01 * paper, 0.5), f"{model} r={r}: ours {ours:.2f} vs paper {paper}"


def test_vit_dense_formula_by_hand():
    # ViT-B, 1568 tokens, 768 channels: 12 blocks of 12LC² + 2L²C, patch embedding L·C·1536, head C·400.
    L, C = 1568, 768
    expected = 12 * (12 * L * C * C + 2 * L * L * C) + L * C * 3 * 2 * 16 * 16 + C * 400
    assert analytic_flops("ViT-B", 0).backbone == pytest.approx(expected, rel=1e-12)


def test_swin_parts_follow_the_convention():
    dense, pruned = analytic_flops("VideoSwin-T", 0), analytic_flops("VideoSwin-T", 256)
    # Attention, patch merging and patch embedding stay dense; linear layers shrink.
    for part in ("attention", "merge", "embed"):
        assert pruned.parts[part] == dense.parts[part]
    for part in ("qkv", "proj", "mlp"):
        assert pruned.parts[part] < dense.parts[part]
    # Stage 2 of Swin-T: 2 blocks x 12 N C² saved on 16 frames x 256 dropped tokens, C=192 (+3, +4 similar).
    assert dense.parts["qkv"] - pruned.parts["qkv"] > 2 * 3 * 16 * 256 * 192**2


def test_ssv2_window_only_changes_attention():
    k400, ssv2 = analytic_flops("VideoSwin-B", 0), analytic_flops("VideoSwin-B-SSV2", 0)
    assert ssv2.parts["attention"] == pytest.approx(2 * k400.parts["attention"])  # 16x7x7 vs 8x7x7 windows
    assert ssv2.parts["mlp"] == k400.parts["mlp"]


def test_flops_decrease_with_r_and_selection_is_separate():
    counts = [analytic_flops("ViT-S", r) for r in range(0, 96, 8)]
    assert all(a.backbone > b.backbone for a, b in zip(counts, counts[1:], strict=False))
    assert counts[0].selection == 0 and all(c.selection > 0 for c in counts[1:])
    assert all(c.total == c.backbone + c.selection for c in counts)
    assert analytic_flops("ViT-S", 64, method="random").selection == 0


def test_tome_merges_before_the_mlp():
    sta, tome = analytic_flops("ViT-B", 32), analytic_flops("ViT-B", 32, method="tome")
    plan = resolve_plan(STAConfig(r=32), 12, 8, 196)
    mlp_saved = sum(8 * s.units * s.r * 768**2 for s in plan.stages)  # MLP of each stage block on fewer tokens
    assert sta.backbone - tome.backbone == pytest.approx(mlp_saved)


def test_geometry_overrides():
    small = analytic_flops("ViT-S", 0, frames=8, size=112)
    assert small.parts["embed"] == 4 * 49 * 384 * 3 * 2 * 16 * 16
    with pytest.raises(ValueError, match="largest valid r"):
        analytic_flops("ViT-S", 64, size=112)  # 49 tokens per frame


# --- measured -----------------------------------------------------------------------------------
def _agree(model, inputs, name_or_model, r, tol=0.02, **options):
    staprune.unpatch(model)
    if r or options.get("method") == "tome":
        staprune.patch(model, r=r, **options)
    measured = measure_flops(model, inputs)
    staprune.unpatch(model)
    analytic = analytic_flops(name_or_model, r, **options)
    assert measured.backbone == pytest.approx(analytic.backbone, rel=tol)
    assert measured.total == pytest.approx(analytic.total, rel=tol)
    return measured, analytic


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"method": "random"},
        {"method": "tome"},
        {"method": "tome", "tome_mode": "every_block", "r": 8},
        {"similarity": "hidden"},
        {"first_transition": "kept", "order": "FFF"},
        {"score": "semantic"},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "sta",
)
def test_measured_matches_analytic_tiny(options):
    model = tiny_model("videomae", **TINY_VIT)
    x = example_input(spec_of_model(model), 1)
    options = dict(options)
    r = options.pop("r", 4)
    measured, analytic = _agree(model, x, model, r, tol=1e-6, **options)
    assert measured.selection == pytest.approx(analytic.selection, rel=1e-6)


def test_measured_is_per_batch_and_counts_selection():
    model = tiny_model("videomae", **TINY_VIT)
    x = example_input(spec_of_model(model), 1)
    dense = measure_flops(model, x)
    assert dense.selection == 0
    staprune.patch(model, r=4)
    pruned = measure_flops(model, x)
    twice = measure_flops(model, torch.cat([x, x]))
    staprune.unpatch(model)
    assert 0 < pruned.selection and pruned.backbone < dense.backbone
    assert twice.total == pytest.approx(2 * pruned.total)
    assert any("attention" in op for op in dense.by_operator), "CPU SDPA must be counted"


def test_selection_is_measured_through_core_s_seam_without_replacing_module_attributes():
    """The FLOP counter and the timing see the selection through ``core.selection_hook``: every call
    a patched model makes (STA, random, ToMe) goes through the wrappers of the contexts around it,
    which nest; no module's attributes change; outside them the functions run plain."""
    import functools
    import sys

    from staprune.core.selection_hook import SELECTED, wrapping_selection

    assert sorted(fn.__name__ for fn in SELECTED) == ["attention_received", "last_query_attention", "random_keep_indices",
                                                      "select_video_tokens", "sta_keep_indices", "tome_merge"]
    calls: list[tuple[str, str]] = []

    def recording(tag):
        def wrap(fn):
            @functools.wraps(fn)
            def call(*args, **kwargs):
                calls.append((tag, fn.__name__))
                return fn(*args, **kwargs)

            return call

        return wrap

    def attributes():
        return {(name, key): value for name, module in list(sys.modules.items()) if name.startswith("staprune")
                and module for key, value in vars(module).items()}

    model = tiny_model("videomae", **TINY_VIT)
    x = example_input(spec_of_model(model), 1)
    methods = {"sta": "sta_keep_indices", "random": "random_keep_indices", "tome": "tome_merge"}
    before = attributes()
    with torch.no_grad(), wrapping_selection(recording("outer")), wrapping_selection(recording("inner")):
        now = attributes()
        assert all(now.get(key) is value for key, value in before.items()), "a module attribute was replaced"
        for method in methods:
            staprune.patch(model, r=4, method=method)
            model(x)
            staprune.unpatch(model)
    assert {name for _, name in calls} == set(methods.values())
    assert calls[0::2] == [("inner", name) for _, name in calls[1::2]]  # each call seen by both, the inner first
    seen = len(calls)
    staprune.patch(model, r=4)
    with torch.no_grad():
        model(x)
    staprune.unpatch(model)
    assert len(calls) == seen, "a wrapper outlived its context"
    # the measurements built on it still attribute the selection
    staprune.patch(model, r=4)
    assert measure_flops(model, x).selection > 0
    staprune.unpatch(model)


@pytest.mark.parametrize("r", [0, 32, 64])
def test_measured_matches_analytic_vit_s(r):
    model = build_model("ViT-S")
    _agree(model, example_input(get_spec("ViT-S")), "ViT-S", r)


@pytest.mark.slow
@pytest.mark.parametrize("r", [0, 32, 64])
def test_measured_matches_analytic_vit_b(r):
    model = build_model("ViT-B")
    _agree(model, example_input(get_spec("ViT-B")), "ViT-B", r)


@pytest.mark.slow
@pytest.mark.parametrize("r", [0, 192])
def test_measured_matches_analytic_swin_t(r):
    model = build_model("VideoSwin-T")
    _agree(model, example_input(get_spec("VideoSwin-T")), "VideoSwin-T", r)


# --- budget -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model", "fraction"), [("ViT-B", 0.6), ("ViT-L", 0.75), ("VideoSwin-B", 0.7)])
def test_r_for_budget_is_the_smallest_r(model, fraction):
    r = r_for_budget(model, fraction)
    dense = analytic_flops(model, 0).gflops
    assert analytic_flops(model, r).gflops <= fraction * dense
    assert analytic_flops(model, r - 1).gflops > fraction * dense


def test_r_for_budget_options_and_unreachable():
    assert r_for_budget("ViT-B", 1.0) == 0
    assert r_for_budget("ViT-B", 0.6, method="tome") < r_for_budget("ViT-B", 0.6)  # MLP also shrinks
    with pytest.raises(ValueError, match=r"lowest achievable fraction is 0\.\d+"):
        r_for_budget("ViT-B", 0.05)
    assert staprune.r_for_budget is r_for_budget


# --- models registry ----------------------------------------------------------------------------
def test_registry_names_and_errors(tmp_path):
    with pytest.raises(ValueError, match="ViT-S.*VideoSwin-B-SSV2"):
        get_spec("ViT-XL")
    with pytest.raises(FileNotFoundError, match="not found"):
        load(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="did you mean 'ViT-L'"):
        load("ViT-XL")  # a near-miss of a registry name never reaches for the hub
    spec = spec_of_model(build_model("VideoSwin-B-SSV2"))
    assert spec.window == (16, 7, 7) and spec.num_classes == 174 and spec.depths == (2, 2, 18, 2)
    paper_models = {"ViT-S", "ViT-B", "ViT-L", "ViT-H", "VideoSwin-T", "VideoSwin-S", "VideoSwin-B", "VideoSwin-B-SSV2"}
    assert set(PAPER_GFLOPS) == paper_models and paper_models <= set(names())


def test_load_model_from_local_directory(tmp_path):
    tiny_model("videomae", **TINY_VIT).save_pretrained(tmp_path)
    model = load(str(tmp_path)).model
    assert spec_of_model(model).hidden == 64 and not model.training


# --- CLI ----------------------------------------------------------------------------------------
def test_cli_prints_both_paper_tables(capsys):
    assert _run_cli() == 0
    out = capsys.readouterr().out
    for model, row in PAPER_GFLOPS.items():
        line = next(ln for ln in out.splitlines() if ln.split() and ln.split()[0] == model)
        cells = [float(v) for v in line.split()[1::2]]
        papers = [float(v.strip("()")) for v in line.split()[2::2]]
        assert papers == [float(p) for p in row.values()]
        assert all(abs(c - p) <= max(0.01 * p, 0.5) + 0.05 for c, p in zip(cells, papers, strict=True))


def test_cli_json_single_model_and_target(capsys, tmp_path):
    assert _run_cli("--model", "ViT-B", "--r", "0", "64", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["r"]) for r in rows] == [("ViT-B", 0), ("ViT-B", 64)]
    assert rows[1]["gflops"] == pytest.approx(analytic_flops("ViT-B", 64).gflops, abs=1e-3)
    assert _run_cli("--model", "ViT-B", "--target", "0.6", "--json") == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["r"] == r_for_budget("ViT-B", 0.6) and row["fraction_of_dense"] <= 0.6
    assert _run_cli("--model", "ViT-B", "--target", "0.01") == 2
    assert "lowest achievable" in capsys.readouterr().err


def test_cli_measured_on_local_model(capsys, tmp_path):
    tiny_model("videomae", **TINY_VIT).save_pretrained(tmp_path)
    assert _run_cli("--model", str(tmp_path), "--r", "0", "4", "--measured", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    model = tiny_model("videomae", **TINY_VIT)
    assert rows[0]["model"] == str(tmp_path) and rows[1]["counted"] == "measured"
    for row in rows:
        assert row["gflops"] == pytest.approx(analytic_flops(model, row["r"]).gflops, abs=1e-3)


def test_flop_counter_counts_cpu_fused_attention() -> None:
    """CPU SDPA (with an additive mask, as the Swin adapter calls it) is counted forward and
    backward: q·kᵀ and attn·v are 2·b·h·s·s·d multiply-adds, 4 FLOPs each in torch's convention
    of 2 FLOPs per multiply-add; backward is torch's five such matmuls (scores recomputed, dV, dP,
    dQ, dK), 2.5x the forward."""
    b, h, s, d = 2, 3, 8, 16
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    mask = torch.randn(s, s)
    with flop_counter(display=False) as counter:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert counter.get_total_flops() == 2 * 2 * b * h * s * s * d
    with flop_counter(display=False) as counter:
        out.sum().backward()
    assert counter.get_total_flops() == 5 * 2 * b * h * s * s * d

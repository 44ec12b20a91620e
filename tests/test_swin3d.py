"""Video Swin (torchvision SwinTransformer3d) support: fused window attention, nearest-kept fill,
pruning at Swin stages 2-4, batch invariance and the paper's FLOPs (Table 3)."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import tiny_swin
from torchvision.models.video import swin3d_t
from torchvision.models.video.swin_transformer import (
    ShiftedWindowAttention3d,
    _compute_attention_mask_3d,
    shifted_window_attention_3d,
)

from staprune.adapters.filled_grid import nearest_kept_fill
from staprune.adapters.state import kept_tokens
from staprune.api.patching import patch, supported, unpatch
from staprune.core.config import swin_stage_drops
from staprune.core.flops import flop_counter
from staprune.families.swin3d import (
    FusedWindowAttention,
    query_subsets,
    shift_mask,
    stage_grids,
    window_layout,
)
from staprune.families.swin3d import attention as swin_attention
from staprune.families.swin3d.pruned_stage import _pruned_attention, _PrunedGrid

# 8x100x76 input, patch (2,4,4): T=4, stage grids 25x19, 13x10, 7x5, 4x3. Window (2,7,7) needs
# padding in stages 1-3 and shrinks to the grid in stage 4.
TINY_INPUT = (8, 100, 76)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models are dominated by per-op overhead; one thread keeps them fast on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clips(batch: int, size: tuple[int, int, int] = TINY_INPUT, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=g)


def run(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


# --- fused attention ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size,window,shift",
    [
        ((4, 14, 14), (2, 7, 7), (0, 0, 0)),  # no padding, no shift
        ((4, 14, 14), (2, 7, 7), (1, 3, 3)),  # shift, no padding
        ((5, 9, 11), (2, 7, 7), (0, 0, 0)),  # padding on every axis
        ((5, 9, 11), (2, 7, 7), (1, 3, 3)),  # padding and shift
        ((3, 6, 20), (4, 7, 7), (2, 3, 3)),  # window shrinks on T and H (no shift there), pads W
    ],
)
def test_fused_attention_matches_torchvision(size, window, shift) -> None:
    torch.manual_seed(0)
    attn = ShiftedWindowAttention3d(24, list(window), list(shift), num_heads=3).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_(std=0.5)  # make the bias matter
    x = torch.randn(2, *size, 24)
    with torch.no_grad():
        stock = attn(x)
        fused = FusedWindowAttention(attn)(x)
        win, sh = list(window), list(shift)
        for i in range(3):
            if size[i] <= win[i]:
                win[i], sh[i] = size[i], 0
        direct = shifted_window_attention_3d(
            x, attn.qkv.weight, attn.proj.weight, attn.get_relative_position_bias(win), win, 3, sh,
            qkv_bias=attn.qkv.bias, proj_bias=attn.proj.bias, training=False,
        )
    torch.testing.assert_close(stock, direct)
    torch.testing.assert_close(fused, stock, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("subset", [True, False], ids=["kept-queries", "all-queries"])
@pytest.mark.parametrize(
    "size,window,shift,per_frame",
    [
        ((4, 14, 14), (2, 7, 7), (1, 3, 3), 20),  # shift, no padding
        ((5, 9, 11), (2, 7, 7), (1, 3, 3), 30),  # padding and shift
        ((3, 6, 20), (4, 7, 7), (2, 3, 3), 100),  # shrunk window, light pruning
    ],
)
def test_pruned_attention_equals_stock_on_filled_grid(monkeypatch, size, window, shift, per_frame, subset) -> None:
    """Kept tokens' attention outputs equal stock attention run on the grid where every dropped
    position holds a copy of its nearest kept token, read back at the kept positions."""
    monkeypatch.setattr(swin_attention, "QUERY_SUBSET_MAX_FILL", 1.0 if subset else -1.0)
    torch.manual_seed(0)
    attn = ShiftedWindowAttention3d(24, list(window), list(shift), num_heads=3).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_(std=0.5)
    bsz, (t, h, w) = 2, size
    n = h * w
    keep = torch.stack([
        torch.cat([torch.randperm(n)[:per_frame] + f * n for f in range(t)]).sort().values for _ in range(bsz)
    ])
    grid = _PrunedGrid(keep, nearest_kept_fill(keep, t, (h, w)), size)
    x_kept = torch.randn(bsz, keep.shape[1], 24)
    with torch.no_grad():
        ours = _pruned_attention(FusedWindowAttention(attn), attn.qkv(x_kept), grid)
        filled = torch.stack([x_kept[b, grid.fill[b]] for b in range(bsz)]).view(bsz, t, h, w, 24)
        stock = attn(filled).reshape(bsz, t * n, 24)
    reference = torch.stack([stock[b, keep[b]] for b in range(bsz)])
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    layout = FusedWindowAttention(attn).layout_for(size, torch.device("cpu"))
    used = [s is not None for s in grid.window_index(layout)[2]]
    assert all(used) if subset else not any(used)


def test_query_subsets_hand_made() -> None:
    """One 2x1x2 grid, one window of 4 slots: kept slots come first in slot order, padding goes to the sink."""
    layout = window_layout((2, 1, 2), (2, 1, 2), (0, 0, 0), torch.device("cpu"))
    sink = 9
    dest = torch.tensor([[sink, 0, sink, 1], [2, sink, sink, sink]])  # clip 0 keeps slots 1, 3; clip 1 slot 0
    (subset,) = query_subsets(dest, sink, layout)
    assert torch.equal(subset.slots, torch.tensor([[1, 3], [0, 1]]))
    assert torch.equal(subset.dest, torch.tensor([[0, 1], [2, sink]]))
    full = torch.tensor([[0, 1, 2, 3]])
    assert query_subsets(full, sink, layout) == [None]  # every slot kept: all queries are cheaper


def test_shift_masks_match_torchvision() -> None:
    size, window, shift = (4, 14, 21), (2, 7, 7), (1, 3, 3)
    padded = size
    reference = _compute_attention_mask_3d(torch.zeros(1), padded, window, shift)  # (windows, N, N)
    layout = window_layout(size, window, shift, torch.device("cpu"))
    counts = [p // w for p, w in zip(padded, window, strict=True)]
    for w_index, (a, b, c) in enumerate(itertools.product(*(range(n) for n in counts))):
        pattern = (a == counts[0] - 1, b == counts[1] - 1, c == counts[2] - 1)
        torch.testing.assert_close(shift_mask(window, shift, pattern), reference[w_index], rtol=0, atol=0)
    assert len(layout.groups) == 8 and sum(n for n, _ in layout.groups) == 2 * 2 * 3


def test_window_layout_is_a_permutation() -> None:
    size = (5, 9, 11)
    layout = window_layout(size, (2, 7, 7), (1, 3, 3), torch.device("cpu"))
    length = 5 * 9 * 11
    real = layout.src[layout.src < length]
    assert torch.equal(real.sort().values, torch.arange(length))
    assert torch.equal(layout.src[layout.slot], torch.arange(length))
    assert layout.padded


# --- nearest kept fill --------------------------------------------------------------------------
def test_nearest_kept_fill_hand_made() -> None:
    # Two 3x3 frames. Frame 0 keeps corners (0,0) and (2,2): the centre and the two other
    # corners are equidistant (a tie) and take the lowest flat index (0,0). Frame 1 keeps only
    # the centre, so everything in it copies flat position 9 + 4 = 13.
    keep = torch.tensor([[8, 13, 0]])  # any order
    fill = nearest_kept_fill(keep, frames=2, grid_hw=(3, 3))
    copied = keep[0, fill[0]]
    expected = torch.tensor([0, 0, 0, 0, 0, 8, 0, 8, 8] + [13] * 9)
    assert torch.equal(copied, expected)


def _brute_force_fill(kept: torch.Tensor, frames: int, h: int, w: int) -> torch.Tensor:
    """Copied flat position per grid position, by loops: nearest (squared distance), lowest index."""
    out = []
    for t in range(frames):
        cells = [(i, j) for i in range(h) for j in range(w)]
        kept_cells = [s for s in range(h * w) if bool(kept[t * h * w + s])]
        for r, c in cells:
            best = min(kept_cells, key=lambda s: ((s // w - r) ** 2 + (s % w - c) ** 2, s))
            out.append(t * h * w + best)
    return torch.tensor(out)


def test_nearest_kept_fill_brute_force() -> None:
    g = torch.Generator().manual_seed(3)
    frames, h, w = 3, 5, 7
    for trial in range(20):
        n_keep = 1 + trial % (h * w)
        keeps = []
        for _ in range(2):
            per_frame = [torch.randperm(h * w, generator=g)[:n_keep] + t * h * w for t in range(frames)]
            keeps.append(torch.cat(per_frame)[torch.randperm(frames * n_keep, generator=g)])
        keep = torch.stack(keeps)
        fill = nearest_kept_fill(keep, frames, (h, w), chunk=200)  # small chunks exercise the loop
        for b in range(2):
            mask = torch.zeros(frames * h * w, dtype=torch.bool)
            mask[keep[b]] = True
            assert torch.equal(keep[b, fill[b]], _brute_force_fill(mask, frames, h, w))


def test_nearest_kept_fill_rejects_empty_frame() -> None:
    with pytest.raises(ValueError, match="no kept token"):
        nearest_kept_fill(torch.tensor([[0, 1]]), frames=2, grid_hw=(1, 2))


# --- whole model ----------------------------------------------------------------------------------
def test_r0_matches_stock_tiny() -> None:
    model, x = tiny_swin(), clips(2)
    stock = run(model, x)
    patch(model, 0)
    assert "torchvision SwinTransformer3d (swin3d_t/s/b)" in supported()
    torch.testing.assert_close(run(model, x), stock, atol=1e-5, rtol=1e-5)
    assert kept_tokens(model) == []
    patch(model, 40, method="none")  # patched, never prunes
    torch.testing.assert_close(run(model, x), stock, atol=1e-5, rtol=1e-5)


def test_r0_matches_stock_swin3d_t_architecture() -> None:
    torch.manual_seed(0)
    model = swin3d_t().eval()
    x = clips(1, (16, 112, 112))  # grids 28, 14, 7, 4: the window shrinks to T=8 and to 4x4
    stock = run(model, x)
    patch(model, 0)
    torch.testing.assert_close(run(model, x), stock, atol=1e-5, rtol=1e-5)


def test_unpatch_restores_stock_exactly() -> None:
    model, x = tiny_swin(), clips(2)
    stock = run(model, x)
    patch(model, 40)
    assert not torch.allclose(run(model, x), stock, atol=1e-5)
    unpatch(model)
    assert torch.equal(run(model, x), stock)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_pruned_token_counts_follow_plan() -> None:
    model, x = tiny_swin(), clips(2)
    patch(model, 40)
    out = run(model, x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    frames, grids = stage_grids(model, *TINY_INPUT)
    kept = kept_tokens(model)
    assert len(kept) == 3
    for k, (drop, (h, w)) in enumerate(zip(swin_stage_drops(40), grids[1:], strict=True)):
        n = h * w
        assert kept[k].shape == (2, frames * (n - drop))
        per_frame = torch.stack([((kept[k] >= t * n) & (kept[k] < (t + 1) * n)).sum(1) for t in range(frames)])
        assert (per_frame == n - drop).all()
        assert (kept[k].diff(dim=1) > 0).all()  # sorted, unique


@pytest.mark.parametrize("stages", [2, 3])
def test_smaller_swins_prune_after_each_patch_merging(stages) -> None:
    """A 2- or 3-stage Swin prunes at stages 2 (and 3) with the first drops of the r1 schedule;
    r=0 still matches stock, and clips stay independent of their batch."""
    depths, heads = [1, 1, 2][:stages], [1, 2, 3][:stages]
    model, x = tiny_swin(depths=depths, num_heads=heads), clips(3)
    stock = run(model, x)
    patch(model, 0)
    torch.testing.assert_close(run(model, x), stock, atol=1e-5, rtol=1e-5)
    patch(model, 40)
    batched = run(model, x)
    frames, grids = stage_grids(model, *TINY_INPUT)
    kept = kept_tokens(model)
    drops = swin_stage_drops(40)[: stages - 1]
    assert [k.shape for k in kept] == [(3, frames * (h * w - d)) for d, (h, w) in zip(drops, grids[1:], strict=True)]
    assert not torch.allclose(batched, stock, atol=1e-4)
    for b in range(3):
        torch.testing.assert_close(run(model, x[b : b + 1]), batched[b : b + 1], atol=1e-5, rtol=1e-5)


def test_swin_deeper_than_four_stages_needs_an_explicit_schedule() -> None:
    model = tiny_swin(depths=[1, 1, 1, 1, 1], num_heads=[1, 1, 1, 1, 1], window_size=[2, 4, 4])
    with pytest.raises(ValueError, match="5 stages.*schedule="):
        patch(model, 4)
    patch(model, 0, schedule=[(4, 4), (4, 2), (4, 1), (4, 0)])  # explicit: accepted


def test_options_change_selection_and_repeat() -> None:
    x, model = clips(2), tiny_swin()

    def kept_with(**options) -> tuple[torch.Tensor, list[torch.Tensor]]:
        patch(model, 40, **options)  # re-patching replaces the previous patch
        return run(model, x), kept_tokens(model)

    out_a, kept_a = kept_with()
    out_b, kept_b = kept_with()
    assert torch.equal(out_a, out_b) and all(torch.equal(a, b) for a, b in zip(kept_a, kept_b, strict=True))
    _, kept_fff = kept_with(order="FFF")
    assert torch.equal(kept_fff[0], kept_a[0])  # stage 2 walks forward in both
    assert not torch.equal(kept_fff[1], kept_a[1])  # stage 3: B vs F
    out_rand, kept_rand = kept_with(method="random")
    assert not torch.equal(kept_rand[0], kept_a[0])
    out_rand2, kept_rand2 = kept_with(method="random")
    assert torch.equal(out_rand, out_rand2) and torch.equal(kept_rand[0], kept_rand2[0])
    for options in ({"similarity": "hidden"}, {"similarity": "query"}, {"first_unit": "grid"}):
        out, kept = kept_with(**options)
        assert torch.isfinite(out).all() and [k.shape for k in kept] == [k.shape for k in kept_a]


@pytest.mark.parametrize("options", [{}, {"method": "random"}, {"first_unit": "grid", "order": "BFB"}])
def test_batch_invariance(options) -> None:
    model, x = tiny_swin(), clips(4)
    patch(model, 40, **options)
    batched = run(model, x)
    kept_batched = kept_tokens(model)
    for b in range(4):
        single = run(model, x[b : b + 1])
        torch.testing.assert_close(single, batched[b : b + 1], atol=1e-5, rtol=1e-5)
        for k_single, k_batched in zip(kept_tokens(model), kept_batched, strict=True):
            assert torch.equal(k_single[0], k_batched[b])


def test_training_backward_after_inference() -> None:
    model, x = tiny_swin(), clips(2)
    patch(model, 40)
    run(model, x)  # caches built under inference mode must still work with autograd
    model.train()
    model(x).sum().backward()
    table = model.features[4][0].attn.relative_position_bias_table
    assert table.grad is not None and table.grad.abs().sum() > 0


def test_bf16_autocast() -> None:
    model, x = tiny_swin(), clips(2)
    stock = run(model, x)
    patch(model, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = run(model, x)
    torch.testing.assert_close(fused.float(), stock, atol=0.02, rtol=0.05)  # bf16 rounding only
    patch(model, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(run(model, x)).all()


def test_errors() -> None:
    largest = max(r for r in range(1, 784) if swin_stage_drops(r)[2] < 49 and swin_stage_drops(r)[1] < 196)
    with pytest.raises(ValueError, match=f"largest valid r1 is {largest}"):
        patch(tiny_swin(), largest + 1)
    patch(tiny_swin(), largest)
    with pytest.raises(ValueError, match="tome"):
        patch(tiny_swin(), 40, method="tome")
    model = tiny_swin()
    patch(model, 40)
    with pytest.raises(ValueError, match="largest valid r1"):
        run(model, clips(1, (8, 40, 40)))  # this input's stage 2 has only 5x5 tokens per frame


# --- FLOPs (paper Table 3) ------------------------------------------------------------------------
@pytest.mark.slow
def test_flops_match_paper_table3(monkeypatch) -> None:
    """Swin-T at 32x224², r1 = 0/192/256/320 -> 88/68/61/54 GFLOPs (1 multiply-add = 1 FLOP).

    FlopCounterMode counts 2 FLOPs per multiply-add (hence /2); ``staprune.core.flops.flop_counter``
    makes it count the CPU fused kernel (aten._scaled_dot_product_flash_attention_for_cpu, which
    some torch releases leave out of its registry), so the dense window attention needs no
    analytic term; the check below fails if attention stops being counted. Stock measures 87.8 (linear layers 66.6, window attention 17.9, patch merging 2.8,
    patch embedding 0.5). The pruned counts include STA's own scoring matmuls and the key
    projection of dropped tokens (~1 GFLOP at r1=320), which is why r1=320 measures ~54.8.
    The paper counts window attention dense, so the check runs with kept-query attention off;
    with it on (the default) the same forwards must cost less (attention of dropped queries).
    """
    torch.manual_seed(0)
    model = swin3d_t().eval()
    x = torch.randn(1, 3, 32, 224, 224)
    paper = {0: 88, 192: 68, 256: 61, 320: 54}
    default_fill = swin_attention.QUERY_SUBSET_MAX_FILL

    def measured(r1: int, subset_fill: float) -> float:
        monkeypatch.setattr(swin_attention, "QUERY_SUBSET_MAX_FILL", subset_fill)
        patch(model, r1)
        with flop_counter(display=False) as counter, torch.inference_mode():
            model(x)
        counts = counter.get_flop_counts()["Global"]
        assert any("scaled_dot_product" in str(op) and n > 0 for op, n in counts.items())
        return counter.get_total_flops() / 2e9

    for r1, expected in paper.items():
        gflops = measured(r1, -1.0)
        assert abs(gflops - expected) / expected < 0.02, (r1, gflops, expected)
        if r1:
            with_subset = measured(r1, default_fill)
            assert with_subset <= gflops + 1e-6
            if r1 == 320:  # stages 3-4 are sparse enough for kept-query attention at r1=320
                assert with_subset < gflops - 0.5

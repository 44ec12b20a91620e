"""staprune.patch on transformers VideoMAE: exactness at r=0, token counts, per-sample behaviour,
gradients, numerical safety, and the ToMe / random baselines through the same interface."""

from __future__ import annotations

import pytest
import torch
from conftest import clips, tiny_videomae

import staprune
from staprune.core.config import STAConfig, resolve_plan


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_r0_reproduces_unpatched_model(attn):
    model = tiny_videomae(attn=attn)
    x = clips()
    with torch.no_grad():
        ref = model(x).logits
        staprune.patch(model, r=0)
        out = model(x).logits
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    # The patched path is really active: kept_tokens only exists after a patched forward.
    assert len(staprune.kept_tokens(model)) == 0


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_unpatch_restores_stock_forward(attn):
    model = tiny_videomae(attn=attn)
    x = clips()
    with torch.no_grad():
        ref = model(x).logits
        staprune.patch(model, r=16)
        pruned = model(x).logits
        staprune.unpatch(model)
        out = model(x).logits
    assert not torch.allclose(pruned, ref)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not patched"):
        staprune.kept_tokens(model)


def _expected_lengths(frames: int, n: int, r: int, units=(None,)) -> list[int]:
    """Sequence length after each stage from the schedule's formula (docs/algorithm/index.md step 2)."""
    t = frames
    unit_tokens, unit_count, lengths = n, t, []
    for k in range(3):
        units_k = t // 2**k
        unit_tokens = unit_tokens * (unit_count // units_k)
        unit_tokens -= r
        unit_count = units_k
        lengths.append(units_k * unit_tokens)
    return lengths


@pytest.mark.parametrize(
    "size,frames,r",
    [(224, 16, 64), (224, 16, 32), (112, 16, 16), (112, 32, 16), (224, 32, 48)],
)
def test_token_counts_follow_the_schedule(size, frames, r):
    model = tiny_videomae(image_size=size, num_frames=frames, layers=6, hidden=32, heads=2)
    staprune.patch(model, r=r)
    with torch.no_grad():
        out = model(clips(batch=1, frames=frames, size=size), output_hidden_states=True)
    t, n = frames // 2, (size // 16) ** 2
    expected = _expected_lengths(t, n, r)
    kept = staprune.kept_tokens(model)
    assert [k.shape[1] for k in kept] == expected
    # For 16x224 and r=64 this is the paper's {8x64, 8x32, 8x16} drop: 1568 -> 1056 -> 800 -> 672.
    if (size, frames, r) == (224, 16, 64):
        assert expected == [1056, 800, 672]
    # Blocks after each location really run on the reduced sequence.
    plan = resolve_plan(STAConfig(r=r), 6, t, n)
    lengths = [h.shape[1] for h in out.hidden_states[1:]]
    assert lengths == [plan.tokens_per_block()[i + 1] if i + 1 < 6 else expected[-1] for i in range(6)]


def test_kept_indices_are_original_positions():
    """The first stage's output is the dense block-0 output gathered at kept_tokens[0]."""
    model = tiny_videomae()
    x = clips(batch=2)
    with torch.no_grad():
        dense = model(x, output_hidden_states=True).hidden_states[1]
        staprune.patch(model, r=20)
        pruned = model(x, output_hidden_states=True).hidden_states[1]
    kept = staprune.kept_tokens(model)
    gathered = dense.gather(1, kept[0].unsqueeze(-1).expand(-1, -1, dense.shape[-1]))
    torch.testing.assert_close(pruned, gathered)
    for later, earlier in zip(kept[1:], kept[:-1], strict=True):
        for b in range(2):
            assert set(later[b].tolist()) <= set(earlier[b].tolist())
            assert len(set(later[b].tolist())) == later.shape[1]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"first_unit": "random"},
        {"first_unit": "grid"},
        {"method": "random"},
        {"method": "tome"},
        {"method": "tome", "tome_mode": "every_block", "r": 8},
        {"similarity": "hidden", "order": "BFB"},
    ],
)
def test_per_sample_batch_invariance(options):
    options = {"r": 16, **options}
    model = tiny_videomae()
    staprune.patch(model, **options)
    x = clips(batch=4, seed=3)
    with torch.no_grad():
        batched = model(x).logits
        kept_batched = staprune.kept_tokens(model)
        for i in range(4):
            single = model(x[i : i + 1]).logits
            torch.testing.assert_close(single, batched[i : i + 1], atol=1e-5, rtol=1e-5)
            for stage_b, stage_s in zip(kept_batched, staprune.kept_tokens(model), strict=True):
                assert torch.equal(stage_s[0], stage_b[i])


@pytest.mark.parametrize("options", [{}, {"method": "random"}, {"first_unit": "grid"}, {"method": "tome"}])
def test_same_input_same_output(options):
    model = tiny_videomae()
    staprune.patch(model, r=16, **options)
    x = clips()
    with torch.no_grad():
        a = model(x).logits
        b = model(x).logits
    assert torch.equal(a, b)


def test_random_choices_follow_the_seed():
    model = tiny_videomae()
    x = clips()
    kept = {}
    for seed in (0, 0, 1):
        staprune.patch(model, r=16, method="random", seed=seed)
        with torch.no_grad():
            model(x)
        kept.setdefault(seed, []).append(staprune.kept_tokens(model)[0])
    assert torch.equal(kept[0][0], kept[0][1])
    assert not torch.equal(kept[0][0], kept[1][0])


def test_constant_frames_and_bf16_give_no_nan():
    model = tiny_videomae()
    staprune.patch(model, r=16)
    constant = torch.full((2, 16, 3, 112, 112), 0.5)
    with torch.no_grad():
        assert torch.isfinite(model(constant).logits).all()
        assert torch.isfinite(model(clips()).logits).all()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(model(clips()).logits.float()).all()
            assert torch.isfinite(model(constant).logits.float()).all()


@pytest.mark.parametrize("method", ["sta", "tome"])
def test_training_backward_reaches_kept_tokens(method):
    model = tiny_videomae(hidden_dropout_prob=0.1).train()
    staprune.patch(model, r=16, method=method)
    x = clips(batch=2)
    captured = {}

    def keep_grad(module, args, output):
        output.retain_grad()
        captured["block0"] = output

    handle = model.videomae.encoder.layer[0].register_forward_hook(keep_grad)
    out = model(x, labels=torch.tensor([1, 2]))
    out.loss.backward()
    handle.remove()
    grad = captured["block0"].grad
    assert grad is not None and torch.isfinite(grad).all()
    # Every kept token of stage 0 is on a live path to the loss.
    assert (grad.abs().sum(-1) > 0).all()
    assert all(p.grad is not None for p in model.videomae.encoder.layer[-1].parameters())


def test_unsupported_model_type_error_names_supported():
    with pytest.raises(TypeError, match="VideoMAEForVideoClassification"):
        staprune.patch(torch.nn.Linear(3, 3), r=8)


def test_first_token_head_is_rejected():
    model = tiny_videomae(use_mean_pooling=False)
    with pytest.raises(ValueError, match="use_mean_pooling"):
        staprune.patch(model, r=8)


def test_videomae_model_without_head_is_supported():
    model = tiny_videomae(head=False)
    staprune.patch(model, r=16)
    with torch.no_grad():
        out = model(clips()).last_hidden_state
    assert out.shape[1] == staprune.kept_tokens(model)[-1].shape[1]


def test_tome_uses_fused_attention_with_an_additive_mask(monkeypatch):
    """Proportional attention must reach SDPA as attn_mask, not force the eager path."""
    model = tiny_videomae(attn="sdpa")
    staprune.patch(model, r=16, method="tome")
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append(attn_mask)
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(clips())
    masks = [m for m in calls if m is not None]
    assert len(calls) == 6 and len(masks) == 6 - 1  # every block after the first merge
    assert all(m.shape[-1] == k for m, k in zip(masks, [264] * 2 + [200] * 2 + [168], strict=True))


def test_tome_head_pools_by_size():
    """With merging, the classifier's mean must weight each token by how many it stands for:
    merging two identical tokens must not change the logits."""
    model = tiny_videomae()
    # A clip made of 2x2 blocks of identical patches: many exact duplicates to merge.
    x = clips(batch=1)
    x = x[..., ::32, ::32].repeat_interleave(32, -1).repeat_interleave(32, -2)[..., :112, :112]
    with torch.no_grad():
        dense = model(x).logits
        staprune.patch(model, r=2, method="tome", locations=(5,), schedule=((8, 2),))
        merged = model(x).logits
    torch.testing.assert_close(merged, dense, atol=1e-4, rtol=1e-4)


def test_kept_stages_align_with_kept_tokens():
    model = tiny_videomae()
    staprune.patch(model, r=16)
    with torch.no_grad():
        model(clips(batch=1))
    stages = staprune.kept_stages(model)
    assert [s.layer for s in stages] == [0, 2, 4]
    assert [s.units * s.tokens_out for s in stages] == [k.shape[1] for k in staprune.kept_tokens(model)]

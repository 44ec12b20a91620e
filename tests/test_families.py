"""Every model family through the same checks (tiny configs, 112², 6 blocks): r=0 is the stock model,
a pruned forward is the stock layers run on exactly the tokens ``kept_tokens`` reports, per-sample
pruning, the schedule's token counts, gradients in train mode, ``torch.compile(fullgraph=True)``,
geometry errors before any forward, and analytic FLOPs against ``FlopCounterMode``.

The references below are written with the models' own modules, one family at a time; they share
nothing with the adapters but the kept indices they are checking."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from conftest import classifier_families, classifier_family_names, tiny_model

import staprune
from staprune.adapters.filled_grid import nearest_kept_fill
from staprune.api.flops import analytic_flops
from staprune.core.config import STAConfig, resolve_plan
from staprune.core.flops import measure_flops
from staprune.families import family_named, family_of


@pytest.fixture(autouse=True, scope="module")
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield
    torch.set_num_threads(threads)


def _clips(batch: int, frames: int, size: int = 112, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _logits(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _positions(source: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Where each index of ``kept`` ``(B, K)`` sits in ``source`` ``(B, L)``."""
    return (source[:, None, :] == kept[:, :, None]).float().argmax(-1)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _stage_steps(model) -> dict[int, torch.Tensor]:
    """Block index -> original indices kept after it (the last forward's kept_tokens)."""
    return {s.layer: k for s, k in zip(staprune.kept_stages(model), staprune.kept_tokens(model), strict=True)}


# --- references: stock layers on the kept tokens (``steps``: block -> indices kept after it) ------
def _reference_videomae(model, x, steps):
    bb = model.videomae
    h = bb.embeddings(x, None)
    source = torch.arange(h.shape[1]).expand(h.shape[0], -1)
    for i, layer in enumerate(bb.encoder.layer):
        h = layer(h)
        if i in steps:
            h, source = _take(h, _positions(source, steps[i])), steps[i]
    return model.classifier(model.fc_norm(h.mean(1)))


def _reference_vivit(model, x, steps):
    bb = model.vivit
    h = bb.embeddings(x)
    source = torch.arange(h.shape[1] - 1).expand(h.shape[0], -1)
    for i, layer in enumerate(bb.layers):
        h = layer(h)
        if i in steps:  # the CLS token stays in front, the patch tokens are the kept ones
            h = torch.cat([h[:, :1], _take(h[:, 1:], _positions(source, steps[i]))], dim=1)
            source = steps[i]
    return model.classifier(bb.layernorm(h)[:, 0])


def _reference_vjepa2(model, x, steps):
    """Every block after the first prune gets the kept tokens' original indices as its positions."""
    enc = model.vjepa2.encoder
    h = enc.embeddings(x)
    source, pruned = torch.arange(h.shape[1]).expand(h.shape[0], -1), False
    for i, layer in enumerate(enc.layer):
        h = layer(h, source if pruned else None)[0]
        if i in steps:
            h, source, pruned = _take(h, _positions(source, steps[i])), steps[i], True
    return model.classifier(model.pooler(enc.layernorm(h)))


def _timesformer_filled_block(layer, h, source, frames, grid_hw):
    """A divided block where each attention sees the full grid, every dropped position holding its
    nearest kept token of the same frame, and only kept positions' outputs are used."""
    bsz, _, c = h.shape
    n = grid_hw[0] * grid_hw[1]
    fill = nearest_kept_fill(source, frames, grid_hw)
    cls, tokens = h[:, :1], h[:, 1:]
    grid = _take(tokens, fill).view(bsz, frames, n, c).transpose(1, 2).reshape(bsz * n, frames, c)
    out = layer.temporal_attention(layer.temporal_layernorm(grid))[0]
    out = out.view(bsz, n, frames, c).transpose(1, 2).reshape(bsz, frames * n, c)
    tokens = tokens + layer.temporal_dense(_take(out, source))
    grid = _take(tokens, fill).view(bsz * frames, n, c)
    grid = torch.cat([cls.repeat_interleave(frames, dim=0), grid], dim=1)
    out = layer.attention(layer.layernorm_before(grid))[0]
    cls_out = out[:, 0].view(bsz, frames, c).mean(1, keepdim=True)
    h = torch.cat([cls + cls_out, tokens + _take(out[:, 1:].reshape(bsz, frames * n, c), source)], dim=1)
    return h + layer.output(layer.intermediate(layer.layernorm_after(h)))


def _reference_timesformer(model, x, steps):
    bb = model.timesformer
    frames, side = bb.config.num_frames, bb.config.image_size // bb.config.patch_size
    h = bb.embeddings(x)
    source = None
    for i, layer in enumerate(bb.encoder.layer):
        if source is None:
            h = layer(h)[0]
            if i in steps:  # HF keeps tokens space-major (s * T + t): reorder to t * N + s, then keep
                tokens = h[:, 1:].view(h.shape[0], side * side, frames, -1).transpose(1, 2).flatten(1, 2)
                h, source = torch.cat([h[:, :1], _take(tokens, steps[i])], dim=1), steps[i]
        else:
            h = _timesformer_filled_block(layer, h, source, frames, (side, side))
            if i in steps:
                h = torch.cat([h[:, :1], _take(h[:, 1:], _positions(source, steps[i]))], dim=1)
                source = steps[i]
    return model.classifier(bb.layernorm(h)[:, 0])


# --- the families ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """What the checks need to know about one family's tiny model (the family builds it)."""

    family: str
    frames: int
    r: int
    attns: tuple[str, ...]
    layers: Callable[[torch.nn.Module], list]
    reference: Callable | None
    layout: str = "BTCHW"
    schedule_units: tuple[int, ...] = (8, 4, 2)  # temporal units of the three default stages
    tokens_per_frame: int = 49
    overrides: dict = field(default_factory=dict)  # what these checks change in the family's tiny model

    def model(self, attn: str | None = None, **kw):
        kw = {**self.overrides, **kw}
        return tiny_model(self.family, attn=attn, **kw) if attn else tiny_model(self.family, **kw)

    def input(self, batch: int, seed: int = 1) -> torch.Tensor:
        x = _clips(batch, self.frames, seed=seed)
        return x.transpose(1, 2).contiguous() if self.layout == "BCTHW" else x


CASES = {
    "videomae": Case("videomae", 16, 16, ("eager", "sdpa"), lambda m: list(m.videomae.encoder.layer),
                     _reference_videomae),
    "vivit": Case("vivit", 16, 16, ("eager", "sdpa"), lambda m: list(m.vivit.layers), _reference_vivit),
    "vjepa2": Case("vjepa2", 16, 16, ("eager", "sdpa"), lambda m: list(m.vjepa2.encoder.layer),
                   _reference_vjepa2),
    "timesformer": Case("timesformer", 8, 16, ("eager",), lambda m: list(m.timesformer.encoder.layer),
                        _reference_timesformer),
    # Video Swin's filled-grid equivalence is checked attention by attention in test_swin3d.py.
    "swin3d": Case("swin3d", 16, 8, ("eager",), lambda m: [b for s in m.features[::2] for b in s], None,
                   layout="BCTHW", schedule_units=(8, 8, 8), tokens_per_frame=0,
                   overrides={"window_size": [2, 4, 4]}),
}
FAMILIES = classifier_family_names()  # every registered video classifier; each needs its Case above


def test_every_video_classifier_family_is_checked():
    """The checks below run on the registry's video classifiers: none is left out silently."""
    assert {"videomae", "swin3d", "vivit", "vjepa2", "timesformer"} <= set(FAMILIES)
    assert set(CASES) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_is_its_familys_and_reproducible(family):
    """Each family's tiny test model builds, is recognised by its own family, in eval mode, and a
    seed fixes its weights (another seed draws others)."""
    owner = family_named(family)
    model = owner.tiny_model(seed=0)
    assert family_of(model) is owner and not model.training
    again, other = owner.tiny_model(seed=0).state_dict(), owner.tiny_model(seed=1).state_dict()
    state = model.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(v, again[k]) for k, v in state.items())
    assert not all(torch.equal(v, other[k]) for k, v in state.items())


@pytest.mark.parametrize(("family", "attn"), [(f, a) for f in FAMILIES for a in CASES[f].attns])
def test_r0_reproduces_the_stock_model(family, attn):
    case = CASES[family]
    model = case.model(attn if family != "swin3d" and family != "timesformer" else None)
    x = case.input(2)
    with torch.no_grad():
        stock = _logits(model, x)
        staprune.patch(model, r=0)
        patched = _logits(model, x)
    assert family_of(model).name == family
    torch.testing.assert_close(patched, stock, atol=1e-6, rtol=1e-6)
    assert staprune.kept_tokens(model) == []  # the patched path ran (kept_tokens exists only then)


@pytest.mark.parametrize("family", [f for f in FAMILIES if CASES[f].reference is not None])
@pytest.mark.parametrize("options", [{}, {"similarity": "hidden", "order": "BFB"}, {"method": "random"}])
def test_pruned_forward_is_the_stock_layers_on_the_kept_tokens(family, options):
    case = CASES[family]
    model = case.model()
    x = case.input(2)
    staprune.patch(model, r=case.r, **options)
    with torch.no_grad():
        pruned = _logits(model, x)
        steps = _stage_steps(model)
        staprune.unpatch(model)  # the reference runs the stock modules
        reference = case.reference(model, x, steps)
        dense = _logits(model, x)
    torch.testing.assert_close(pruned, reference, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(pruned, dense, atol=1e-3)  # pruning changed the result: the check has teeth


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_four_equals_one_by_one(family):
    case = CASES[family]
    model = case.model()
    staprune.patch(model, r=case.r)
    x = case.input(4, seed=3)
    with torch.no_grad():
        batched = _logits(model, x)
        kept = staprune.kept_tokens(model)
        for i in range(4):
            torch.testing.assert_close(_logits(model, x[i : i + 1]), batched[i : i + 1], atol=1e-5, rtol=1e-5)
            assert all(torch.equal(a[0], b[i]) for a, b in zip(staprune.kept_tokens(model), kept, strict=True))


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "swin3d"])  # Swin: test_swin3d.py
@pytest.mark.parametrize("r", [8, 16])
def test_token_counts_follow_the_schedule(family, r):
    case = CASES[family]
    model = case.model()
    staprune.patch(model, r=r)
    with torch.no_grad():
        model(case.input(1))
    counts = [k.shape[1] for k in staprune.kept_tokens(model)]
    # docs/algorithm/index.md step 2: stage k has T / 2**k units; each drops r tokens.
    tokens, unit_count, expected = case.tokens_per_frame, 8, []
    for units in case.schedule_units:
        tokens = tokens * (unit_count // units) - r
        unit_count = units
        expected.append(units * tokens)
    assert counts == expected
    plan = resolve_plan(STAConfig(r=r), len(case.layers(model)), 8, case.tokens_per_frame)
    assert counts == plan.tokens_after and [s.layer for s in staprune.kept_stages(model)] == [0, 2, 4]
    for stage in staprune.kept_tokens(model):  # patch-token indices only (no CLS), all distinct
        assert stage.min() >= 0 and stage.max() < 8 * case.tokens_per_frame
        assert len(set(stage[0].tolist())) == stage.shape[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_the_kept_tokens_in_train_mode(family):
    case = CASES[family]
    model = case.model().train()
    staprune.patch(model, r=case.r)
    x = case.input(2)
    layers = case.layers(model)
    captured = {}

    def keep(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out.retain_grad()
        captured["block0"] = out

    # Columnar models: block 0's output as the rest of the model sees it (the kept tokens, and CLS,
    # after the first prune). Swin: the patch merging that feeds the first pruned stage (its grid).
    tapped = model.features[1] if family == "swin3d" else layers[0]
    handle = tapped.register_forward_hook(keep)
    _logits(model, x).square().sum().backward()
    handle.remove()
    grad = captured["block0"].grad
    assert grad is not None and torch.isfinite(grad).all()
    per_token = grad.abs().flatten(1, -2).sum(-1)  # (B, tokens) whatever the block's layout
    kept = staprune.kept_tokens(model)[0]
    if family == "swin3d":
        live = torch.zeros_like(per_token, dtype=torch.bool).scatter_(1, kept, True)
        assert (per_token[live] > 0).all(), "a kept token is cut off from the loss"
        assert (per_token[~live] == 0).all(), "a dropped token's own value reached the loss"
    else:
        assert per_token.shape[1] - kept.shape[1] == (1 if family in ("vivit", "timesformer") else 0)
        assert (per_token > 0).all(), "a kept token is cut off from the loss"
    assert all(p.grad is not None for p in layers[-1].parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_patched_forward_matches_eager(family):
    """``torch.compile(fullgraph=True)`` captures the whole patched inference forward as one graph
    (AOTAutograd traced, no inductor codegen: that would take minutes on two CPU cores)."""
    case = CASES[family]
    model = case.model()
    staprune.patch(model, r=case.r)
    x = case.input(2)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = _logits(model, x)
        compiled = _logits(torch.compile(model, fullgraph=True, backend="aot_eager"), x)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


# Per family: the frames of a model whose configured clip cannot be split into the stages' units (None:
# the family fixes no clip length), and an input the patched model must refuse before its first block.
BAD_GEOMETRY = {
    "videomae": (20, lambda: _clips(1, 20)),  # 10 tubelet-frames: not 4 | 10
    "vivit": (20, lambda: _clips(1, 20)),
    "timesformer": (10, lambda: _clips(1, 10)),
    "vjepa2": (None, lambda: _clips(1, 20)),  # rotary positions take any clip length: checked per input
    "swin3d": (None, lambda: torch.randn(1, 3, 16, 32, 32)),  # a 1x1 stage-2 grid cannot drop 8 per frame
}


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_geometry_is_a_value_error_before_any_forward(family):
    case = CASES[family]
    with pytest.raises(ValueError, match="too large"):
        staprune.patch(case.model(), r=10_000)
    bad_frames, bad_input = BAD_GEOMETRY[family]
    if bad_frames is not None:
        with pytest.raises(ValueError, match="units|divisible"):
            staprune.patch(case.model(frames=bad_frames), r=4)
    model = staprune.patch(case.model(), r=case.r)
    ran = []
    case.layers(model)[0].register_forward_hook(lambda *args: ran.append(1))
    with pytest.raises(ValueError):
        model(bad_input())
    assert not ran, "the model ran blocks before refusing the input"


@pytest.mark.parametrize("family", FAMILIES)
def test_analytic_flops_equal_flop_counter_mode(family):
    case = CASES[family]
    model = case.model()
    x = case.input(1)
    for r in (0, case.r // 2, case.r):
        staprune.unpatch(model)
        analytic = analytic_flops(model, r, frames=case.frames, size=112)
        staprune.patch(model, r=r)  # r=0: what staprune runs (Swin: fused attention, no padded qkv)
        measured = measure_flops(model, x)
        assert measured.backbone == pytest.approx(analytic.backbone, rel=0.02), f"{family} r={r}"
        # (Swin's dropped-token key projection runs outside the selection functions: measured
        # counts it as backbone, the analytic count as selection; the totals agree.)
        assert measured.total == pytest.approx(analytic.total, rel=0.02), f"{family} r={r}"
    staprune.unpatch(model)
    dense, pruned = (analytic_flops(model, r, frames=case.frames, size=112) for r in (0, case.r))
    assert pruned.backbone < dense.backbone


def _first_stage_inputs(model, family, x):
    """Block 0's patch tokens ``(B, L, C)`` (``t * N + s``) and its attention keys ``(B, L, C)``,
    CLS removed, from the unpatched model."""
    from staprune.families.timesformer import space_major_to_time_major

    seen = {}

    def record(name, value):  # a forward hook must return None, or it replaces the output
        seen[name] = value

    if family == "vivit":
        layer = model.vivit.layers[0]
        handles = [layer.register_forward_hook(lambda m, a, o: record("h", o[:, 1:])),
                   layer.attention.k_proj.register_forward_hook(lambda m, a, o: record("k", o[:, 1:]))]
    else:
        frames = model.config.num_frames
        layer = model.timesformer.encoder.layer[0]

        def keys(m, a, o):  # spatial qkv (B*T, 1 + N, 3C): frame-major patch rows are t * N + s
            c = o.shape[-1] // 3
            record("k", o[:, 1:, c:2 * c].reshape(x.shape[0], -1, c))

        handles = [layer.register_forward_hook(lambda m, a, o: record("h", space_major_to_time_major(o[0][:, 1:], frames))),
                   layer.attention.attention.qkv.register_forward_hook(keys)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen["h"], seen["k"]


@pytest.mark.parametrize("family", ["vivit", "timesformer"])
def test_cls_token_is_never_dropped_and_takes_no_part_in_scoring(family):
    """The first stage's kept set is STA run on block 0's patch tokens and patch keys alone, and the
    CLS token stays in the sequence (the logits read it)."""
    from staprune.core.score import head_mean, sta_keep_indices

    model = CASES[family].model()
    x = CASES[family].input(2)
    hidden, keys = _first_stage_inputs(model, family, x)
    heads = model.config.num_attention_heads
    metric = head_mean(keys.view(*keys.shape[:2], heads, -1).transpose(1, 2))
    expected = sta_keep_indices(hidden, metric, units=8, r=16)
    staprune.patch(model, r=16)
    with torch.no_grad():
        model(x)
        out = model(x, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(staprune.kept_tokens(model)[0], expected)
    assert out.shape[1] == 1 + staprune.kept_tokens(model)[-1].shape[1]  # CLS + the kept patch tokens


def test_unsupported_models_get_a_type_error_naming_the_families():
    from transformers import XCLIPVisionConfig, XCLIPVisionModel

    model = XCLIPVisionModel(XCLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=32, patch_size=16))
    with pytest.raises(TypeError) as err:
        staprune.patch(model, r=4)
    message = str(err.value)
    for name in ("VideoMAE", "SwinTransformer3d", "Vivit", "VJEPA2", "Timesformer"):
        assert name in message
    assert "XCLIPVisionModel" in message


def test_timesformer_other_attention_types_are_refused():
    model = tiny_model("timesformer", attention_type="joint_space_time")
    with pytest.raises(ValueError, match="divided space-time"):
        staprune.patch(model, r=8)


def test_tome_is_refused_outside_videomae():
    for family in classifier_families():
        if not family.supports_tome:
            with pytest.raises(ValueError, match="tome"):
                staprune.patch(family.tiny_model(), r=8, method="tome")


def test_vjepa2_predictor_is_refused_when_pruning():
    from transformers import VJEPA2Model

    model = tiny_model("vjepa2")
    encoder = VJEPA2Model(model.config).eval()
    staprune.patch(encoder, r=8)
    x = _clips(1, 16)
    with pytest.raises(ValueError, match="skip_predictor=True"):
        encoder(x)
    with torch.no_grad():
        out = encoder(x, skip_predictor=True).last_hidden_state
    assert out.shape[1] == staprune.kept_tokens(encoder)[-1].shape[1]


def test_vjepa2_positions_follow_the_kept_tokens():
    """Without the original indices a pruned V-JEPA 2 would rotate kept tokens as if they sat at
    positions 0..K-1: check the hooks deliver them by breaking them."""
    model = tiny_model("vjepa2")
    with torch.no_grad():  # sharpen attention so that positions visibly matter in a random model
        for layer in model.vjepa2.encoder.layer:
            layer.attention.query.weight.mul_(8.0)
            layer.attention.key.weight.mul_(8.0)
    x = _clips(1, 16)
    staprune.patch(model, r=16)
    with torch.no_grad():
        good = _logits(model, x)
    layer = model.vjepa2.encoder.layer[3]
    handle = layer.register_forward_pre_hook(lambda m, args, kwargs: ((args[0], None), kwargs), with_kwargs=True)
    with torch.no_grad():
        broken = _logits(model, x)
    handle.remove()
    assert not torch.allclose(good, broken, rtol=1e-3, atol=1e-7)

"""Video-token methods as a registry (staprune.core.video_methods): each built-in method is the
selection the core functions make (what the former if/elif chain called), a method registered from
outside works on every video LLM at the same budget, and a merging method's values reach the
language model."""

from __future__ import annotations

import pytest
import torch

import staprune
from staprune.core.baselines import random_keep_indices, static_keep_indices, uniform_unit_indices
from staprune.core.config import STAConfig
from staprune.core.errors import ConfigError, UsageError
from staprune.core.score import PerSampleRandom, normalize_metric, sta_keep_indices
from staprune.core.video_methods import (
    Selection,
    VideoLayout,
    VideoMethod,
    VideoTokens,
    kept_tokens_of,
    register_video_method,
    select_video_tokens,
    unregister_video_method,
    video_method_names,
)
from staprune.families import VIDEO_LLM, families

LAYOUT = VideoLayout(4, 3, 4, tail=1)  # 4 units of 12 tokens, then a newline


def _video(seed: int = 0, **extra) -> VideoTokens:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(LAYOUT.tokens, 16, generator=g)
    return VideoTokens(tokens, LAYOUT, **extra)


def test_the_built_in_methods_are_registered_in_order():
    assert video_method_names()[:11] == ["sta", "random", "uniform", "static", "evs", "divprune", "vidcom2", "fastv",
                                        "visionzip", "fastvid", "holitom"]


@pytest.mark.parametrize("similarity", ["key", "hidden"])
def test_sta_is_the_core_selection_per_video(similarity):
    keys = torch.randn(LAYOUT.tokens, 8, generator=torch.Generator().manual_seed(5)) if similarity == "key" else None
    video = _video(keys=keys)
    config = STAConfig(keep_ratio=0.5, similarity=similarity, order="B")
    body = LAYOUT.body
    metric = keys if keys is not None else normalize_metric(video.tokens)
    expected = sta_keep_indices(video.tokens[None, :body], metric[None, :body], 4, 6, forward=False,
                                positions=torch.arange(body)[None], grid_hw=(3, 4))[0]
    kept = select_video_tokens(video, config).kept
    assert torch.equal(kept, torch.cat([expected.sort().values, torch.tensor([body])]))


def test_random_uniform_and_static_are_the_core_baselines():
    rng = lambda: PerSampleRandom([7])  # noqa: E731
    body, tail = LAYOUT.body, torch.tensor([LAYOUT.body])
    kept = select_video_tokens(_video(rng=rng()), STAConfig(keep_ratio=0.25, method="random")).kept
    assert torch.equal(kept, torch.cat([random_keep_indices(rng(), 1, 4, 12, 9)[0].sort().values, tail]))
    kept = select_video_tokens(_video(), STAConfig(keep_ratio=0.25, method="uniform")).kept
    assert torch.equal(kept, torch.cat([uniform_unit_indices(4, 12, 3), tail]))
    change = torch.rand(4, 12, generator=torch.Generator().manual_seed(3))
    kept = select_video_tokens(_video(change=change), STAConfig(keep_ratio=0.25, method="static")).kept
    assert torch.equal(kept, torch.cat([static_keep_indices(change, 3), tail]))
    assert kept.numel() == 4 * 3 + 1 and kept[:-1].max() < body


def test_a_full_budget_or_none_keeps_every_token():
    for config in (STAConfig(keep_ratio=1.0), STAConfig(keep_ratio=0.5, method="none")):
        assert torch.equal(select_video_tokens(_video(), config).kept, torch.arange(LAYOUT.tokens))
    assert kept_tokens_of(LAYOUT, STAConfig(keep_ratio=0.5)) == 4 * 6 + 1
    assert kept_tokens_of(LAYOUT, STAConfig(keep_ratio=0.25, method="uniform")) == 12 + 1  # one whole unit


# --- a method added from outside ---------------------------------------------------------------------
def _first_tokens(video: VideoTokens, keep: int, config: STAConfig) -> Selection:
    """A merging toy: each unit keeps its first ``keep`` tokens, carrying twice their value."""
    layout = video.layout
    kept = (torch.arange(layout.units)[:, None] * layout.per_unit + torch.arange(keep)[None]).reshape(-1)
    return Selection(kept, 2 * video.tokens[kept])


@pytest.fixture(scope="module")
def first_tokens():
    register_video_method(VideoMethod("first-tokens-test", _first_tokens, description="test only"))
    yield "first-tokens-test"
    unregister_video_method("first-tokens-test")  # the registry lists the built-in methods again


def _language_model_embeds(model, inputs) -> torch.Tensor:
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"][0]


@pytest.mark.parametrize("family", [f for f in families() if f.kind == VIDEO_LLM], ids=lambda f: f.name)
def test_a_registered_method_runs_on_every_video_llm_and_its_merged_values_reach_the_language_model(
        family, first_tokens):
    import test_video_llms as vl

    model = family.tiny_model()
    inputs = vl.FAMILIES[family.name][1](model)
    stock = _language_model_embeds(model, inputs)
    staprune.patch(model, keep_ratio=0.5, method=first_tokens)
    try:
        pruned = _language_model_embeds(model, inputs)
        (kept,) = staprune.kept_tokens(model)
    finally:
        staprune.unpatch(model)
    ids = inputs["input_ids"][0]
    video = (ids == family.describe(model).video_token_id).nonzero().flatten()
    expected = stock.clone()
    merged = kept[kept < kept.max()] if family.name == "llava_onevision" else kept  # LLaVA's newline is kept as is
    expected[video[merged]] *= 2
    keep = torch.ones(ids.shape[0], dtype=torch.bool)
    keep[video] = False
    keep[video[kept]] = True
    assert torch.equal(pruned, expected[keep])
    assert kept.numel() < video.numel()


def test_a_registered_method_is_refused_by_video_classifiers(first_tokens):
    from conftest import tiny_videomae

    with pytest.raises(ConfigError, match="video-LLM method"):
        staprune.patch(tiny_videomae(), r=4, method=first_tokens)


def test_a_method_that_needs_what_no_model_gives_is_refused():
    with pytest.raises(UsageError, match="a method may need keys, pixel_change, noise, attention"):
        register_video_method(VideoMethod("needs-flow-test", _first_tokens,
                                          needs=lambda config: frozenset({"optical_flow"})))


# --- EVS, against vLLM's rule -----------------------------------------------------------------------
def vllm_evs_mask(tokens: torch.Tensor, units: int, per_unit: int, pruning_rate: float) -> torch.Tensor:
    """vLLM's EVS retention mask (vllm/multimodal/evs.py, written out from its rule): 1 - cosine
    similarity with the same token of the previous frame, the first frame at 255, a stable descending
    sort, ``max(tokens_per_frame, int(total * (1 - q)))`` kept."""
    x = tokens.view(units, per_unit, -1)
    dissimilarity = torch.cat([torch.full((1, per_unit), 255.0),
                               1 - torch.nn.functional.cosine_similarity(x[1:], x[:-1], dim=-1)])
    order = torch.argsort(dissimilarity.flatten(), descending=True, stable=True)
    count = max(per_unit, int(units * per_unit * (1 - pruning_rate)))
    mask = torch.zeros(units * per_unit, dtype=torch.bool)
    mask[order[:count]] = True
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evs_keeps_what_vllm_s_rule_keeps_at_the_same_count(seed):
    layout = VideoLayout(5, 2, 4)  # 5 units of 8 tokens; keep 0.5: 4 a unit, 20 in all, as vLLM's int(40 * 0.5)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(40, 16, generator=g)
    tokens[8:16] = tokens[:8] + 0.01 * torch.randn(8, 16, generator=g)  # unit 1 barely changes: dropped
    kept = select_video_tokens(VideoTokens(tokens, layout), STAConfig(keep_ratio=0.5, method="evs")).kept
    expected = vllm_evs_mask(tokens, 5, 8, pruning_rate=0.5).nonzero().flatten()
    assert torch.equal(kept, expected)
    assert set(range(8)) <= set(kept.tolist()) and not set(range(8, 16)) & set(kept.tolist())


def test_evs_lands_on_the_same_count_as_every_method():
    """The first unit ranks first; a budget below one unit keeps its first tokens (vLLM: all of it)."""
    layout = VideoLayout(4, 3, 4)
    tokens = torch.randn(48, 8, generator=torch.Generator().manual_seed(4))
    for ratio, count in ((0.5, 24), (0.25, 12), (0.1, 4)):
        config = STAConfig(keep_ratio=ratio, method="evs")
        kept = select_video_tokens(VideoTokens(tokens, layout), config).kept
        assert kept.numel() == count == kept_tokens_of(layout, config) == kept_tokens_of(layout, STAConfig(keep_ratio=ratio))
        assert kept[: min(count, 12)].tolist() == list(range(min(count, 12)))  # the first unit first


# --- DivPrune, against its released rule ----------------------------------------------------------------
def released_divprune(features: torch.Tensor, count: int) -> torch.Tensor:
    """DivPrune's selection as its release computes it (written out from the rule): cosine distances
    of the normalised features; the first pick maximises the second-smallest distance of its column,
    every next one the smallest distance to the picks so far; ``torch.argmax`` takes the first maximum."""
    normed = features / features.norm(dim=1, keepdim=True)
    distance = 1.0 - normed @ normed.T
    picks = torch.empty(count, dtype=torch.long)
    for i in range(count):
        if i == 0:
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1, :]
        else:
            scores = distance.index_select(0, picks[:i]).min(dim=0).values
        picks[i] = torch.argmax(scores)
    return picks


@pytest.mark.parametrize("seed", [0, 1])
def test_divprune_keeps_its_released_rule_s_set_at_the_same_count(seed):
    layout = VideoLayout(4, 2, 3)  # 24 tokens; keep 0.5: 3 a unit, 12 in all
    tokens = torch.randn(24, 8, generator=torch.Generator().manual_seed(seed))
    tokens[6:12] = tokens[0:6]  # unit 1 repeats unit 0: a diverse set keeps at most one of each pair
    config = STAConfig(keep_ratio=0.5, method="divprune")
    kept = select_video_tokens(VideoTokens(tokens, layout), config).kept
    assert torch.equal(kept, released_divprune(tokens, 12).sort().values)
    assert kept.numel() == kept_tokens_of(layout, config) == kept_tokens_of(layout, STAConfig(keep_ratio=0.5))
    assert not any(int(k) + 6 in kept.tolist() for k in kept if k < 6)  # never both copies


# --- VidCom2, against its rule as vLLM ports it -----------------------------------------------------------
def vidcom2_rule(embeds: torch.Tensor, units: int, per_unit: int, keep_ratio: float) -> torch.Tensor:
    """VidCom2's retention mask written out from its rule (the reference release, as vLLM ports it in
    vllm/multimodal/video_prune/vidcom2.py): lowest-variance half of the channels, Gaussian
    similarities to the video and frame centres, softmax frame budgets, per-frame lowest, and the
    count reconciled to ``max(T, int(total · keep_ratio))``."""
    F = torch.nn.functional
    total = units * per_unit
    target = max(units, min(int(total * keep_ratio), total))
    channels = max(1, int(embeds.shape[-1] * 0.5))
    chosen = torch.topk(embeds.var(dim=0, unbiased=False), k=channels, largest=False).indices
    frames = F.normalize(embeds[:, chosen].view(units, per_unit, channels), dim=-1)

    def gaussian(x, centre):
        d = ((x - centre) ** 2).sum(-1)
        return sum(torch.exp(-d / (2.0 * a)) for a in (0.125, 0.25, 0.5, 1.0, 2.0))

    v = gaussian(frames, frames.mean(dim=(0, 1), keepdim=True))
    similarity = v + gaussian(frames, frames.mean(dim=1, keepdim=True))
    scores = -v.mean(-1)
    probs = F.softmax((scores - scores.max()) / 0.01, dim=0)
    ks = (keep_ratio * (1 + probs - probs.mean())).clamp(max=1.0).mul(per_unit).round().long().clamp(1, per_unit)
    mask = torch.zeros(units, per_unit, dtype=torch.bool)
    for i in range(units):
        mask[i, torch.topk(similarity[i], k=int(ks[i]), largest=False).indices] = True
    mask, flat = mask.view(-1), similarity.view(-1)
    current = int(mask.sum())
    if current > target:
        held = mask.nonzero().flatten()
        mask[held[torch.topk(flat[held], k=current - target).indices]] = False
    elif current < target:
        free = (~mask).nonzero().flatten()
        mask[free[torch.topk(flat[free], k=target - current, largest=False).indices]] = True
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vidcom2_keeps_its_rule_s_set_at_the_same_count(seed):
    layout = VideoLayout(4, 3, 4)  # keep 0.25 of 12: 3 a unit, 12 in all, as int(48 * 0.25)
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(12, 16, generator=g)
    tokens = torch.cat([base + 0.1 * torch.randn(12, 16, generator=g) for _ in range(3)]
                       + [torch.randn(12, 16, generator=g) * 3])  # frames 0-2 alike, frame 3 distinct
    config = STAConfig(keep_ratio=0.25, method="vidcom2")
    kept = select_video_tokens(VideoTokens(tokens, layout), config).kept
    assert torch.equal(kept, vidcom2_rule(tokens, 4, 12, 0.25).nonzero().flatten())
    assert kept.numel() == 12 == kept_tokens_of(layout, config)
    assert len(set(torch.bincount(kept // 12, minlength=4).tolist())) > 1  # frames get budgets of their own


# --- the same budget is the same count ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_video_llms():
    import test_video_llms as vl

    built = {}
    for family in families():
        if family.kind == VIDEO_LLM:
            model = family.tiny_model()
            built[family.name] = (model, vl.FAMILIES[family.name][1](model))
    return built


# The tiny language models have two decoder layers: FastV cuts after the first.
TINY_OPTIONS = {"fastv": {"fastv_layer": 1}}


def method_options_for_tiny(method: str) -> dict:
    return {"method": method, **TINY_OPTIONS.get(method, {})}


@pytest.mark.parametrize("budget", [{"keep_ratio": 0.5}, {"keep_ratio": 0.25}, {"r": 5}], ids=str)
def test_every_method_hands_every_model_the_same_count_at_one_budget(tiny_video_llms, budget):
    for name, (model, inputs) in tiny_video_llms.items():
        counts = {}
        for method in video_method_names():
            staprune.patch(model, **method_options_for_tiny(method), **budget)
            try:
                with torch.no_grad():
                    model(**inputs)
                counts[method] = [k.numel() for k in staprune.kept_tokens(model)]
            finally:
                staprune.unpatch(model)
        expected = counts["sta"]
        # uniform keeps whole units (about as many tokens: its own count, said in its docs)
        assert all(c == expected for m, c in counts.items() if m != "uniform"), (name, counts)


@pytest.mark.parametrize("method", video_method_names())
def test_every_method_at_full_budget_is_every_model_s_stock_forward_and_generate(tiny_video_llms, method):
    import test_video_llms as vl

    for name, (model, inputs) in tiny_video_llms.items():
        staprune.unpatch(model)
        with torch.no_grad():
            stock = model(**inputs).logits
        stock_tokens = vl.greedy(model, inputs, steps=2)
        staprune.patch(model, keep_ratio=1.0, **method_options_for_tiny(method))
        try:
            with torch.no_grad():
                assert torch.equal(model(**inputs).logits, stock), name
            assert torch.equal(vl.greedy(model, inputs, steps=2), stock_tokens), name
        finally:
            staprune.unpatch(model)


def _two_video_lengths(family_name: str):
    """A model and a batch of two prompts whose videos differ in length, and each prompt alone."""
    import test_video_llms as vl

    if family_name == "internvl":
        model = vl.internvl()
        prompts = [vl.internvl_inputs(model, frames=4, seed=1), vl.internvl_inputs(model, frames=2, seed=5)]
        rows = [p["input_ids"][0].tolist() for p in prompts]
        batch = vl.prompts(model, rows, pixel_values=torch.cat([p["pixel_values"] for p in prompts]))
        return model, batch, prompts
    model = vl.qwen25()
    prompts = [vl.qwen_inputs(model, units=(4,), seed=1), vl.qwen_inputs(model, units=(2,), seed=5)]
    rows = [p["input_ids"][0].tolist() for p in prompts]
    batch = vl._batch(rows, [p["pixel_values_videos"] for p in prompts], [p["video_grid_thw"] for p in prompts])
    return model, batch, prompts


@pytest.mark.parametrize("family_name", ["qwen2_5_vl", "internvl"])
@pytest.mark.parametrize("method", video_method_names())
def test_every_method_prunes_a_batch_of_two_video_lengths_as_each_alone(family_name, method):
    model, batch, prompts = _two_video_lengths(family_name)
    staprune.patch(model, keep_ratio=0.25, **method_options_for_tiny(method))
    with torch.no_grad():
        together = model(**batch).logits[:, -1]
        kept_together = staprune.kept_tokens(model)
        alone, kept_alone = [], []
        for prompt in prompts:
            alone.append(model(**prompt).logits[0, -1])
            kept_alone += staprune.kept_tokens(model)
    assert [k.tolist() for k in kept_together] == [k.tolist() for k in kept_alone]
    for row, single in zip(together, alone, strict=True):
        torch.testing.assert_close(row, single, atol=1e-5, rtol=1e-5)


def _selections_of(model, inputs) -> list[Selection]:
    """What the patched model's method handed over for each video of ``inputs`` (its Selections)."""
    from staprune.core.selection_hook import wrapping_selection

    made: list[Selection] = []

    def record(fn):
        def recorded(*args, **kwargs):
            out = fn(*args, **kwargs)
            if isinstance(out, Selection):
                made.append(out)
            return out

        return recorded

    with wrapping_selection(record), torch.no_grad():
        logits = model(**inputs).logits
    return made, logits


BEFORE_THE_LANGUAGE_MODEL = [m for m in video_method_names() if m != "fastv"]  # FastV: tests/test_method_fastv.py


@pytest.mark.parametrize("method", BEFORE_THE_LANGUAGE_MODEL)
def test_every_method_s_pruned_forward_is_the_stock_language_model_on_what_it_hands_over(tiny_video_llms, method):
    """The stock language model on the text and exactly the tokens the method hands over (a merging
    method's merged values at its kept tokens' columns), every token at its stock position."""
    import test_video_llms as vl

    for name, (model, inputs) in tiny_video_llms.items():
        staprune.unpatch(model)
        stock = vl.language_model_inputs(model, inputs)
        staprune.patch(model, keep_ratio=0.3, **method_options_for_tiny(method))
        try:
            (selection,), pruned = _selections_of(model, inputs)
        finally:
            staprune.unpatch(model)
        ids = inputs["input_ids"][0]
        video = (ids == vl.VID).nonzero().flatten()
        embeds = stock["inputs_embeds"].clone()
        if selection.merged is not None:
            embeds[0, video[selection.kept]] = selection.merged
        keep = torch.ones(ids.shape[0], dtype=torch.bool)
        keep[video] = False
        keep[video[selection.kept]] = True
        reference = {"inputs_embeds": embeds[:, keep], "position_ids": vl.stock_positions(stock)[..., keep],
                     "attention_mask": torch.ones(1, int(keep.sum()), dtype=torch.long)}
        if stock.get("visual_pos_masks") is not None:  # Qwen3-VL DeepStack: the features of kept visual tokens
            visual = stock["visual_pos_masks"]
            reference["visual_pos_masks"] = visual[:, keep]
            reference["deepstack_visual_embeds"] = [e[keep[visual[0]]] for e in stock["deepstack_visual_embeds"]]
        with torch.no_grad():
            expected = model.lm_head(model.model.language_model(**reference).last_hidden_state)
        assert keep.sum() < keep.numel(), name
        torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=1e-5, msg=name)

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
    video_method_names,
)
from staprune.families import VIDEO_LLM, families

LAYOUT = VideoLayout(4, 3, 4, tail=1)  # 4 units of 12 tokens, then a newline


def _video(seed: int = 0, **extra) -> VideoTokens:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(LAYOUT.tokens, 16, generator=g)
    return VideoTokens(tokens, LAYOUT, **extra)


def test_the_built_in_methods_are_registered_in_order():
    assert video_method_names()[:4] == ["sta", "random", "uniform", "static"]


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
    return "first-tokens-test"


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
    with pytest.raises(UsageError, match="a method may need keys, pixel_change, noise"):
        register_video_method(VideoMethod("needs-attention-test", _first_tokens,
                                          needs=lambda config: frozenset({"attention"})))

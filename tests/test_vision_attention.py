"""The attention each video token received in the vision tower (what VisionZip reads, issue 33): for
every video LLM, what a method is handed equals the attention computed from the tower's own modules
(whole maps, in the test only), mapped onto the tokens the language model receives as the features
are; the tap leaves the model's outputs as they were, and unpatch removes it."""

from __future__ import annotations

import sys

import pytest
import torch

import staprune
from staprune.core.errors import ConfigError
from staprune.core.video_methods import VideoMethod, register_video_method, unregister_video_method

transformers = pytest.importorskip("transformers")
import test_video_llms as vl  # noqa: E402

SEEN: list[torch.Tensor] = []


def _record(video, keep, config):
    """A test method: hands back each unit's first tokens and keeps what attention it was given."""
    SEEN.append(video.attention.clone())
    layout = video.layout
    return (torch.arange(layout.units)[:, None] * layout.per_unit + torch.arange(keep)[None]).reshape(-1)


@pytest.fixture(scope="module")
def reads_attention():
    register_video_method(VideoMethod("reads-attention-test", _record, needs=lambda config: frozenset({"attention"})))
    yield "reads-attention-test"
    unregister_video_method("reads-attention-test")


def _given(model, inputs, method) -> torch.Tensor:
    SEEN.clear()
    staprune.patch(model, keep_ratio=0.5, method=method)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        staprune.unpatch(model)
    (attention,) = SEEN
    return attention


def _eager_maps(tower, *args, **kwargs):
    """The tower's attention maps (one per layer), computed whole by its eager implementation."""
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            return tower(*args, output_attentions=True, **kwargs).attentions
    finally:
        tower.config._attn_implementation = "sdpa"


def test_llava_onevision_tokens_get_the_mean_attention_their_pooled_patches_received(reads_attention):
    model = vl.llava()
    inputs = vl.llava_inputs(model)
    pixels = inputs["pixel_values_videos"].flatten(0, 1)
    layer = model.config.vision_feature_layer
    maps = _eager_maps(model.model.vision_tower, pixels)[layer]  # (frames, heads, N, N)
    received = maps.mean(1).mean(1)  # over heads, then over queries: (frames, N)
    pooled = model.model.apply_pooling(received[..., None]).reshape(-1)
    expected = torch.cat([pooled, torch.zeros(1)])  # the newline's place
    torch.testing.assert_close(_given(model, inputs, reads_attention), expected, atol=1e-6, rtol=1e-5)


def test_internvl_tokens_get_the_cls_attention_their_pixel_shuffle_group_received(reads_attention):
    model = vl.internvl()
    inputs = vl.internvl_inputs(model)
    layer = model.config.vision_feature_layer
    maps = _eager_maps(model.model.vision_tower, inputs["pixel_values"])[layer]  # (frames, heads, 1 + N, 1 + N)
    cls_row = maps.mean(1)[:, 0, 1:]  # the [CLS] query's attention over the patches
    frames, patches = cls_row.shape
    side, ratio = int(patches**0.5), 2
    expected = cls_row.view(frames, side // ratio, ratio, side // ratio, ratio).mean((2, 4)).reshape(-1)
    torch.testing.assert_close(_given(model, inputs, reads_attention), expected, atol=1e-6, rtol=1e-5)


def qwen_reference(model, inputs) -> torch.Tensor:
    """The last vision block's attention, from its own qkv and rotary embedding, whole per call the
    block makes (one temporal patch, or one window), heads and queries averaged; then the mean of each
    merged token's patches, in the language model's order."""
    visual = model.model.visual
    block = visual.blocks[-1].attn
    seen = {}
    handle = block.register_forward_pre_hook(lambda m, a, kw: seen.update(kw, hidden=a[0] if a else kw["hidden_states"]),
                                             with_kwargs=True)
    try:
        with torch.no_grad():
            model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    finally:
        handle.remove()
    rotary = sys.modules[type(block).__module__].apply_rotary_pos_emb_vision
    hidden = seen["hidden"]
    q, k, _ = block.qkv(hidden).reshape(hidden.shape[0], 3, block.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = rotary(q, k, *seen["position_embeddings"])
    cu = seen["cu_seqlens"].tolist()
    received = []
    for start, end in zip(cu[:-1], cu[1:], strict=True):
        scores = torch.einsum("qhd,khd->hqk", q[start:end], k[start:end]) * block.scaling
        received.append(scores.softmax(-1).mean(0).mean(0))
    merged = torch.cat(received).view(-1, visual.spatial_merge_size**2).mean(1)
    if hasattr(visual, "window_size"):  # Qwen2.5-VL runs merged tokens in window order
        from staprune.families.video_llms.qwen import _window_index

        merged = merged[torch.argsort(_window_index(visual, inputs["video_grid_thw"]))]
    return merged


@pytest.mark.parametrize("build", [vl.qwen25, vl.qwen3], ids=["qwen2_5_vl", "qwen3_vl"])
def test_qwen_tokens_get_the_mean_attention_their_merged_patches_received(build, reads_attention):
    model = build()
    inputs = vl.qwen_inputs(model)
    torch.testing.assert_close(_given(model, inputs, reads_attention), qwen_reference(model, inputs),
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", list(vl.FAMILIES))
def test_the_tap_changes_no_output_and_unpatch_removes_it(family, reads_attention):
    build, make_inputs = vl.FAMILIES[family]
    model = build()
    inputs = make_inputs(model)
    with torch.no_grad():
        stock_features = model.model.get_video_features(**vl.video_tensors(inputs)) if family != "internvl" else None
    staprune.patch(model, keep_ratio=1.0, method=reads_attention)
    with torch.no_grad():
        tapped = model.model.get_video_features(**vl.video_tensors(inputs)) if family != "internvl" else None
    configs = {id(m.config) for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")}
    staprune.unpatch(model)
    after = {id(m.config) for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")}
    if stock_features is not None:
        for a, b in zip(stock_features.pooler_output, tapped.pooler_output, strict=True):
            assert torch.equal(a, b)
    assert len(configs) == len(after) + 1  # the tapped layer's own config, gone again


@pytest.mark.parametrize("method", ["visionzip", "fastvid"])
def test_a_vision_tower_that_cannot_give_attention_is_one_clear_error(method):
    model = vl.qwen25()
    model.model.visual.config._attn_implementation = "flash_attention_2"
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(ConfigError, match=f"{method} reads attention weights, which attn_implementation='flash_attention_2' does "
                             "not give here; load the model with attn_implementation='sdpa'"):
        staprune.patch(model, keep_ratio=0.25, method=method)
    assert staprune.get_config(model) is None  # nothing left half-patched: no hook, no config of its own
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks

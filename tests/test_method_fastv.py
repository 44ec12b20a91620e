"""FastV inside the language model (issue 33): the kept set is the release's rule (layer K-1's attention,
averaged over heads, the last query's row, one top-k per video), the pruned forward is the stock decoder
layers with the dropped columns removed after layer K, generate equals a no-cache loop over that
sequence, the later layers' KV cache holds only the kept tokens, and bad options are refused."""

from __future__ import annotations

import pytest
import torch

import staprune
from staprune.core.config import STAConfig
from staprune.core.errors import ConfigError
from staprune.core.video_methods import VideoLayout, VideoTokens, select_video_tokens

transformers = pytest.importorskip("transformers")
import test_video_llms as vl  # noqa: E402

K = 1  # the tiny models have two decoder layers: the cut after the first


# --- the rule on hand-made scores ----------------------------------------------------------------------
def released_fastv(attention: torch.Tensor, start: int, length: int, ratio: float) -> torch.Tensor:
    """The release's rule: the image span's scores from the last query's row, ``int(length * (1 - R))``
    of the highest kept; the sequence keeps every column before and after the span, in order."""
    scores = attention[start : start + length]
    top = scores.topk(int(length * (1 - ratio))).indices + start
    keep = torch.cat([torch.arange(start), top, torch.arange(start + length, attention.numel())])
    return keep.sort().values


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("keep_ratio", [0.5, 0.25])
def test_fastv_keeps_the_release_s_top_attended_tokens(seed, keep_ratio):
    layout = VideoLayout(8, 4, 4)
    g = torch.Generator().manual_seed(seed)
    row = torch.rand(5 + layout.body + 3, generator=g)  # text, the video, text: one query's attention
    video = VideoTokens(torch.randn(layout.body, 8, generator=g), layout, attention=row[5 : 5 + layout.body])
    kept = select_video_tokens(video, STAConfig(keep_ratio=keep_ratio, method="fastv")).kept
    released = released_fastv(row, 5, layout.body, 1 - keep_ratio)
    assert torch.equal(kept + 5, released[(released >= 5) & (released < 5 + layout.body)])
    assert kept.numel() == layout.units * round(16 * keep_ratio)


def test_fastv_on_tokens_alone_says_it_needs_the_language_model():
    video = VideoTokens(torch.randn(16, 4), VideoLayout(1, 4, 4))
    with pytest.raises(ConfigError, match="inside the language model"):
        select_video_tokens(video, STAConfig(keep_ratio=0.5, method="fastv"))


# --- the reference: the stock decoder layers, the dropped columns removed after layer K -----------------
def reference_logits(model, stock: dict, keep: torch.Tensor, layer: int) -> torch.Tensor:
    """The stock language model's own layers on its stock inputs, with the columns ``keep`` ``(L,)`` drops
    removed before layer ``layer``; every token at its stock position (Qwen3-VL: DeepStack's features
    added after its layers at the visual columns still there)."""
    lm = model.model.language_model
    hidden = stock["inputs_embeds"]
    positions = vl.stock_positions(stock)
    if positions.dim() == 3 and positions.shape[0] == 4:  # Qwen: text positions, then the three rope axes
        positions = positions[1:]
    cos_sin = lm.rotary_emb(hidden, positions)
    visual, deep = stock.get("visual_pos_masks"), stock.get("deepstack_visual_embeds")
    with torch.no_grad():
        for number, decoder_layer in enumerate(lm.layers):
            if number == layer:
                hidden, cos_sin = hidden[:, keep], tuple(x[:, keep] for x in cos_sin)
                if visual is not None:
                    deep = [e[keep[visual[0]]] for e in deep]
                    visual = visual[:, keep]
            hidden = decoder_layer(hidden, attention_mask=None, position_embeddings=cos_sin)
            if deep is not None and number < len(deep):
                hidden = hidden.clone()
                hidden[visual] += deep[number]
        return model.lm_head(lm.norm(hidden))


def released_kept(model, inputs: dict, layer: int, keep_ratio: float, videos: int = 1) -> list[torch.Tensor]:
    """The kept indices of each video from the stock model's eager attention maps of layer ``layer - 1``."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            maps = model(**inputs, output_attentions=True).attentions[layer - 1]
    finally:
        model.set_attn_implementation("sdpa")
    row = maps.mean(1)[0, -1]
    columns = (inputs["input_ids"][0] == vl.VID).nonzero().flatten()
    per_video = columns.numel() // videos
    kept = []
    for v in range(videos):
        span = columns[v * per_video : (v + 1) * per_video]
        units, per_unit, tail = _layout_of(model, per_video)
        count = units * round(per_unit * keep_ratio)
        scores = row[span[: units * per_unit]]
        chosen = scores.argsort(descending=True, stable=True)[:count].sort().values
        kept.append(torch.cat([chosen, torch.arange(units * per_unit, units * per_unit + tail)]))
    return kept


def _layout_of(model, tokens: int) -> tuple[int, int, int]:
    """(units, tokens per unit, tail) of the tiny test videos (vl's prompts: 4 units)."""
    if isinstance(model, transformers.LlavaOnevisionForConditionalGeneration):
        return 4, (tokens - 1) // 4, 1
    return 4, tokens // 4, 0


@pytest.fixture(scope="module", params=list(vl.FAMILIES))
def family(request):
    build, make_inputs = vl.FAMILIES[request.param]
    model = build()
    yield model, make_inputs(model)
    staprune.unpatch(model)


def _kept_columns(inputs: dict, kept_videos: list[torch.Tensor]) -> torch.Tensor:
    ids = inputs["input_ids"][0]
    columns = (ids == vl.VID).nonzero().flatten()
    keep = torch.ones(ids.shape[0], dtype=torch.bool)
    keep[columns] = False
    start, per_video = 0, columns.numel() // len(kept_videos)
    for kept in kept_videos:
        keep[columns[start:][kept]] = True
        start += per_video
    return keep


def test_fastv_keeps_the_release_s_set_and_is_the_stock_layers_on_it(family):
    model, inputs = family
    staprune.unpatch(model)
    stock = vl.language_model_inputs(model, inputs)
    expected = released_kept(model, inputs, K, 0.25)
    staprune.patch(model, keep_ratio=0.25, method="fastv", fastv_layer=K)
    with torch.no_grad():
        pruned = model(**inputs).logits
    kept = staprune.kept_tokens(model)
    assert [k.tolist() for k in kept] == [k.tolist() for k in expected]
    keep = _kept_columns(inputs, kept)
    assert pruned.shape[1] == int(keep.sum()) < keep.numel()
    staprune.unpatch(model)
    torch.testing.assert_close(pruned, reference_logits(model, stock, keep, K), atol=1e-5, rtol=1e-5)


def test_fastv_at_full_budget_is_the_stock_model(family):
    model, inputs = family
    staprune.unpatch(model)
    with torch.no_grad():
        stock = model(**inputs).logits
    staprune.patch(model, keep_ratio=1.0, method="fastv", fastv_layer=K)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock)


def test_the_later_layers_kv_cache_holds_only_the_kept_tokens(family):
    model, inputs = family
    staprune.patch(model, keep_ratio=0.25, method="fastv", fastv_layer=K)
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).cache
    keep = _kept_columns(inputs, staprune.kept_tokens(model))
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    assert lengths[:K] == [keep.numel()] * K
    assert lengths[K:] == [int(keep.sum())] * (len(lengths) - K)


def _extended(inputs: dict, tokens: list[int]) -> dict:
    """``inputs`` with ``tokens`` appended to the prompt (as generate's sequence so far)."""
    extra = torch.tensor([tokens], dtype=torch.long)
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], dim=1)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
    return out


def test_greedy_generate_equals_a_no_cache_loop_over_the_cut_sequence(family):
    model, inputs = family
    staprune.patch(model, keep_ratio=0.25, method="fastv", fastv_layer=K)
    generated = vl.greedy(model, inputs, steps=4)[0].tolist()
    keep_prompt = _kept_columns(inputs, staprune.kept_tokens(model))
    staprune.unpatch(model)
    expected: list[int] = []
    for _ in range(4):  # each step from scratch: the prompt cut as the prefill cut it, the new tokens whole
        sequence = _extended(inputs, expected)
        stock = vl.language_model_inputs(model, sequence)
        keep = torch.cat([keep_prompt, torch.ones(len(expected), dtype=torch.bool)])
        expected.append(int(reference_logits(model, stock, keep, K)[0, -1].argmax()))
    assert generated == expected


def test_a_batch_of_two_video_lengths_equals_each_alone():
    model = vl.qwen25()
    staprune.patch(model, keep_ratio=0.25, method="fastv", fastv_layer=K)
    long_prompt, short_prompt = vl.qwen_inputs(model, units=(4,), seed=1), vl.qwen_inputs(model, units=(2,), seed=5)
    rows = [long_prompt["input_ids"][0].tolist(), short_prompt["input_ids"][0].tolist()]
    batch = vl._batch(rows, [long_prompt["pixel_values_videos"], short_prompt["pixel_values_videos"]],
                      [long_prompt["video_grid_thw"], short_prompt["video_grid_thw"]])
    with torch.no_grad():
        together = model(**batch).logits[:, -1]
        alone = [model(**p).logits[0, -1] for p in (long_prompt, short_prompt)]
    for row, single in zip(together, alone, strict=True):
        torch.testing.assert_close(row, single, atol=1e-5, rtol=1e-5)
    together_tokens = vl.greedy(model, batch, steps=3)
    for row, prompt in zip(together_tokens, (long_prompt, short_prompt), strict=True):
        assert row.tolist() == vl.greedy(model, prompt, steps=3)[0].tolist()


def test_deepstack_after_the_cut_reaches_only_the_kept_visual_columns():
    """Qwen3-VL adds DeepStack features after its first layers; with the cut before one of them (K=1,
    DeepStack after layers 0 and 1) the features of the kept columns land on them."""
    model = vl.family_named("qwen3_vl").tiny_model(vision_config={
        **vl.family_named("qwen3_vl").tiny_model().config.vision_config.to_dict(), "deepstack_visual_indexes": [0, 1]})
    inputs = vl.qwen_inputs(model)
    stock = vl.language_model_inputs(model, inputs)
    assert len(stock["deepstack_visual_embeds"]) == 2
    staprune.patch(model, keep_ratio=0.25, method="fastv", fastv_layer=K)
    with torch.no_grad():
        pruned = model(**inputs).logits
    keep = _kept_columns(inputs, staprune.kept_tokens(model))
    staprune.unpatch(model)
    torch.testing.assert_close(pruned, reference_logits(model, stock, keep, K), atol=1e-5, rtol=1e-5)


# --- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [0, -1, 1.5, "two"])
def test_a_layer_outside_its_range_is_one_clear_error(layer):
    with pytest.raises(ConfigError, match="fastv_layer=.* is not valid for method='fastv': give an integer >= 1"):
        staprune.patch(vl.qwen25(), keep_ratio=0.25, method="fastv", fastv_layer=layer)


def test_a_layer_at_or_past_the_language_model_s_depth_is_refused():
    with pytest.raises(ConfigError, match="fastv_layer=2 must be between 1 and 1: the language model has 2"):
        staprune.patch(vl.qwen25(), keep_ratio=0.25, method="fastv")


def test_an_attention_implementation_without_weights_is_refused():
    model = vl.qwen25()
    model.model.language_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="load the model with attn_implementation='sdpa'"):
        staprune.patch(model, keep_ratio=0.25, method="fastv", fastv_layer=K)


def test_the_loss_is_the_stock_loss_on_the_kept_columns():
    model = vl.qwen25()
    inputs = vl.qwen_inputs(model)
    labels = inputs["input_ids"].clone()
    stock = vl.language_model_inputs(model, inputs)
    staprune.patch(model, keep_ratio=0.25, method="fastv", fastv_layer=K)
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
    keep = _kept_columns(inputs, staprune.kept_tokens(model))
    staprune.unpatch(model)
    logits = reference_logits(model, stock, keep, K)[0]
    kept_labels = labels[0, keep]
    expected = torch.nn.functional.cross_entropy(logits[:-1], kept_labels[1:])
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_a_batch_of_a_video_row_and_a_text_row_is_each_row_alone(family):
    """The video row is cut after layer K, the text row is not: the cut rows are left-padded again."""
    model, video = family
    text = vl.text_prompt(model)
    batch = vl.prompts(model, [video["input_ids"][0].tolist(), text["input_ids"][0].tolist()],
                       **vl.video_tensors(video))
    staprune.unpatch(model)
    with torch.no_grad():
        stock_text = model(**text).logits[0, -1]
    stock_text_tokens = vl.greedy(model, text)[0]
    staprune.patch(model, keep_ratio=0.25, method="fastv", fastv_layer=K)
    with torch.no_grad():
        video_alone = model(**video).logits[0, -1]
        kept_alone = staprune.kept_tokens(model)[0]
        together = model(**batch).logits[:, -1]
    kept_video, kept_text = staprune.kept_tokens(model)
    assert torch.equal(kept_video, kept_alone) and kept_text.numel() == 0
    torch.testing.assert_close(together[0], video_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[1], stock_text, atol=1e-5, rtol=1e-5)
    tokens = vl.greedy(model, batch)
    assert tokens[0].tolist() == vl.greedy(model, video)[0].tolist()
    assert tokens[1].tolist() == stock_text_tokens.tolist()


def test_rows_of_one_length_that_keep_different_counts_generate_as_each_alone():
    """No padding in the prompts (the stock masks may be None), but the cut pads the row that keeps fewer
    tokens: prefill and every decoding step must mask that padding themselves."""
    model = vl.qwen25()
    staprune.patch(model, keep_ratio=0.25, method="fastv", fastv_layer=K)
    long_prompt, short_prompt = vl.qwen_inputs(model, units=(4,), seed=1), vl.qwen_inputs(model, units=(2,), seed=5)
    rows = [long_prompt["input_ids"][0].tolist(), short_prompt["input_ids"][0].tolist()]
    filler = len(rows[0]) - len(rows[1])
    rows[1] = rows[1][:3] + [26] * filler + rows[1][3:]  # text, so both rows are as long
    short_prompt = vl._batch([rows[1]], [short_prompt["pixel_values_videos"]], [short_prompt["video_grid_thw"]])
    batch = vl._batch(rows, [long_prompt["pixel_values_videos"], short_prompt["pixel_values_videos"]],
                      [long_prompt["video_grid_thw"], short_prompt["video_grid_thw"]])
    assert bool(batch["attention_mask"].all())
    together = vl.greedy(model, batch, steps=3)
    for row, prompt in zip(together, (long_prompt, short_prompt), strict=True):
        assert row.tolist() == vl.greedy(model, prompt, steps=3)[0].tolist()

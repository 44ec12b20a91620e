"""Video LLMs (issue 26): STA on the video tokens of Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision before
the language model. Tiny random models built from each family's config class; prompts are built the
way each processor lays them out (placeholders per video, Qwen3-VL's timestamp between units)."""

from __future__ import annotations

import pytest
import torch

import staprune
from staprune.adapters.video_tokens import videos_of_rows
from staprune.core.errors import ConfigError, UsageError
from staprune.core.video_methods import VideoLayout
from staprune.families import family_named

transformers = pytest.importorskip("transformers")

IMG, VID, VS, VE, PAD = 10, 11, 12, 13, 0
TEXT_BEFORE, TEXT_AFTER = [20, 21, 22], [30, 31]


# --- tiny models and prompts ------------------------------------------------------------------------
def qwen25():
    return family_named("qwen2_5_vl").tiny_model()


def qwen3():
    return family_named("qwen3_vl").tiny_model()


def llava():
    return family_named("llava_onevision").tiny_model()


def internvl():
    return family_named("internvl").tiny_model()


def qwen_video(model, units: int, side: int = 8, seed: int = 1, width: int | None = None):
    """Placeholders and pixels of one video of ``units`` temporal patches on a ``side`` x ``width``
    patch grid (Qwen3-VL: a timestamp token and vision start/end around every unit)."""
    g = torch.Generator().manual_seed(seed)
    patch = model.config.vision_config.patch_size
    width = side if width is None else width
    per_unit = side * width // 4
    if isinstance(model, transformers.Qwen3VLForConditionalGeneration):
        ids = []
        for u in range(units):
            ids += [40 + u, VS] + [VID] * per_unit + [VE]
    else:
        ids = [VS] + [VID] * (units * per_unit) + [VE]
    pixels = torch.randn(units * side * width, 3 * 2 * patch * patch, generator=g)
    return ids, pixels, torch.tensor([[units, side, width]])


def qwen_inputs(model, units=(4,), seed: int = 1, pad_to: int | None = None):
    """One prompt (text, one video per entry of ``units``, text) as the processor returns it."""
    ids, pixels, grids = list(TEXT_BEFORE), [], []
    for i, u in enumerate(units):
        v_ids, v_pix, v_grid = qwen_video(model, u, seed=seed + i)
        ids += v_ids + [25]
        pixels.append(v_pix)
        grids.append(v_grid)
    ids += TEXT_AFTER
    return _batch([ids], pixels, grids)


def _batch(rows: list[list[int]], pixels, grids):
    length = max(map(len, rows))
    input_ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    types = (input_ids == VID).long() * 2 + (input_ids == IMG).long()
    return {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": types,
            "pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.cat(grids)}


def llava_inputs(model, frames: int = 4, videos: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    size = model.config.vision_config.image_size
    per_frame = (size // model.config.vision_config.patch_size + 1) // 2
    per_frame *= per_frame
    ids = list(TEXT_BEFORE)
    for _ in range(videos):
        ids += [VID] * (frames * per_frame + 1) + [25]
    ids += TEXT_AFTER
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "pixel_values_videos": torch.randn(videos, frames, 3, size, size, generator=g)}


IMG_START, IMG_END, NEWLINE, COLON = 14, 15, 16, 45  # InternVL's <img>, </img>, "\n" and the frame labels' ":"


def internvl_frames(model, frames: int, label: int = 50) -> list[int]:
    """One video as InternVL's processor lays it out: per frame "FrameK: <img>", its image-context
    tokens (VID in the tiny model), "</img>" and a newline."""
    per_frame = (model.config.vision_config.image_size[0] // model.config.vision_config.patch_size[0] // 2) ** 2
    ids = []
    for k in range(frames):
        ids += [label + k, COLON, IMG_START] + [VID] * per_frame + [IMG_END, NEWLINE]
    return ids


def internvl_inputs(model, frames: int = 4, videos: int = 1, seed: int = 1):
    """A prompt with ``videos`` videos of ``frames`` frames, each frame one ``pixel_values`` row."""
    g = torch.Generator().manual_seed(seed)
    size = model.config.vision_config.image_size[0]
    ids = list(TEXT_BEFORE)
    for _ in range(videos):
        ids += internvl_frames(model, frames) + [25]
    ids += TEXT_AFTER
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "pixel_values": torch.randn(videos * frames, 3, size, size, generator=g)}


FAMILIES = {"qwen2_5_vl": (qwen25, qwen_inputs), "qwen3_vl": (qwen3, qwen_inputs), "llava_onevision": (llava, llava_inputs),
            "internvl": (internvl, internvl_inputs)}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    build, inputs = FAMILIES[request.param]
    model = build()
    yield model, inputs(model)
    staprune.unpatch(model)


def language_model_inputs(model, inputs) -> dict:
    """The keyword arguments the language model receives for ``inputs`` (after any staprune hook)."""
    seen = {}
    handle = staprune_inner(model).language_model.register_forward_pre_hook(
        lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen


def staprune_inner(model):
    return model.model


def stock_positions(stock: dict) -> torch.Tensor:
    """The positions the stock language model used (LLaVA's forward leaves them to it: 0 .. L-1)."""
    if stock.get("position_ids") is not None:
        return stock["position_ids"]
    return torch.arange(stock["inputs_embeds"].shape[1])[None]


def greedy(model, inputs, steps=4):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, pad_token_id=PAD)
    return out[:, inputs["input_ids"].shape[1]:]


# --- identity at full budget ---------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [{"keep_ratio": 1.0}, {"r": 0}])
def test_full_budget_is_the_stock_model(family, budget):
    model, inputs = family
    staprune.unpatch(model)
    with torch.no_grad():
        stock = model(**inputs).logits
    stock_tokens = greedy(model, inputs)
    staprune.patch(model, **budget)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock)
    assert torch.equal(greedy(model, inputs), stock_tokens)


# --- the pruned forward is the stock language model on the kept tokens ---------------------------------
@pytest.mark.parametrize("options", [{"keep_ratio": 0.5}, {"keep_ratio": 0.3, "similarity": "hidden"},
                                     {"r": 3, "method": "random"}, {"keep_ratio": 0.5, "method": "uniform"},
                                     {"keep_ratio": 0.5, "method": "static"}, {"keep_ratio": 0.3, "method": "evs"},
                                     {"keep_ratio": 0.3, "method": "divprune"}, {"keep_ratio": 0.3, "method": "vidcom2"}])
def test_pruned_forward_is_stock_language_model_on_kept_tokens(family, options):
    model, inputs = family
    staprune.unpatch(model)
    stock = language_model_inputs(model, inputs)
    staprune.patch(model, **options)
    with torch.no_grad():
        pruned = model(**inputs).logits
    kept_videos = staprune.kept_tokens(model)
    video_cols = (inputs["input_ids"][0] == VID).nonzero().flatten()
    keep = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
    keep[video_cols] = False
    start = 0
    for kept in kept_videos:  # each video's own indices, videos in prompt order
        span = video_cols[start:]
        keep[span[kept]] = True
        start += _video_length(model, inputs, len(kept_videos))
    assert keep.sum() == pruned.shape[1] < keep.numel()
    positions = stock_positions(stock)
    reference_kwargs = {"inputs_embeds": stock["inputs_embeds"][:, keep], "position_ids": positions[..., keep],
                        "attention_mask": torch.ones(1, int(keep.sum()), dtype=torch.long)}
    if stock.get("visual_pos_masks") is not None:  # Qwen3-VL DeepStack: the features of kept visual tokens
        visual = stock["visual_pos_masks"]
        reference_kwargs["visual_pos_masks"] = visual[:, keep]
        reference_kwargs["deepstack_visual_embeds"] = [e[keep[visual[0]]] for e in stock["deepstack_visual_embeds"]]
    staprune.unpatch(model)
    with torch.no_grad():
        hidden = model.model.language_model(**reference_kwargs).last_hidden_state
        reference = model.lm_head(hidden)
    torch.testing.assert_close(pruned, reference, atol=1e-5, rtol=1e-5)


def _video_length(model, inputs, videos: int) -> int:
    return int((inputs["input_ids"][0] == VID).sum()) // videos


def test_kept_tokens_per_video_follow_the_budget():
    model = qwen25()
    inputs = qwen_inputs(model, units=(4, 2))
    staprune.patch(model, keep_ratio=0.25)
    with torch.no_grad():
        model(**inputs)
    first, second = staprune.kept_tokens(model)
    assert first.numel() == 4 * 4 and second.numel() == 2 * 4  # 16 tokens per unit, 4 kept
    for kept, units in ((first, 4), (second, 2)):
        assert torch.equal(kept, kept.sort().values) and int(kept.max()) < units * 16
        assert torch.equal(torch.bincount(kept // 16, minlength=units), torch.full((units,), 4))


def test_a_grid_first_unit_spreads_over_the_video_s_own_rows_and_columns():
    """A 8x16-patch video makes 4x8 tokens per unit; a 2x2 grid drops one token per quadrant of them."""
    model = qwen25()
    ids, pixels, grid = qwen_video(model, units=2, side=8, width=16)
    inputs = _batch([TEXT_BEFORE + ids + TEXT_AFTER], [pixels], [grid])
    staprune.patch(model, r=4, first_unit="grid")
    with torch.no_grad():
        model(**inputs)
    kept = staprune.kept_tokens(model)[0]
    dropped = sorted(set(range(32)) - set(kept[kept < 32].tolist()))
    quadrants = sorted((t // 8 // 2, t % 8 // 4) for t in dropped)
    assert quadrants == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_static_keeps_the_tokens_whose_pixels_changed():
    """Qwen: 3 temporal patches of 16 tokens; tokens 3 and 9 change in unit 1, tokens 5 and 12 in unit 2."""
    model = qwen25()
    ids, pixels, grid = qwen_video(model, units=3)
    unit = pixels[:64].clone()  # a token's pixels: 4 consecutive rows (its 2x2 merged patches)
    units = [unit, unit.clone(), None]
    for token in (3, 9):
        units[1][token * 4 : token * 4 + 4] += 1.0
    units[2] = units[1].clone()
    for token in (5, 12):
        units[2][token * 4 : token * 4 + 4] -= 1.0
    inputs = _batch([TEXT_BEFORE + ids + TEXT_AFTER], [torch.cat(units)], [grid])
    staprune.patch(model, r=14, method="static")
    with torch.no_grad():
        model(**inputs)
    assert staprune.kept_tokens(model)[0].tolist() == [3, 9, 16 + 3, 16 + 9, 32 + 5, 32 + 12]


def test_static_on_llava_follows_the_changed_region_of_each_frame():
    model = llava()  # 112 px, 8x8 patches pooled to 4x4 tokens of 28x28 px
    inputs = llava_inputs(model, frames=3)
    frames = inputs["pixel_values_videos"]
    frames[0, 1:] = frames[0, 0]
    frames[0, 1, :, 28:56, 56:84] += 1.0  # token (1, 2) = 6 changes in frame 1
    frames[0, 2] = frames[0, 1]
    frames[0, 2, :, 84:112, 0:28] += 1.0  # token (3, 0) = 12 in frame 2
    staprune.patch(model, r=15, method="static")
    with torch.no_grad():
        model(**inputs)
    assert staprune.kept_tokens(model)[0].tolist() == [6, 16 + 6, 32 + 12, 48]  # 48: the newline


# --- generation -----------------------------------------------------------------------------------------
def test_greedy_generation_equals_a_no_cache_loop_at_stock_positions(family):
    model, inputs = family
    staprune.unpatch(model)
    stock = language_model_inputs(model, inputs)
    staprune.patch(model, keep_ratio=0.5)
    generated = greedy(model, inputs, steps=4)[0]
    with torch.no_grad():
        model(**inputs)
    keep = _keep_mask(model, inputs)
    staprune.unpatch(model)
    tokens = []
    for _ in range(4):
        tokens.append(int(reference_next_logits(model, stock, keep, tokens).argmax(-1)))
    assert generated.tolist() == tokens


def reference_next_logits(model, stock: dict, keep: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """The next token's logits ``(1, V)`` of the stock language model, without a cache, on the prompt's
    ``keep`` columns (the stock language-model inputs ``stock`` of a one-row prompt) and then ``tokens``,
    every one at its stock position (the answer after the prompt's last position, in every M-RoPE row alike)."""
    lm = model.model.language_model
    embeds, positions = stock["inputs_embeds"][:, keep], stock_positions(stock)[..., keep]
    if tokens:
        embeds = torch.cat([embeds, lm.embed_tokens(torch.tensor([tokens]))], dim=1)
        answer = stock_positions(stock)[..., -1:] + torch.arange(1, len(tokens) + 1)
        positions = torch.cat([positions, answer], dim=-1)
    with torch.no_grad():
        hidden = lm(inputs_embeds=embeds, position_ids=positions, use_cache=False,
                    attention_mask=torch.ones(1, embeds.shape[1], dtype=torch.long),
                    **_deepstack(stock, keep, extra=len(tokens))).last_hidden_state
        return model.lm_head(hidden[:, -1])


def _keep_mask(model, inputs) -> torch.Tensor:
    video_cols = (inputs["input_ids"][0] == VID).nonzero().flatten()
    keep = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
    keep[video_cols] = False
    keep[video_cols[staprune.kept_tokens(model)[0]]] = True
    return keep


def _deepstack(stock: dict, keep: torch.Tensor, extra: int = 0) -> dict:
    """Qwen3-VL's DeepStack inputs for the kept columns (and ``extra`` generated, non-visual ones)."""
    if stock.get("visual_pos_masks") is None:
        return {}
    visual = stock["visual_pos_masks"]
    return {"visual_pos_masks": torch.cat([visual[:, keep], visual.new_zeros(1, extra)], dim=1),
            "deepstack_visual_embeds": [e[keep[visual[0]]] for e in stock["deepstack_visual_embeds"]]}


def test_kv_cache_holds_only_kept_tokens():
    model = qwen25()
    inputs = qwen_inputs(model)
    staprune.patch(model, keep_ratio=0.25)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    kept = int(staprune.kept_tokens(model)[0].numel())
    assert out.cache.get_seq_length() == inputs["input_ids"].shape[1] - 64 + kept


# --- batches --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [qwen25, qwen3])
def test_batch_of_two_video_lengths_left_padded_equals_each_alone(build):
    model = build()
    staprune.patch(model, keep_ratio=0.3)
    long_prompt, short_prompt = qwen_inputs(model, units=(4,), seed=1), qwen_inputs(model, units=(2,), seed=5)
    rows = [long_prompt["input_ids"][0].tolist(), short_prompt["input_ids"][0].tolist()]
    batch = _batch(rows, [long_prompt["pixel_values_videos"], short_prompt["pixel_values_videos"]],
                   [long_prompt["video_grid_thw"], short_prompt["video_grid_thw"]])
    with torch.no_grad():
        together = model(**batch).logits[:, -1]
        alone = [model(**p).logits[0, -1] for p in (long_prompt, short_prompt)]
    for row, single in zip(together, alone, strict=True):
        torch.testing.assert_close(row, single, atol=1e-5, rtol=1e-5)
    together_tokens = greedy(model, batch, steps=3)
    for row, p in zip(together_tokens, (long_prompt, short_prompt), strict=True):
        assert row.tolist() == greedy(model, p, steps=3)[0].tolist()


def test_llava_batch_of_two_videos_equals_each_alone():
    model = llava()
    staprune.patch(model, keep_ratio=0.3)
    a, b = llava_inputs(model, seed=1), llava_inputs(model, seed=2)
    batch = {k: torch.cat([a[k], b[k]]) for k in a}
    with torch.no_grad():
        together = model(**batch).logits[:, -1]
        alone = [model(**p).logits[0, -1] for p in (a, b)]
    for row, single in zip(together, alone, strict=True):
        torch.testing.assert_close(row, single, atol=1e-5, rtol=1e-5)


# --- prompts without a video: the stock model ------------------------------------------------------------
def prompts(model, rows: list[list[int]], **vision) -> dict:
    """Left-padded ``rows`` of token ids with the vision tensors of their videos and images (Qwen: and
    the processor's ``mm_token_type_ids``: 2 on video placeholders, 1 on image ones)."""
    length = max(map(len, rows))
    input_ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
    padding = torch.tensor([length - len(r) for r in rows])
    inputs = {"input_ids": input_ids, "attention_mask": (torch.arange(length) >= padding[:, None]).long(), **vision}
    if isinstance(model, (transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen3VLForConditionalGeneration)):
        inputs["mm_token_type_ids"] = (input_ids == VID).long() * 2 + (input_ids == IMG).long()
    return inputs


def text_prompt(model) -> dict:
    return prompts(model, [TEXT_BEFORE + [24, 25, 26] + TEXT_AFTER])


def image_prompt(model) -> dict:
    """A prompt around one image, laid out as each processor does."""
    g = torch.Generator().manual_seed(9)
    if isinstance(model, transformers.InternVLForConditionalGeneration):  # two tiles: one block of their tokens
        size = model.config.vision_config.image_size[0]
        return prompts(model, [TEXT_BEFORE + [IMG_START] + [VID] * 32 + [IMG_END] + TEXT_AFTER],
                       pixel_values=torch.randn(2, 3, size, size, generator=g))
    if isinstance(model, transformers.LlavaOnevisionForConditionalGeneration):
        # One 112 px tile plus the base image: 8x8 base tokens, then 8 rows of 8 tokens and a newline.
        model.config.image_grid_pinpoints = [[112, 112]]
        return prompts(model, [TEXT_BEFORE + [IMG] * (64 + 8 * 9) + TEXT_AFTER],
                       pixel_values=torch.randn(1, 2, 3, 112, 112, generator=g), image_sizes=torch.tensor([[112, 112]]))
    patch = model.config.vision_config.patch_size
    return prompts(model, [TEXT_BEFORE + [VS] + [IMG] * 16 + [VE] + TEXT_AFTER],
                   pixel_values=torch.randn(64, 3 * 2 * patch * patch, generator=g), image_grid_thw=torch.tensor([[1, 8, 8]]))


def video_tensors(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k in ("pixel_values_videos", "video_grid_thw", "pixel_values")}


@pytest.mark.parametrize("kind", [text_prompt, image_prompt])
def test_a_prompt_without_a_video_is_the_stock_model_even_after_a_video(family, kind):
    model, video = family
    inputs = kind(model)
    staprune.unpatch(model)
    with torch.no_grad():
        stock = model(**inputs).logits
    stock_tokens = greedy(model, inputs)
    staprune.patch(model, keep_ratio=0.5)
    greedy(model, video)  # a pruned prompt first: nothing of it may reach the next ones
    with torch.no_grad():
        model(**video)
        assert torch.equal(model(**inputs).logits, stock)
    assert [kept.numel() for kept in staprune.kept_tokens(model)] == [0]  # one row, no video
    assert torch.equal(greedy(model, inputs), stock_tokens)


def test_a_batch_of_a_video_row_and_a_text_row_is_each_row_alone(family):
    model, video = family
    text = text_prompt(model)
    text_ids, video_ids = text["input_ids"][0].tolist(), video["input_ids"][0].tolist()
    batch = prompts(model, [video_ids, text_ids], **video_tensors(video))
    staprune.unpatch(model)
    with torch.no_grad():
        stock_text = model(**text).logits[0]
    stock_text_tokens = greedy(model, text)[0]
    staprune.patch(model, keep_ratio=0.5)
    with torch.no_grad():
        video_alone = model(**video).logits[0]
        kept_alone = staprune.kept_tokens(model)[0]
        together = model(**batch).logits
    kept_video, kept_text = staprune.kept_tokens(model)
    assert torch.equal(kept_video, kept_alone) and kept_text.numel() == 0
    # Rows are left-padded: each row's own columns are its last ones.
    torch.testing.assert_close(together[0, -video_alone.shape[0]:], video_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[1, -stock_text.shape[0]:], stock_text, atol=1e-5, rtol=1e-5)
    tokens = greedy(model, batch)
    assert tokens[0].tolist() == greedy(model, video)[0].tolist()
    assert tokens[1].tolist() == stock_text_tokens.tolist()


def test_direct_language_model_calls_are_the_stock_language_model(family):
    """The language model called on its own, after a pruned prompt, with a prompt's full inputs_embeds."""
    model, video = family
    staprune.unpatch(model)
    seen = language_model_inputs(model, video)
    names = ("inputs_embeds", "position_ids", "attention_mask", "visual_pos_masks", "deepstack_visual_embeds")
    full = {k: seen[k] for k in names if seen.get(k) is not None}
    lm = model.model.language_model
    text = torch.tensor([TEXT_BEFORE + TEXT_AFTER])

    def run() -> list[torch.Tensor]:
        with torch.no_grad():
            prefill = lm(input_ids=text, use_cache=True)
            step = lm(input_ids=torch.tensor([[26]]), cache=prefill.cache, use_cache=True)
            return [lm(**full, use_cache=False).last_hidden_state, prefill.last_hidden_state, step.last_hidden_state]

    stock = run()
    staprune.patch(model, keep_ratio=0.5)
    greedy(model, video)
    with torch.no_grad():
        model(**video)
    for ours, theirs in zip(run(), stock, strict=True):
        assert torch.equal(ours, theirs)


def test_video_features_encoded_once_by_the_patched_model_are_pruned_in_each_prompt():
    """mm_encoder_outputs (what generate passes) made by the patched model; the stock model's are refused."""
    model = qwen25()
    inputs = qwen_inputs(model)
    encode = dict(pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"],
                  return_dict=True)
    without_pixels = {k: v for k, v in inputs.items() if k != "pixel_values_videos"}
    with torch.no_grad():
        stock_features = model.model.get_video_features(**encode)
        staprune.patch(model, keep_ratio=0.5)
        pruned = model(**inputs).logits
        features = model.model.get_video_features(**encode)
        for _ in range(2):
            torch.testing.assert_close(model(**without_pixels, mm_encoder_outputs={"video": features}).logits, pruned)
        with pytest.raises(UsageError, match="mm_encoder_outputs made by the patched model"):
            model(**without_pixels, mm_encoder_outputs={"video": stock_features})


# --- beam search and several sequences ------------------------------------------------------------------
def test_beam_search_is_stock_beam_search_on_the_kept_tokens(family):
    """Every beam prunes the single sequence's tokens; the beams are those of a beam search (two beams,
    no end token: the tiny models' is outside the vocabulary) with the stock language model on them."""
    model, inputs = family
    staprune.unpatch(model)
    stock = language_model_inputs(model, inputs)
    staprune.patch(model, keep_ratio=0.5)
    with torch.no_grad():
        model(**inputs)
        single = staprune.kept_tokens(model)[0]
        out = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False,
                             pad_token_id=PAD, return_dict_in_generate=True, output_scores=True)
    beams = [kept.tolist() for kept in staprune.kept_tokens(model)]
    assert beams == [single.tolist()] * 2
    keep = _keep_mask(model, inputs)
    staprune.unpatch(model)
    hypotheses = [([], 0.0)]
    for _ in range(3):
        candidates = []
        for tokens, score in hypotheses:
            logprobs = reference_next_logits(model, stock, keep, tokens)[0].log_softmax(-1)
            best = logprobs.topk(2)
            candidates += [(tokens + [int(t)], score + float(v)) for v, t in zip(best.values, best.indices, strict=True)]
        hypotheses = sorted(candidates, key=lambda c: -c[1])[:2]
    generated = out.sequences[:, inputs["input_ids"].shape[1]:]
    assert generated.tolist() == [tokens for tokens, _ in hypotheses]
    # A beam's score: its summed log-probabilities over its length (length_penalty 1).
    torch.testing.assert_close(out.sequences_scores, torch.tensor([score / 3 for _, score in hypotheses]),
                               atol=1e-5, rtol=1e-5)


def test_each_sampled_sequence_prunes_what_one_sequence_prunes(family):
    model, inputs = family
    staprune.patch(model, keep_ratio=0.5)
    with torch.no_grad():
        model(**inputs)
    single = staprune.kept_tokens(model)[0]
    one = greedy(model, inputs, steps=3)[0]
    torch.manual_seed(0)
    with torch.no_grad():
        sampled = model.generate(**inputs, max_new_tokens=3, do_sample=True, num_return_sequences=2, pad_token_id=PAD)
    assert sampled.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert [kept.tolist() for kept in staprune.kept_tokens(model)] == [single.tolist()] * 2
    with torch.no_grad():  # top_k=1 samples the greedy token: each returned row decodes the pruned prompt alone
        narrow = model.generate(**inputs, max_new_tokens=3, do_sample=True, top_k=1, num_return_sequences=2,
                                pad_token_id=PAD)
    assert narrow[:, inputs["input_ids"].shape[1]:].tolist() == [one.tolist()] * 2


# --- what is not a video stays ---------------------------------------------------------------------------
def test_an_image_in_the_prompt_reaches_the_language_model_untouched():
    model = qwen25()
    video = qwen_inputs(model)
    g = torch.Generator().manual_seed(9)
    patch = model.config.vision_config.patch_size
    image_ids = [VS] + [IMG] * 16 + [VE]
    ids = video["input_ids"][0].tolist()
    inputs = _batch([ids[:2] + image_ids + ids[2:]], [video["pixel_values_videos"]], [video["video_grid_thw"]])
    inputs["pixel_values"] = torch.randn(64, 3 * 2 * patch * patch, generator=g)
    inputs["image_grid_thw"] = torch.tensor([[1, 8, 8]])
    stock = language_model_inputs(model, inputs)
    staprune.patch(model, keep_ratio=0.25)
    pruned = language_model_inputs(model, inputs)
    stock_ids, image = inputs["input_ids"][0], inputs["input_ids"][0] == IMG
    kept_ids = stock_ids[_keep_mask(model, inputs)]
    assert torch.equal(kept_ids[kept_ids != VID], stock_ids[stock_ids != VID])  # text, image, specials all stay
    pruned_image = pruned["inputs_embeds"][0][kept_ids == IMG]
    assert torch.equal(pruned_image, stock["inputs_embeds"][0][image])
    assert torch.equal(pruned["position_ids"][..., kept_ids == IMG], stock["position_ids"][..., image])


def test_llava_newline_stays_and_renumbered_positions_are_consecutive():
    model = llava()
    inputs = llava_inputs(model, videos=2)
    staprune.patch(model, keep_ratio=0.3, positions="renumbered")
    seen = language_model_inputs(model, inputs)
    for kept in staprune.kept_tokens(model):
        assert int(kept[-1]) == 4 * 16  # the newline after the video's 4 frames of 16 tokens
    assert torch.equal(seen["position_ids"][0], torch.arange(seen["inputs_embeds"].shape[1]))
    assert greedy(model, inputs, steps=3).shape == (1, 3)
    staprune.patch(model, keep_ratio=0.3)  # original positions: the stock ones, with gaps
    seen = language_model_inputs(model, inputs)
    assert int(seen["position_ids"][0, -1]) == inputs["input_ids"].shape[1] - 1


# --- training and unpatch -------------------------------------------------------------------------------
def test_gradients_reach_the_vision_tower_through_kept_tokens():
    model = qwen25().train()
    staprune.patch(model, keep_ratio=0.5)
    model(**qwen_inputs(model)).logits.sum().backward()
    grads = [p.grad for p in model.model.visual.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def _labels(inputs) -> torch.Tensor:
    """Training labels as processors' collators make them: the text, -100 on video placeholders and padding."""
    labels = inputs["input_ids"].clone()
    labels[(labels == VID) | (inputs["attention_mask"] == 0)] = -100
    return labels


@pytest.mark.parametrize("build", [qwen25, llava])
def test_the_loss_is_the_stock_loss_on_the_kept_columns(build):
    model = build()
    inputs = qwen_inputs(model) if build is qwen25 else llava_inputs(model)
    labels = _labels(inputs)
    staprune.patch(model, keep_ratio=0.3)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    keep = _keep_mask(model, inputs)
    kept_labels = labels[:, keep]
    assert out.logits.shape[1] == kept_labels.shape[1] < labels.shape[1]
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], kept_labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_lora_adapters_train_through_a_pruned_model():
    """LoRA as adapter libraries add it: a trainable low-rank branch beside frozen linear layers."""

    class LoRA(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear, rank: int = 4):
            super().__init__()
            self.base = base
            self.down = torch.nn.Linear(base.in_features, rank, bias=False)
            self.up = torch.nn.Linear(rank, base.out_features, bias=False)
            torch.nn.init.zeros_(self.up.weight)

        def forward(self, x):
            return self.base(x) + self.up(self.down(x))

    model = qwen25().train()
    model.requires_grad_(False)
    for layer in model.model.language_model.layers:
        layer.self_attn.q_proj = LoRA(layer.self_attn.q_proj)
        layer.self_attn.v_proj = LoRA(layer.self_attn.v_proj)
    staprune.patch(model, keep_ratio=0.5)
    inputs = qwen_inputs(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    losses = []
    for _ in range(3):
        loss = model(**inputs, labels=_labels(inputs)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in model.model.visual.parameters())


def test_unpatch_restores_the_stock_model():
    model = qwen25()
    inputs = qwen_inputs(model)
    with torch.no_grad():
        stock = model(**inputs).logits
    staprune.patch(model, keep_ratio=0.3)
    staprune.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock)
    assert "get_video_features" not in model.model.__dict__


# --- bad input: one clear error ---------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, True])
def test_keep_ratio_outside_zero_one_is_refused(ratio):
    with pytest.raises(ConfigError, match="keep_ratio"):
        staprune.patch(qwen25(), keep_ratio=ratio)


def test_a_budget_that_empties_a_unit_is_refused():
    model = qwen25()
    inputs = qwen_inputs(model)
    staprune.patch(model, keep_ratio=0.01)
    with pytest.raises(ConfigError, match="keeps no token of a temporal unit of 16 tokens"):
        model(**inputs)
    staprune.patch(model, r=16)
    with pytest.raises(ConfigError, match="drops every token"):
        model(**inputs)


def test_inputs_embeds_with_a_video_and_no_input_ids_is_one_clear_error():
    """The placeholders are found by their id: a video encoded by the forward needs its input_ids."""
    model = qwen25()
    inputs = qwen_inputs(model)
    embeds = model.model.get_input_embeddings()(inputs["input_ids"])
    staprune.patch(model, keep_ratio=0.5)
    with pytest.raises(UsageError, match="pass input_ids with pixel_values_videos, not inputs_embeds"), torch.no_grad():
        model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
              pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"])


def test_placeholders_are_matched_to_videos_whole_or_as_copies_of_a_row():
    """generate(num_beams=k) repeats each prompt k times in a row but encodes its videos once."""
    a, b = VideoLayout(2, 2, 2), VideoLayout(1, 2, 2, tail=1)  # 8 and 5 placeholder tokens
    text = [20, 21]

    def ids(*rows):
        return torch.tensor(rows)

    assert videos_of_rows(ids([VID] * 8 + [VID] * 5, text + [PAD] * 11), VID, [a, b]) == [[0, 1], []]
    assert videos_of_rows(ids([PAD] * 5 + [VID] * 8, [PAD] * 8 + [VID] * 5), VID, [a, b]) == [[0], [1]]
    video_row, text_row = [VID] * 8 + text, [PAD] * 8 + text
    assert videos_of_rows(ids(video_row, video_row, text_row, text_row), VID, [a]) == [[0], [0], [], []]
    assert videos_of_rows(ids(*[[VID] * 13] * 3), VID, [a, b]) == [[0, 1]] * 3
    for rows, layouts in (
        (ids([VID] * 8 + text, text + [VID] * 8), [a]),  # twice the placeholders, rows that are not copies
        (ids([VID] * 12), [a]),  # 1.5 videos
        (ids([VID] * 4 + text, [VID] * 4 + text), [a]),  # a video split over two rows
        (ids([PAD] * 8 + [VID] * 5, [PAD] * 5 + [VID] * 8), [a, b]),  # the videos' rows in another order
    ):
        with pytest.raises(UsageError, match="video placeholder tokens"):
            videos_of_rows(rows, VID, layouts)


def test_options_that_do_not_apply_are_refused():
    with pytest.raises(UsageError, match="needs a budget"):
        staprune.patch(qwen25())
    with pytest.raises(ConfigError, match="renumbered"):
        staprune.patch(qwen25(), keep_ratio=0.5, positions="renumbered")
    with pytest.raises(ConfigError, match="not both"):
        staprune.patch(qwen25(), keep_ratio=0.5, r=2)
    with pytest.raises(ConfigError, match="tome"):
        staprune.patch(qwen25(), keep_ratio=0.5, method="tome")


@pytest.mark.parametrize("option", [{"schedule": "constant"}, {"schedule": [(2, 4)]}, {"locations": [0]},
                                    {"tome_mode": "every_block"}, {"similarity": "query"}, {"similarity": "value"}])
def test_classifier_options_are_refused_not_ignored(option):
    """A video's tokens are chosen once before the language model: stages and block locations mean
    nothing, and its tokens are compared by keys or by what the language model receives."""
    name = next(iter(option))
    with pytest.raises(ConfigError, match=f"^{name}\\b.*does not apply to Qwen2.5-VL"):
        staprune.patch(qwen25(), keep_ratio=0.5, **option)


def test_video_llm_options_are_refused_by_video_classifiers():
    from conftest import tiny_videomae

    with pytest.raises(ConfigError, match="keep_ratio"):
        staprune.patch(tiny_videomae(), keep_ratio=0.5)
    for method in ("uniform", "static"):
        with pytest.raises(ConfigError, match=method):
            staprune.patch(tiny_videomae(), r=4, method=method)


# --- InternVL: frames sent as images ----------------------------------------------------------------
def test_internvl_batch_of_two_frame_counts_left_padded_equals_each_alone():
    model = internvl()
    staprune.patch(model, keep_ratio=0.3)
    long_prompt, short_prompt = internvl_inputs(model, frames=4, seed=1), internvl_inputs(model, frames=2, seed=5)
    rows = [long_prompt["input_ids"][0].tolist(), short_prompt["input_ids"][0].tolist()]
    batch = prompts(model, rows, pixel_values=torch.cat([long_prompt["pixel_values"], short_prompt["pixel_values"]]))
    with torch.no_grad():
        together = model(**batch).logits[:, -1]
        kept_together = staprune.kept_tokens(model)
        alone = []
        for p in (long_prompt, short_prompt):
            alone.append(model(**p).logits[0, -1])
            assert torch.equal(staprune.kept_tokens(model)[0], kept_together[len(alone) - 1])
    assert [k.numel() for k in kept_together] == [4 * 5, 2 * 5]  # 16 tokens a frame, 5 kept
    for row, single in zip(together, alone, strict=True):
        torch.testing.assert_close(row, single, atol=1e-5, rtol=1e-5)
    together_tokens = greedy(model, batch, steps=3)
    for row, p in zip(together_tokens, (long_prompt, short_prompt), strict=True):
        assert row.tolist() == greedy(model, p, steps=3)[0].tolist()


@pytest.mark.parametrize("image", ["tiled", "one tile, then the question"])
def test_internvl_an_image_in_the_prompt_stays_whole(image):
    """An image of two tiles (one block of their tokens) before the video, or of one tile followed by
    more text than separates two frames: its tokens reach the language model as in the stock model."""
    model = internvl()
    video = internvl_inputs(model, frames=3)
    size = model.config.vision_config.image_size[0]
    tiles = 2 if image == "tiled" else 1
    question = [60 + i for i in range(14)] if tiles == 1 else []
    image_ids = [IMG_START] + [VID] * (16 * tiles) + [IMG_END, NEWLINE] + question
    ids = video["input_ids"][0].tolist()
    pixels = torch.randn(tiles, 3, size, size, generator=torch.Generator().manual_seed(9))
    inputs = prompts(model, [ids[:2] + image_ids + ids[2:]], pixel_values=torch.cat([pixels, video["pixel_values"]]))
    stock = language_model_inputs(model, inputs)
    staprune.patch(model, keep_ratio=0.25)
    pruned = language_model_inputs(model, inputs)
    (kept,) = staprune.kept_tokens(model)
    staprune.unpatch(model)
    stock_ids = inputs["input_ids"][0]
    image_columns = torch.arange(2 + 1, 2 + 1 + 16 * tiles)  # after two text tokens and <img>
    assert torch.equal(stock_ids[image_columns], torch.full((16 * tiles,), VID))
    frames = (stock_ids == VID).nonzero().flatten()[16 * tiles:]  # the video's context tokens
    assert kept.numel() == 3 * 4 and int(kept.max()) < frames.numel()
    keep = torch.ones(stock_ids.shape[0], dtype=torch.bool)
    keep[frames] = False
    keep[frames[kept]] = True
    assert torch.equal(pruned["inputs_embeds"][0], stock["inputs_embeds"][0][keep])
    assert torch.equal(pruned["inputs_embeds"][0][image_columns], stock["inputs_embeds"][0][image_columns])


def test_internvl_frame_runs_group_one_tile_blocks_close_together():
    from staprune.families.video_llms.internvl import frame_runs

    def spans(*starts: int, length: int = 4) -> list[torch.Tensor]:
        return [torch.arange(s, s + length) for s in starts]

    group = frame_runs(max_gap=5)
    ids = torch.zeros(100, dtype=torch.long)  # only the spans' columns are read
    # Items 0-1: one image of two tiles (contiguous); 2-4: frames 5 tokens apart; 5: an image 20 tokens later.
    assert group(ids, spans(0, 4, 13, 22, 31, 55)) == [[2, 3, 4]]
    assert group(ids, spans(0, 9)) == [[0, 1]]  # a video of two frames
    assert group(ids, spans(0)) == []  # one one-tile block: an image (a video of one frame is not told apart)
    assert group(ids, spans(0, 10)) == []  # 6 tokens apart: two images


def test_internvl_keys_are_the_pixel_shuffle_s_groups_of_the_read_layer():
    """similarity="key": the keys of the vision layer the projector reads, grouped 2x2 as InternVL's
    pixel shuffle groups its features: one row per language-model token."""
    from staprune.adapters.video_tokens import VideoPatch
    from staprune.core.config import STAConfig
    from staprune.families.video_llms.internvl import install_internvit_keys

    model = internvl()
    inner = model.model
    p = VideoPatch(STAConfig(keep_ratio=0.5))
    read = install_internvit_keys(p, inner)
    captured = {}
    layer = inner.vision_tower.encoder.layer[-1].attention
    handle = layer.k_proj.register_forward_hook(lambda m, a, o: captured.update(k=o))
    pixels = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    try:
        p.encoding_video = True
        with torch.no_grad():
            inner.get_image_features(pixel_values=pixels)
        keys = read({"pixel_values": pixels})
    finally:
        p.encoding_video = False
        handle.remove()
        p.undo()
    k = captured["k"][:, 1:].reshape(3, 8, 8, -1)  # 8x8 patches of 14 px, CLS dropped
    grouped = inner.pixel_shuffle(k, 0.5).reshape(3, 16, 4, -1)  # each token's 2x2 patches, as the features
    heads = layer.num_heads
    reference = torch.nn.functional.normalize(grouped.reshape(3, 16, 4, heads, -1).mean(3), dim=-1).mean(2)
    assert keys.shape == (3 * 16, 32 // heads)
    torch.testing.assert_close(keys, reference.reshape(48, -1), atol=1e-6, rtol=1e-5)

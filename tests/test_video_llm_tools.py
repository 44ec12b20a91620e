"""Video LLMs in the commands (issue 26): the registry's published configs, analytic prefill FLOPs held
against FlopCounterMode, example prompts laid out as the transformers processors lay them out, and
``staprune flops`` / ``bench`` / ``visualize`` on tiny saved checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from test_video_llms import internvl, llava, qwen3, qwen25

import staprune
from staprune.core.config import STAConfig
from staprune.core.errors import ConfigError
from staprune.core.flops import measure_flops
from staprune.families import VIDEO_LLM, family_of, family_of_entry, model_entry

transformers = pytest.importorskip("transformers")

# Parameters of the published checkpoints (tied embeddings counted once).
PUBLISHED_PARAMETERS = {
    "Qwen2.5-VL-3B": 3_754_622_976,
    "Qwen2.5-VL-7B": 8_292_166_656,
    "Qwen3-VL-4B": 4_437_815_808,
    "Qwen3-VL-8B": 8_767_123_696,
    "LLaVA-OneVision-0.5B": 893_675_552,
    "LLaVA-OneVision-7B": 8_030_807_584,
    "InternVL3-1B": 938_193_024,  # the hub lists 938M, 2.09B and 7.94B
    "InternVL3-2B": 2_088_957_440,
    "InternVL3-8B": 7_944_373_760,
}
TINY = {"qwen2_5_vl": (qwen25, 4, 112), "qwen3_vl": (qwen3, 4, 128), "llava_onevision": (llava, 3, 112),
        "internvl": (internvl, 3, 112)}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMETERS))
def test_registry_models_have_the_published_shapes(name):
    entry = model_entry(name)
    family = family_of_entry(entry)
    with torch.device("meta"):
        model = family.build(entry.spec_for())
    assert family.kind == VIDEO_LLM and family.recognizes(model)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request):
    build, frames, size = TINY[request.param]
    model = build()
    family = family_of(model)
    spec = family.spec_of(model, frames, size)
    frames = torch.rand(spec.frames, 3, spec.size, spec.size, generator=torch.Generator().manual_seed(0))
    return model, family, spec, family.video_inputs(model, frames, spec)


@pytest.mark.parametrize("options", [{"method": "none"}, {"keep_ratio": 0.5}, {"r": 3},
                                     {"keep_ratio": 0.5, "method": "uniform"}, {"keep_ratio": 0.1, "method": "evs"},
                                     {"keep_ratio": 0.25, "method": "fastv", "method_options": {"fastv_layer": 1}}])
def test_analytic_first_token_flops_are_what_flop_counter_counts(tiny, options):
    model, family, spec, inputs = tiny
    config = STAConfig(**options)
    if config.method != "none":
        staprune.patch(model, config=config)
    try:
        measured = measure_flops(model, dict(inputs, logits_to_keep=1))
    finally:
        staprune.unpatch(model)
    count = family.flops(spec, config)
    assert measured.backbone == count.backbone
    assert inputs["input_ids"].shape[1] == family.prompt_length(spec, family.layout(spec).tokens)


def test_example_prompts_carry_the_pixels_the_processors_make():
    frames = torch.rand(4, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    for build, processor in ((qwen25, transformers.Qwen2VLVideoProcessor), (qwen3, transformers.Qwen3VLVideoProcessor)):
        model = build()
        family = family_of(model)
        size = 112 if build is qwen25 else 128
        clip = torch.nn.functional.interpolate(frames, size=(size, size))
        ours = family.video_inputs(model, clip, family.spec_of(model, 4, size))
        theirs = processor(do_resize=False, do_rescale=False)(videos=[clip], return_tensors="pt", do_sample_frames=False)
        torch.testing.assert_close(ours["pixel_values_videos"], theirs["pixel_values_videos"])
        assert torch.equal(ours["video_grid_thw"], theirs["video_grid_thw"])
    model = llava()
    ours = family_of(model).video_inputs(model, frames, family_of(model).spec_of(model, 4))
    theirs = transformers.LlavaOnevisionVideoProcessor(do_resize=False, do_rescale=False, image_mean=[0.5] * 3,
                                                       image_std=[0.5] * 3)(videos=[frames], return_tensors="pt")
    torch.testing.assert_close(ours["pixel_values_videos"], theirs["pixel_values_videos"])


def test_inputs_a_model_cannot_take_are_refused_with_the_sizes_it_can():
    qwen = model_entry("Qwen2.5-VL-7B")
    with pytest.raises(ConfigError, match="multiple of 2; use 18"):
        qwen.spec_for(17)
    with pytest.raises(ConfigError, match="28-pixel merged patches; use 420 or 448"):
        qwen.spec_for(16, 430)
    with pytest.raises(ConfigError, match="32-pixel merged patches"):
        model_entry("Qwen3-VL-8B").spec_for(16, 448 + 16)
    with pytest.raises(ConfigError, match="384 px"):
        model_entry("LLaVA-OneVision-0.5B").spec_for(16, 448)


# --- commands ------------------------------------------------------------------------------------------
def test_flops_gives_prefill_and_first_token_gflops_per_budget():
    rc, out, err = run_cli("flops", "--model", "Qwen2.5-VL-7B", "--frames", "32", "--json")
    assert rc == 0, err
    rows = {row["setting"]: row for row in json.loads(out)}
    assert list(rows) == ["dense", "keep 0.5", "keep 0.3", "keep 0.15"]
    assert rows["dense"]["video_tokens"] == 16 * 256 and rows["keep 0.5"]["video_tokens"] == 16 * 128
    for row in rows.values():
        assert row["first_token_gflops"] == pytest.approx(row["vision_gflops"] + row["prefill_gflops"], abs=2e-3)
        assert row["vision_gflops"] == rows["dense"]["vision_gflops"]  # pruning happens after the vision tower
    fractions = [row["prefill_fraction_of_dense"] for row in rows.values()]
    assert fractions == sorted(fractions, reverse=True) and 0.45 < rows["keep 0.5"]["prefill_fraction_of_dense"] < 0.5
    rc, out, _ = run_cli("flops", "--model", "LLaVA-OneVision-0.5B", "--keep", "0.3", "--method", "uniform")
    assert rc == 0 and "keep 0.3 uniform" in out and "prefill" in out


@pytest.mark.parametrize("argv, message", [
    (("flops", "--model", "ViT-B", "--keep", "0.3"), "--keep is a video-LLM budget"),
    (("flops", "--model", "Qwen3-VL-4B", "--measured"), "--measured is for the video classifiers"),
    (("flops", "--model", "Qwen3-VL-4B", "--keep", "0.001"), "keeps no token of a temporal unit"),
    (("flops", "--model", "ViT-S", "--method", "static"), "is a video-LLM method"),
])
def test_video_llm_options_where_they_do_not_apply_are_one_line(argv, message):
    rc, out, err = run_cli(*argv)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny checkpoints saved as Hugging Face folders, and a short real video."""
    from staprune.data import write_video

    root = tmp_path_factory.mktemp("video_llms")
    for name, (build, _, _) in TINY.items():
        build().save_pretrained(root / name)
    frames = np.zeros((24, 96, 128, 3), np.uint8)
    for t in range(24):
        frames[t] = (30, 60, 90)
        frames[t, 20:50, 4 * t : 4 * t + 30] = (200, 180, 40)  # a block crossing the frame
    write_video(root / "clip.mp4", frames, fps=8)
    return root


@pytest.mark.parametrize("name", ["qwen2_5_vl", "llava_onevision", "internvl"])  # InternVL's tiny head is tied
def test_a_saved_checkpoint_loads_as_its_family_with_its_weights(saved, name):
    build = TINY[name][0]
    loaded = staprune.load(str(saved / name))
    assert loaded.family.name == name
    reference = build()
    inputs = loaded.family.video_inputs(reference, torch.rand(4, 3, 112, 112), loaded.family.spec_of(reference, 4, 112))
    with torch.no_grad():
        assert torch.equal(loaded.model(**inputs).logits, reference(**inputs).logits)


@pytest.mark.parametrize("name", list(TINY))
def test_bench_times_prefill_and_first_token_with_a_smaller_cache(saved, name):
    _, frames, size = TINY[name]
    rc, out, err = run_cli("bench", "--model", str(saved / name), "--frames", str(frames), "--size", str(size),
                           "--keep", "0.5", "0.25", "--repeats", "1", "--warmup", "0", "--json")
    assert rc == 0, err
    rows = json.loads(out)
    assert [row["setting"] for row in rows] == ["dense", "keep 0.5", "keep 0.25"]
    family = staprune.load(str(saved / name)).family
    model = TINY[name][0]()
    spec = family.spec_of(model, frames, size)
    for row in rows:
        config = STAConfig(method="none") if row["setting"] == "dense" else STAConfig(keep_ratio=float(row["setting"][5:]))
        assert row["prompt_tokens"] == family.prompt_length(spec, family.kept_video_tokens(spec, config))
        assert row["ttft_median_s"] >= row["prefill_median_s"] > 0
    assert rows[0]["kv_cache_mb"] > rows[1]["kv_cache_mb"] > rows[2]["kv_cache_mb"]
    assert rows[2]["prefill_flops_ratio"] > rows[1]["prefill_flops_ratio"] > 1


def test_visualize_draws_each_budget_s_dropped_tokens_white(saved, tmp_path):
    out_png = tmp_path / "kept.png"
    rc, out, err = run_cli("visualize", str(saved / "clip.mp4"), "--model", str(saved / "qwen2_5_vl"), "--frames", "4",
                           "--size", "112", "--keep", "0.5", "0.25", "-o", str(out_png))
    assert rc == 0, err
    assert out_png.is_file() and "kept 16/32 video tokens" in out and "kept 8/32 video tokens" in out

    from staprune.analysis.video_llm import kept_views, sample_video

    loaded = staprune.load(str(saved / "llava_onevision"))
    spec = loaded.family.spec_of(loaded.model, 4)
    video = sample_video(saved / "clip.mp4", spec.frames, spec.size)
    assert video.indices == [3, 9, 15, 21]  # the middle of four equal segments of 24 frames
    views = kept_views(loaded.model, loaded.family, spec, video, [STAConfig(keep_ratio=0.25)])
    layout = loaded.family.layout(spec)
    (view,) = views
    tiles = view.images.reshape(layout.units, layout.rows, 28, layout.cols, 28, 3)  # 112 px: 4 tokens of 28 px
    white = (tiles == 255).all(axis=(2, 4, 5)).sum()
    assert white == layout.units * layout.per_unit - view.kept and view.kept == 4 * 4


def test_keep_on_a_video_classifier_command_is_refused(saved):
    rc, _, err = run_cli("bench", "--model", "ViT-S", "--keep", "0.5", "--frames", "16", "--size", "112")
    assert rc == 2 and "--keep is a video-LLM budget" in err


def test_internvl_example_prompt_carries_the_pixels_its_video_processor_makes():
    """InternVL's frames are ``pixel_values`` rows, normalised with ImageNet's statistics as the
    checkpoints' processors do; each frame one image of 4x4 context tokens between its label text."""
    model = internvl()
    family = family_of(model)
    frames = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    ours = family.video_inputs(model, frames, family.spec_of(model, 3))
    prep = family.preprocessing(112)
    theirs = transformers.InternVLVideoProcessor(do_resize=False, do_rescale=False, image_mean=list(prep.mean),
                                                 image_std=list(prep.std))(videos=[frames], return_tensors="pt")
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values_videos"][0])
    context = (ours["input_ids"][0] == model.config.image_token_id).int()
    runs = torch.diff(torch.cat([torch.tensor([0]), context, torch.tensor([0])])).nonzero().flatten().view(-1, 2)
    assert (runs[:, 1] - runs[:, 0]).tolist() == [16, 16, 16]  # one run of a frame's tokens per frame


def test_visualize_draws_several_methods_side_by_side(saved, tmp_path):
    out_png = tmp_path / "methods.png"
    rc, out, err = run_cli("visualize", str(saved / "clip.mp4"), "--model", str(saved / "qwen2_5_vl"), "--frames", "4",
                           "--size", "112", "--keep", "0.25", "--method", "sta", "evs", "fastv", "visionzip",
                           "--method-option", "fastv_layer=1", "-o", str(out_png))
    assert rc == 0, err
    titles = [line.strip() for line in out.splitlines() if "kept" in line]
    assert [t.split(":")[0] for t in titles] == ["sta keep 0.25", "evs keep 0.25", "fastv keep 0.25", "visionzip keep 0.25"]
    assert all("kept 8/32 video tokens" in t for t in titles)

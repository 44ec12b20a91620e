"""staprune.analysis: trajectory sum (Eq. 6), GradNorm (Eq. 7), kept-token pictures and the two CLIs.

Models are tiny random-weight VideoMAEs / Video Swins; videos are encoded here with write_video.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from PIL import Image

import staprune
from staprune.analysis.backbones import describe
from staprune.analysis.gradnorm import gradnorm, mass_fraction, random_mass_fraction
from staprune.analysis.inputs import AnalysisModel, Clip, at_input, clip_indices, read_clip
from staprune.analysis.redundancy import clip_trajectory_sums, trajectory_sum
from staprune.analysis.visualize import (
    default_tile_side,
    grid_size,
    kept_mask,
    mask_dropped,
    render_grid,
    save_png,
    tile_origin,
)
from staprune.api.loading import load
from staprune.commands import analyze as analyze_cli
from staprune.commands import visualize as visualize_cli
from staprune.data import Preprocessing, write_video

SIZE, FRAMES = 64, 8  # tiny ViT: 4 tubelet-frames of 4x4 tokens
# VideoMAE's tiny model at that clip, 3 blocks of width 32.
TINY_VIT = dict(frames=FRAMES, size=SIZE, layers=3, hidden=32, heads=2, intermediate_size=64, num_classes=5)


def _moving_square_video(path, frames: int = 24, height: int = 64, width: int = 80, seed: int = 0):
    """A textured background (values <= 200, never white) with a square moving to the right."""
    g = np.random.default_rng(seed)
    background = g.integers(20, 200, size=(height // 8, width // 8, 3)).repeat(8, 0).repeat(8, 1)
    video = np.repeat(background[None], frames, axis=0).astype(np.uint8)
    for t in range(frames):
        video[t, 20:40, 2 * t : 2 * t + 20] = (190, 30, 30)
    return write_video(path, video)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    model_dir = root / "tiny-vit"
    tiny_model("videomae", **TINY_VIT).save_pretrained(model_dir)
    videos = [_moving_square_video(root / f"clip{i}.mp4", seed=i) for i in range(2)]
    (root / "list.txt").write_text("".join(f"{v} {i}\n" for i, v in enumerate(videos)))
    return {"root": root, "model": str(model_dir), "videos": videos, "list": root / "list.txt"}


def _parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


# --- trajectory sum -------------------------------------------------------------------------------
def test_identical_frames_give_nt_minus_one():
    frame = torch.randn(6, 16)
    for n_t in (2, 5, 8):
        assert trajectory_sum([frame] * n_t) == pytest.approx(n_t - 1, abs=1e-9)
    # Through the batched path too: a dense clip whose every frame holds the same tokens.
    tokens = frame.repeat(4, 1)[None]  # (1, 4 * 6, 16)
    assert clip_trajectory_sums(tokens, None, 4, 6).item() == pytest.approx(3.0, abs=1e-9)


def test_two_frame_case_by_hand():
    earlier = torch.tensor([[3.0, 0.0], [-1.0, 1.0], [0.0, -1.0]])
    last = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # Probe = last frame. (1,0): best match (3,0), cos 1.  (0,2): best (-1,1), cos 1/sqrt2.  Mean of 2.
    assert trajectory_sum([earlier, last]) == pytest.approx((1 + 1 / math.sqrt(2)) / 2, abs=1e-12)
    # Reversed, the probe has 3 tokens: (3,0) -> 1, (-1,1) -> 1/sqrt2, (0,-1) -> max(0, -1) = 0.
    assert trajectory_sum([last, earlier]) == pytest.approx((1 + 1 / math.sqrt(2)) / 3, abs=1e-12)


def test_pruned_tokens_are_grouped_by_original_frame():
    g = torch.Generator().manual_seed(0)
    n, d = 4, 8
    frames = [torch.randn(n, d, generator=g) for _ in range(3)]
    keep = {0: [1, 3], 1: [0, 1, 2], 2: [2]}  # kept spatial positions per frame
    source = torch.tensor([t * n + s for t in (2, 0, 1) for s in keep[t]])  # shuffled frame order
    tokens = torch.stack([frames[i // n][i % n] for i in source.tolist()])
    got = clip_trajectory_sums(tokens[None], source[None], 3, n).item()
    want = trajectory_sum([frames[t][keep[t]] for t in range(3)])
    assert got == pytest.approx(want, abs=1e-12)
    # An emptied earlier frame contributes 0; an emptied last frame gives NaN.
    assert trajectory_sum([torch.empty(0, d), frames[1], frames[1]]) == pytest.approx(1.0, abs=1e-9)
    assert math.isnan(trajectory_sum([frames[0], torch.empty(0, d)]))


# --- masks and pictures ---------------------------------------------------------------------------
def test_mask_whites_exactly_the_dropped_patches(tmp_path):
    g = np.random.default_rng(0)
    images = g.integers(0, 255, size=(2, 32, 48, 3), dtype=np.uint8)  # 0..254: never white
    kept = torch.tensor([0, 4, 5, 7, 11])  # grid 2 frames x 2 x 3 tokens of 16 px
    mask = kept_mask(kept, 2, 2, 3)
    assert mask.sum() == 5 and mask[0, 0, 0] and mask[0, 1, 1] and mask[1, 0, 1] and mask[1, 1, 2]
    out = mask_dropped(images, mask, 16)
    white = (out == 255).all(-1)
    expected = np.zeros_like(white)
    for t, row, col in [(t, r, c) for t in range(2) for r in range(2) for c in range(3)]:
        if not mask[t, row, col]:
            expected[t, 16 * row : 16 * row + 16, 16 * col : 16 * col + 16] = True
    np.testing.assert_array_equal(white, expected)
    np.testing.assert_array_equal(out[~white], images[~white])  # kept pixels untouched
    # The rendered grid copies tiles pixel for pixel: read the PNG back.
    picture = render_grid([list(images), list(out)], ["input", "masked"], ["a", "b"])
    path = save_png(picture, tmp_path / "grid.png")
    read = np.asarray(Image.open(path).convert("RGB"))
    assert read.shape == (*grid_size(2, 2, 32, 48, header=True), 3)
    for t in range(2):
        y, x = tile_origin(1, t, 32, 48, header=True)
        np.testing.assert_array_equal(read[y : y + 32, x : x + 48], out[t])


def test_mask_rejects_out_of_grid_indices():
    with pytest.raises(ValueError):
        kept_mask(torch.tensor([0, 12]), 2, 2, 3)


def test_stage_pictures_match_kept_tokens(assets):
    loaded = at_input(load(str(assets["model"])))
    clip = read_clip(assets["videos"][0], loaded)
    assert clip.x.shape == (1, FRAMES, 3, SIZE, SIZE) and clip.display.shape == (FRAMES, SIZE, SIZE, 3)
    views = visualize_cli.stage_views(loaded.model, loaded.backbone, clip, r=4)
    # Independent run of the same model and input: the drawn masks must be kept_tokens, exactly.
    staprune.patch(loaded.model, r=4)
    with torch.no_grad():
        loaded.model(clip.x)
    kept = staprune.kept_tokens(loaded.model)
    staprune.unpatch(loaded.model)
    assert len(views) == len(kept) == 3
    images = clip.tubelet_images(2)
    for view, indices in zip(views, kept, strict=True):
        white = (view.images == 255).all(-1)  # (4, 64, 64)
        dropped = torch.ones(4 * 16, dtype=torch.bool)
        dropped[indices[0]] = False
        expected = dropped.view(4, 4, 4).numpy().repeat(16, 1).repeat(16, 2)
        np.testing.assert_array_equal(white, expected)
        np.testing.assert_array_equal(view.images[~white], images[~white])
        assert view.kept == indices.shape[1]


def test_visualize_cli_png_and_gif(assets, tmp_path, capsys):
    png, gif = tmp_path / "vis.png", tmp_path / "vis.gif"
    argv = [
        str(assets["videos"][1]),
        "--model",
        assets["model"],
        "--r",
        "4",
        "-o",
        str(png),
        "--gif",
        str(gif),
    ]
    assert visualize_cli.run(_parse(visualize_cli, argv)) == 0
    assert "after stage 3" in capsys.readouterr().out
    image = np.asarray(Image.open(png))
    tile = default_tile_side(SIZE, 4)
    assert tile == 192  # 64 px enlarged 3x for legible labels
    assert image.shape[:2] == grid_size(4, 4, tile, tile, header=True)  # input + 3 stages, 4 tubelet-frames
    with Image.open(gif) as anim:
        assert anim.format == "GIF" and anim.n_frames == 4
        assert anim.size[::-1] == grid_size(1, 4, tile, tile, header=True)
    from staprune.cli import main

    assert main(["visualize", str(assets["videos"][1]), "--model", assets["model"], "--r", "99", "-o", str(png),
                 "--force"]) == 2
    assert "too large" in capsys.readouterr().err  # r too large: a message, not a traceback


def test_tome_masks_non_representatives(assets):
    loaded = at_input(load(str(assets["model"])))
    clip = read_clip(assets["videos"][0], loaded)
    views = visualize_cli.stage_views(loaded.model, loaded.backbone, clip, r=4, method="tome")
    counts = [v.kept for v in views]
    assert counts == sorted(counts, reverse=True) and counts[-1] < 64


def test_swin_stages_drawn_at_their_own_resolution():
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    torch.manual_seed(0)
    model = SwinTransformer3d(
        patch_size=[2, 4, 4], embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=[2, 4, 4]
    ).eval()
    backbone = describe(model, frames=4, size=64)
    assert [(g.height, g.pixels) for g in backbone.grids] == [(16, 4), (8, 8), (4, 16), (2, 32)]
    from staprune.families.swin3d import FAMILY as SWIN

    loaded = AnalysisModel(SWIN.wrap(model, "tiny swin"), backbone, Preprocessing.imagenet_default(64))
    display = np.full((4, 64, 64, 3), 100, dtype=np.uint8)
    x = backbone.model_input(torch.randn(1, 4, 3, 64, 64))
    clip = Clip(path=Path("synthetic.mp4"), indices=[0, 1, 2, 3], display=display, x=x)
    views = visualize_cli.stage_views(model, backbone, clip, r=16)
    assert len(views) == 3
    for view, grid in zip(views, backbone.grids[1:], strict=True):
        white = (view.images == 255).all(-1)[:, :: grid.pixels, :: grid.pixels]  # one pixel per token
        assert white.shape == (2, grid.height, grid.width)
        assert int((~white).sum()) == view.kept < view.total == 2 * grid.height * grid.width
    sums = analyze_cli.trajectory_sums(loaded, x, "sta", 16)
    assert sums.shape == (1,) and -1.0 <= sums.item() <= 1.0  # 2 temporal positions: max 1


# --- sampling ----------------------------------------------------------------------------------------
def test_clip_is_the_protocols_centre_clip(assets):
    loaded = at_input(load(str(assets["model"])))
    # ViT K400: 8 frames at stride 4 span 32 > 24 frames: starts at 0, clamps at the end.
    assert clip_indices(24, loaded) == [0, 4, 8, 12, 16, 20, 23, 23]
    assert clip_indices(100, loaded) == [34 + 4 * j for j in range(8)]


def test_demo_models_read_the_consecutive_frames_they_were_trained_on(assets, tmp_path):
    """A demo model reads the centre 16 consecutive frames of a video under either protocol (it was
    trained on 16-frame clips at one frame per step), not K400's stride 4 (64 frames) or SSV2's
    segments spread over the video; other models keep their protocol."""
    from staprune.demo.data import generate

    clips, _ = generate(1, seed=3)
    short = write_video(tmp_path / "demo.mp4", clips[0].permute(0, 2, 3, 1).contiguous())
    long = write_video(tmp_path / "long.mp4", clips[0].repeat(7, 1, 1, 1)[:100].permute(0, 2, 3, 1).contiguous())
    for name in ("demo-vit", "demo-swin"):
        loaded = at_input(load(name))
        for dataset in (None, "k400", "ssv2"):
            assert read_clip(short, loaded, dataset).indices == list(range(16))
            assert read_clip(long, loaded, dataset).indices == list(range(42, 58))
    other = at_input(load(str(assets["model"])))
    assert read_clip(long, other, "k400").indices == [34 + 4 * j for j in range(8)]


# --- GradNorm ---------------------------------------------------------------------------------------
def test_gradnorm_matches_autograd_on_hidden_states():
    model = tiny_model("videomae", 3, **TINY_VIT)
    backbone = describe(model)
    x = torch.randn(2, FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    heat = gradnorm(model, backbone, x)
    assert heat.shape == (2, 4, 4, 4)
    # Independent: HF's hidden_states (embeddings, then every block's output), grads via backward.
    out = model(x, output_hidden_states=True)
    states = out.hidden_states[1:]
    for s in states:
        s.retain_grad()
    torch.nn.functional.cross_entropy(out.logits, out.logits.argmax(-1), reduction="sum").backward()
    manual = sum(s.grad.abs().sum(-1) for s in states).view(2, 4, 4, 4).double()
    torch.testing.assert_close(heat, manual, rtol=1e-5, atol=1e-9)


def test_mass_fractions():
    heat = torch.zeros(2, 3, 3, dtype=torch.float64)
    heat[0, 1, 1], heat[1, 0, 0] = 3.0, 1.0
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    mask[0, 1, 1] = True
    assert mass_fraction(heat, mask) == pytest.approx(0.75)
    mean, std = random_mass_fraction(torch.ones(2, 3, 3), 6, draws=8)
    assert mean == pytest.approx(6 / 18) and std == pytest.approx(0.0)


def test_analyze_gradnorm_cli(assets, tmp_path, capsys):
    png = tmp_path / "grad.png"
    argv = [
        "gradnorm",
        str(assets["videos"][0]),
        "--model",
        assets["model"],
        "--r",
        "4",
        "-o",
        str(png),
        "--json",
    ]
    assert analyze_cli.run(_parse(analyze_cli, argv)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kept"] == 64 - 4 * 4 - 2 * 4 - 1 * 4  # 4 frames x 16 tokens; 4, 2, 1 units drop r each
    assert 0.0 < report["sta_fraction"] < 1.0 and 0.0 < report["random_fraction_mean"] < 1.0
    assert report["X"] == "block outputs"
    tile = default_tile_side(SIZE, 4)
    assert np.asarray(Image.open(png)).shape[:2] == grid_size(3, 4, tile, tile, header=True)


def test_analyze_redundancy_cli(assets, capsys):
    argv = ["redundancy", "--model", assets["model"], "--r", "4", "--data", str(assets["list"]), "--json"]
    assert analyze_cli.run(_parse(analyze_cli, argv)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max"] == 3 and set(report["results"]) == {"dense", "random", "sta"}
    assert [report["results"][m]["final_tokens"] for m in ("dense", "random", "sta")] == [64, 36, 36]
    for stats in report["results"].values():
        assert stats["clips"] == 2 and len(stats["per_clip"]) == 2
        assert -3.0 <= stats["mean"] <= 3.0 and stats["std"] >= 0.0
    # The same clips, measured directly: the CLI reports the function's numbers.
    loaded = at_input(load(str(assets["model"])))
    x = torch.cat([read_clip(v, loaded).x for v in assets["videos"]])
    direct = analyze_cli.trajectory_sums(loaded, x, "sta", 4).tolist()
    assert report["results"]["sta"]["per_clip"] == pytest.approx(direct, abs=1e-9)

"""Preprocessing: resizing, crops, normalisation, layouts and config loading."""

from __future__ import annotations

import json

import pytest
import torch

from staprune.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    crop,
    make_views,
    normalize,
    resize_short_side,
    to_channels_first_time,
)

ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def solid(t: int, h: int, w: int, rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.uint8).expand(t, h, w, 3).clone()


@pytest.mark.parametrize(
    ("hw", "size", "expected"),
    [((48, 64), 24, (24, 32)), ((64, 48), 32, (43, 32)), ((36, 36), 20, (20, 20)), ((24, 40), 48, (48, 80))],
)
def test_resize_short_side_shapes(hw, size, expected):
    out = resize_short_side(torch.zeros(2, *hw, 3, dtype=torch.uint8), size)
    assert out.dtype == torch.float32 and out.shape == (2, 3, *expected)


def test_resize_keeps_channel_order_and_scale():
    out = resize_short_side(solid(1, 48, 64, (255, 51, 0)), 24)
    torch.testing.assert_close(out[0, :, 5, 7], torch.tensor([1.0, 0.2, 0.0]))
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_resize_identity_when_size_matches():
    frames = torch.randint(0, 256, (2, 24, 40, 3), dtype=torch.uint8)
    out = resize_short_side(frames, 24)
    assert torch.equal(out, frames.permute(0, 3, 1, 2).float() / 255)


def test_resize_is_antialiased():
    # One white column in every four: plain bilinear at 1/4 scale samples only black columns,
    # an antialiased filter averages to ~0.25.
    frames = torch.zeros(1, 32, 64, 3, dtype=torch.uint8)
    frames[:, :, 0::4] = 255
    out = resize_short_side(frames, 8)
    assert out.shape == (1, 3, 8, 16)
    assert out[..., 2:-2].mean().item() == pytest.approx(0.25, abs=0.03)


def test_resize_rejects_wrong_layout():
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        resize_short_side(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="uint8"):
        resize_short_side(torch.zeros(2, 8, 8, 3), 4)


def test_crop():
    x = torch.arange(2 * 3 * 6 * 8, dtype=torch.float32).view(2, 3, 6, 8)
    out = crop(x, (1, 2, 4, 5))
    assert out.shape == (2, 3, 4, 5)
    assert torch.equal(out[0, 0, 0], x[0, 0, 1, 2:7])
    with pytest.raises(ValueError, match="does not fit"):
        crop(x, (3, 0, 4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        crop(x, (0, -1, 2, 2))


def test_normalize_constant_colour():
    x = resize_short_side(solid(2, 8, 8, (255, 128, 0)), 8)
    out = normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    expected = torch.tensor(
        [(1.0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0.0 - 0.406) / 0.225], dtype=torch.float32
    )
    torch.testing.assert_close(out[1, :, 3, 4], expected)
    assert torch.allclose(out, expected.view(3, 1, 1).expand_as(out))
    with pytest.raises(ValueError, match="do not match"):
        normalize(x, (0.5, 0.5), (0.5, 0.5))


def test_make_views_shape_and_normalisation():
    views = make_views(solid(4, 48, 80, (255, 128, 0)), 32, 3, IMAGENET_MEAN, IMAGENET_STD)
    assert views.shape == (3, 4, 3, 32, 32) and views.dtype == torch.float32
    expected = torch.tensor([(1.0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, -0.406 / 0.225])
    torch.testing.assert_close(views, expected.view(1, 1, 3, 1, 1).expand_as(views))


def test_make_views_crop_positions_landscape():
    # 48x80 -> 32x53 after resizing; crops start at columns 0, 10, 21.
    frames = torch.zeros(2, 48, 80, 3, dtype=torch.uint8)
    frames[:, :, :8] = 255  # white band at the far left
    frames[:, :, -8:] = 128  # grey band at the far right
    views = make_views(frames, 32, 3, ZERO, ONE)
    left, centre, right = views
    assert left[..., :4].min() > 0.95 and left[..., -4:].max() < 0.05
    assert centre.max() < 0.05
    assert right[..., -4:].min() > 0.45 and right[..., :4].max() < 0.05
    single = make_views(frames, 32, 1, ZERO, ONE)
    assert single.shape == (1, 2, 3, 32, 32) and torch.equal(single[0], centre)


def test_make_views_crop_positions_portrait():
    frames = torch.zeros(1, 80, 48, 3, dtype=torch.uint8)
    frames[:, :8] = 255  # white band at the top
    top, centre, bottom = make_views(frames, 32, 3, ZERO, ONE)
    assert top[..., :4, :].min() > 0.95
    assert centre.max() < 0.05 and bottom.max() < 0.05


def test_to_channels_first_time():
    x = torch.randn(2, 4, 3, 8, 8)
    y = to_channels_first_time(x)
    assert y.shape == (2, 3, 4, 8, 8)
    assert torch.equal(y[1, :, 2], x[1, 2])
    assert to_channels_first_time(torch.randn(4, 3, 8, 8)).shape == (3, 4, 8, 8)
    with pytest.raises(ValueError):
        to_channels_first_time(torch.randn(3, 8, 8))


VIDEOMAE_CONFIG = {
    "crop_size": {"height": 224, "width": 224},
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "size": {"shortest_edge": 224},
    "image_processor_type": "VideoMAEImageProcessor",
}


def test_from_hf_config_dict_file_and_dir(tmp_path):
    p = Preprocessing.from_hf_processor_config(VIDEOMAE_CONFIG)
    assert p == Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(VIDEOMAE_CONFIG | {"crop_size": 160}))
    assert Preprocessing.from_hf_processor_config(tmp_path).size == 160
    assert Preprocessing.from_hf_processor_config(tmp_path / "preprocessor_config.json").size == 160


def test_from_hf_config_variants():
    no_crop = {k: v for k, v in VIDEOMAE_CONFIG.items() if k != "crop_size"}
    assert Preprocessing.from_hf_processor_config(no_crop | {"size": {"shortest_edge": 192}}).size == 192
    assert Preprocessing.from_hf_processor_config(no_crop | {"size": 128}).size == 128
    custom = Preprocessing.from_hf_processor_config(
        VIDEOMAE_CONFIG | {"image_mean": [0.5] * 3, "image_std": [0.25] * 3}
    )
    assert custom.mean == (0.5, 0.5, 0.5) and custom.std == (0.25, 0.25, 0.25)
    plain = Preprocessing.from_hf_processor_config(VIDEOMAE_CONFIG | {"do_normalize": False})
    assert plain.mean == ZERO and plain.std == ONE


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"crop_size": {"height": 224, "width": 160}}, "not square"),
        ({"crop_size": "big"}, "unsupported crop_size"),
        ({"image_mean": [0.5]}, "neither"),
        ({"crop_size": 224, "image_mean": [0.5, 0.5]}, "3 values"),
    ],
)
def test_from_hf_config_errors(config, match):
    with pytest.raises(ValueError, match=match):
        Preprocessing.from_hf_processor_config(config)


def test_named_presets_and_views():
    assert Preprocessing.imagenet_default(160) == Preprocessing(
        160, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    )
    out = Preprocessing.imagenet_default(32).views(solid(3, 36, 48, (10, 20, 30)), num_crops=3)
    assert out.shape == (3, 3, 3, 32, 32)


def test_kinetics_swin_matches_torchvision_weights():
    # Ground truth: the transform shipped with torchvision's Swin3D Kinetics-400 weights.
    from torchvision.models.video import Swin3D_T_Weights

    reference = Swin3D_T_Weights.KINETICS400_V1.transforms()
    p = Preprocessing.kinetics_swin(224)
    assert p.size == 224
    assert p.mean == pytest.approx(tuple(reference.mean)) and p.std == pytest.approx(tuple(reference.std))

"""The demo's synthetic action generator: determinism, balance, shapes, and recoverable labels."""

from __future__ import annotations

import pytest
import torch

from staprune.demo.data import CLASS_NAMES, NUM_CLASSES, class_names, generate


@pytest.fixture(scope="module")
def small() -> tuple[torch.Tensor, torch.Tensor]:
    return generate(48, seed=11, frames=16, size=112)


def test_shapes_and_dtypes(small):
    clips, labels = small
    assert clips.shape == (48, 16, 3, 112, 112) and clips.dtype == torch.uint8
    assert labels.shape == (48,) and labels.dtype == torch.long
    assert NUM_CLASSES >= 10 and len(class_names) == NUM_CLASSES == len(set(CLASS_NAMES))
    f, _ = generate(2, seed=11, frames=4, size=48, dtype=torch.float32)
    assert f.shape == (2, 4, 3, 48, 48) and 0 <= f.min() and f.max() <= 1


def test_same_seed_same_clips_other_seed_other_clips(small):
    clips, labels = generate(48, seed=11)
    assert torch.equal(clips, small[0]) and torch.equal(labels, small[1])
    other, _ = generate(8, seed=12)
    assert not torch.equal(other, small[0][:8])


def test_classes_balanced(small):
    counts = torch.bincount(small[1], minlength=NUM_CLASSES)
    assert counts.tolist() == [48 // NUM_CLASSES] * NUM_CLASSES


def test_frames_change_but_background_is_temporally_redundant(small):
    # Premise of STA: consecutive frames differ (noise, motion) yet most pixels barely change.
    x = small[0].float() / 255
    diff = (x[:, 1:] - x[:, :-1]).abs().mean(2)  # (N, T-1, H, W)
    assert diff.mean() > 0.005  # noise / motion: never bit-identical
    assert (diff < 0.1).float().mean() > 0.9  # but almost every pixel stays put


def _motion_direction(clips: torch.Tensor) -> torch.Tensor:
    """Trivial detector: centroid of thresholded frame differences, its drift over time -> 0..3."""
    x = clips.float().mean(2)  # (N, T, H, W) grey
    d = (x[:, 1:] - x[:, :-1]).abs()
    d = torch.where(d > 40, d, torch.zeros_like(d))  # keep strong changes (objects), drop sensor noise
    h, w = d.shape[-2:]
    ys = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w)
    mass = d.sum((-2, -1)).clamp_min(1e-6)
    cx, cy = (d * xs).sum((-2, -1)) / mass, (d * ys).sum((-2, -1)) / mass  # (N, T-1)
    t = torch.arange(cx.shape[1], dtype=torch.float32)
    t = t - t.mean()
    sx, sy = (cx * t).sum(1) / (t * t).sum(), (cy * t).sum(1) / (t * t).sum()  # drift slopes
    horizontal = sx.abs() >= sy.abs()
    return torch.where(horizontal, torch.where(sx < 0, 0, 1), torch.where(sy < 0, 2, 3))


def test_translation_labels_recoverable_by_a_trivial_motion_detector(small):
    clips, labels = small
    pick = labels < 4  # move left / right / up / down
    pred = _motion_direction(clips[pick])
    accuracy = (pred == labels[pick]).float().mean().item()
    assert accuracy > 0.6, accuracy  # chance is 0.25


def test_model_inputs_in_each_familys_layout(small):
    """The demo models' normalisation, then each model's family puts the clips in its layout."""
    from staprune.demo.models import preprocessing
    from staprune.families import family_named

    x = preprocessing().normalize_pixels(small[0][:2])
    assert x.shape == (2, 16, 3, 112, 112) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert family_named("videomae").to_input(x).shape == (2, 16, 3, 112, 112)
    assert family_named("swin3d").to_input(x).shape == (2, 3, 16, 112, 112)

"""A loaded model at the input the analyses read it at, and the clips they read.

Models come from :func:`staprune.load` (the one loader); :func:`at_input` fixes the input geometry
(clip length and side: the model's own, or Video Swin's 32x224²) the analyses measure at.

Clips are sampled the way evaluation samples them, reduced to one view: the centre clip of the
model's protocol for the dataset (the demo models: their 16 consecutive frames) and the centre
crop after resizing the short side to the input size.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..data import Preprocessing, probe, read_frames, resize_short_side, spatial_crop_boxes
from ..families.base import LoadedModel
from .backbones import Backbone, describe


@dataclass
class AnalysisModel:
    """A loaded model (:func:`staprune.load`) at one input geometry.

    Attributes:
        loaded: the model and what staprune knows about it.
        backbone: its geometry at this input and its family's answers about it.
        preprocessing: the model's normalisation at the backbone's input side.
    """

    loaded: LoadedModel
    backbone: Backbone
    preprocessing: Preprocessing

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    def default_r(self) -> int:
        """The middle of the model's three pruning levels (its demo levels for the demo models)."""
        return self.loaded.default_r(self.backbone.frames, self.backbone.size)


@dataclass
class Clip:
    """One sampled clip.

    Attributes:
        indices: the decoded frame indices (``backbone.frames`` of them).
        display: uint8 ``(T, S, S, 3)``: the pixels the model sees, before normalisation.
        x: the model input for a batch of one (layout of the backbone).
    """

    path: Path
    indices: list[int]
    display: np.ndarray
    x: Tensor

    def tubelet_images(self, tubelet: int) -> np.ndarray:
        """The first frame of every tubelet: uint8 ``(T / tubelet, S, S, 3)``."""
        return self.display[::tubelet]


def at_input(loaded: LoadedModel, frames: int | None = None, size: int | None = None) -> AnalysisModel:
    """``loaded`` (in eval mode) at ``frames`` x ``size``² input (defaults: the model's own input;
    Video Swin 32 x 224², the paper's); the view size is always the model's input size."""
    backbone = describe(loaded.model.eval(), frames or loaded.frames, size or loaded.image_size)
    return AnalysisModel(loaded, backbone, replace(loaded.preprocessing, size=backbone.size))


def clip_indices(num_frames: int, loaded: AnalysisModel, dataset: str = "k400") -> list[int]:
    """Frame indices of the centre clip of the model's ``dataset`` protocol, ``backbone.frames`` long."""
    one_view = replace(loaded.loaded.protocol(dataset), clips=1, frames=loaded.backbone.frames)
    return one_view.clip_indices(num_frames)[0]


def add_clip_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dataset``, ``--frames``, ``--size``: how the analysis commands sample a clip for :func:`read_clip`."""
    parser.add_argument(
        "--dataset",
        choices=("k400", "ssv2"),
        default=None,
        help="test protocol for sampling (default: k400; the demo models read their 16 consecutive frames either way)",
    )
    parser.add_argument("--frames", type=int, help="clip length (default: the model's; Swin 32)")
    parser.add_argument("--size", type=int, help="input side (default: the model's; Swin 224)")


def read_clip(path: str | Path, loaded: AnalysisModel, dataset: str | None = None) -> Clip:
    """Decode and preprocess the centre view of a video for ``loaded``'s model (``dataset`` None: k400)."""
    path = Path(path)
    indices = clip_indices(probe(path).num_frames, loaded, dataset or "k400")
    frames = read_frames(path, indices)  # uint8 (T, H, W, 3)
    views = loaded.preprocessing.views(frames, 1)  # (1, T, 3, S, S), exactly as evaluation builds it
    size = loaded.preprocessing.size
    resized = resize_short_side(frames, size)
    top, left, h, w = spatial_crop_boxes(resized.shape[-2], resized.shape[-1], size, 1)[0]
    display = resized[..., top : top + h, left : left + w].mul(255).round().to(torch.uint8)
    return Clip(path, indices, display.permute(0, 2, 3, 1).numpy(), loaded.backbone.model_input(views))


__all__ = [
    "AnalysisModel",
    "Clip",
    "add_clip_arguments",
    "at_input",
    "clip_indices",
    "read_clip",
]

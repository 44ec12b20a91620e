"""Model and clip loading shared by the analysis commands.

``--model`` is anything :func:`staprune.checkpoints.load` accepts: registry names (the bundled
``demo-vit`` / ``demo-swin`` with their weights; the others with random weights), local Hugging Face
folders, release ``.pth`` files, ``swin3d_t:WEIGHTS``.

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

from .. import families
from ..data import Preprocessing, probe, read_frames, resize_short_side, spatial_crop_boxes
from .backbones import Backbone, describe


@dataclass
class LoadedModel:
    """A model in eval mode with its geometry, preprocessing and evaluation protocols."""

    name: str
    loaded: families.LoadedModel
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


def load_model(spec: str, frames: int | None = None, size: int | None = None) -> LoadedModel:
    """Load ``spec`` (see module doc) in eval mode, with geometry and preprocessing (the source's
    mean/std; the view size is always the model's input size)."""
    from ..api.loading import load

    loaded = load(spec, frames=frames, image_size=size)
    model = loaded.model.eval()
    backbone = describe(model, frames or loaded.frames, size or loaded.image_size)
    return LoadedModel(spec, loaded, backbone, replace(loaded.preprocessing, size=backbone.size))


def clip_indices(num_frames: int, loaded: LoadedModel, dataset: str = "k400") -> list[int]:
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


def read_clip(path: str | Path, loaded: LoadedModel, dataset: str | None = None) -> Clip:
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
    "Clip",
    "LoadedModel",
    "add_clip_arguments",
    "clip_indices",
    "load_model",
    "read_clip",
]

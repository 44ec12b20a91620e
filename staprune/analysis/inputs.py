"""Model and clip loading shared by the analysis commands.

``--model`` may be ``demo-vit`` / ``demo-swin`` (bundled demo models) or anything
:func:`staprune.checkpoints.load` accepts (local Hugging Face VideoMAE directories, VideoMAE
release ``.pth`` files, ``swin3d_t:WEIGHTS``, registry names with random weights); without that
module, any local directory ``VideoMAEForVideoClassification.from_pretrained`` reads.

Clips are sampled the way evaluation samples them, reduced to one view: the centre clip of the
protocol's temporal sampling and the centre crop after resizing the short side to the input size.
"""

from __future__ import annotations

import argparse
import importlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..data import Preprocessing, probe, protocol, read_frames, resize_short_side, spatial_crop_boxes
from .backbones import Backbone, describe

DEMO_MODELS = ("demo-vit", "demo-swin")
# staprune.demo.data.to_model_input normalises to mean 0.5 / std 0.5; the demo models expect it.
DEMO_PREPROCESSING = Preprocessing(size=112, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@dataclass
class LoadedModel:
    """A model in eval mode with its geometry and preprocessing."""

    name: str
    model: nn.Module
    backbone: Backbone
    preprocessing: Preprocessing


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


def _optional(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _load(spec: str, frames: int | None, size: int | None) -> tuple[nn.Module, Preprocessing | None]:
    """The module and, when the source knows it, its preprocessing (size fixed by the caller)."""
    if spec in DEMO_MODELS:
        demo = _optional("staprune.demo.models")
        if demo is None:
            raise ValueError(
                f"{spec} needs the bundled demo models (staprune.demo.models), which this install lacks"
            )
        model, _layout = demo.load_demo_model(spec)  # the layout is re-derived from the model type
        return model, DEMO_PREPROCESSING
    checkpoints = _optional("staprune.checkpoints")
    if checkpoints is not None:
        try:
            loaded = checkpoints.load(spec, frames=frames, image_size=size)
        except checkpoints.CheckpointError as err:
            raise ValueError(str(err)) from err
        return loaded.model, loaded.preprocessing
    if os.path.isdir(spec):  # tiny fallback: a Hugging Face VideoMAE directory
        from transformers import VideoMAEForVideoClassification

        config_file = Path(spec) / "preprocessor_config.json"
        prep = Preprocessing.from_hf_processor_config(config_file) if config_file.is_file() else None
        return VideoMAEForVideoClassification.from_pretrained(spec), prep
    raise ValueError(f"cannot load model {spec!r}: expected demo-vit, demo-swin or a local model directory")


def load_model(spec: str, frames: int | None = None, size: int | None = None) -> LoadedModel:
    """Load ``spec`` (see module doc) in eval mode, with geometry and preprocessing.

    Preprocessing: the source's mean/std (HF ``preprocessor_config.json``; demo models: 0.5/0.5)
    or ImageNet mean/std; the view size is always the model's input size.
    """
    if spec in DEMO_MODELS:  # demo models are built for their own clip geometry (16 x 112² today)
        demo = _optional("staprune.demo.models")
        frames, size = frames or getattr(demo, "FRAMES", None), size or getattr(demo, "SIZE", None)
    model, prep = _load(spec, frames, size)
    backbone = describe(model.eval(), frames, size)
    prep = replace(prep or Preprocessing.imagenet_default(), size=backbone.size)
    return LoadedModel(spec, model, backbone, prep)


def clip_indices(num_frames: int, backbone: Backbone, dataset: str = "k400") -> list[int]:
    """Frame indices of the centre clip of ``dataset``'s test protocol, ``backbone.frames`` long."""
    one_view = replace(protocol(backbone.family, dataset), clips=1, frames=backbone.frames)
    return one_view.clip_indices(num_frames)[0]


def default_dataset(loaded: LoadedModel) -> str:
    """The sampling protocol to use when none is named: ``"ssv2"`` for the demo models, else ``"k400"``.

    The demo models were trained on 16 consecutive frames, and on a 16-frame clip the ssv2
    protocol's uniform segments pick exactly those; K400's stride-4 sampling would span 64 frames
    and repeat the last one.
    """
    return "ssv2" if loaded.name in DEMO_MODELS else "k400"


def add_clip_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dataset``, ``--frames``, ``--size``: how the analysis commands sample a clip for :func:`read_clip`."""
    parser.add_argument(
        "--dataset",
        choices=("k400", "ssv2"),
        default=None,
        help="test protocol for sampling (default: k400; the demo models: ssv2, i.e. their 16 consecutive frames)",
    )
    parser.add_argument("--frames", type=int, help="clip length (default: the model's; Swin 32)")
    parser.add_argument("--size", type=int, help="input side (default: the model's; Swin 224)")


def read_clip(path: str | Path, loaded: LoadedModel, dataset: str | None = None) -> Clip:
    """Decode and preprocess the centre view of a video for ``loaded``'s model
    (``dataset`` None: :func:`default_dataset`)."""
    path = Path(path)
    indices = clip_indices(probe(path).num_frames, loaded.backbone, dataset or default_dataset(loaded))
    frames = read_frames(path, indices)  # uint8 (T, H, W, 3)
    views = loaded.preprocessing.views(frames, 1)  # (1, T, 3, S, S), exactly as evaluation builds it
    size = loaded.preprocessing.size
    resized = resize_short_side(frames, size)
    top, left, h, w = spatial_crop_boxes(resized.shape[-2], resized.shape[-1], size, 1)[0]
    display = resized[..., top : top + h, left : left + w].mul(255).round().to(torch.uint8)
    return Clip(path, indices, display.permute(0, 2, 3, 1).numpy(), loaded.backbone.model_input(views))


__all__ = [
    "Clip",
    "DEMO_MODELS",
    "LoadedModel",
    "add_clip_arguments",
    "clip_indices",
    "default_dataset",
    "load_model",
    "read_clip",
]

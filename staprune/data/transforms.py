"""Per-model preprocessing as plain tensor functions.

Layouts used here:

* decoded clips: uint8 (T, H, W, 3), RGB, as returned by ``video.read_frames``;
* float frames: float32 (T, 3, H, W) in [0, 1] (before ``normalize``);
* model views: (num_crops, T, 3, size, size), which is the HF VideoMAE input layout
  (B, T, 3, H, W). torchvision's Swin3D wants (B, 3, T, H, W): use ``to_channels_first_time``.

The test protocol resizes the short side straight to the crop size and then takes square crops
along the long side (VideoMAE's ``short_side_size == input_size`` at test time). This differs from
torchvision's single-view recipe (short side 256, centre crop 224); see ``Preprocessing``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..core.errors import DataError
from .sampling import spatial_crop_boxes

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def resize_short_side(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the shorter side equals ``size``, keeping the aspect ratio.

    Args:
        frames: uint8 (T, H, W, 3).
        size: target short side in pixels; the long side becomes ``round(long * size / short)``.

    Returns:
        float32 (T, 3, H', W') in [0, 1]. Bilinear with antialiasing, so downscaling doesn't alias.
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 frames of shape (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}"
        )
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    x = frames.permute(0, 3, 1, 2).float().div_(255.0)
    height, width = x.shape[-2:]
    short = min(height, width)
    new_h, new_w = (
        (size, round(width * size / short)) if height <= width else (round(height * size / short), size)
    )
    if (new_h, new_w) == (height, width):
        return x.contiguous()
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp_(0.0, 1.0)  # antialias filters can overshoot by a hair at sharp edges


def crop(frames: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Crop (..., 3, H, W) frames to ``box = (top, left, h, w)``; returns a view."""
    top, left, h, w = box
    height, width = frames.shape[-2:]
    if top < 0 or left < 0 or h < 1 or w < 1 or top + h > height or left + w > width:
        raise ValueError(f"crop box {box} does not fit in a {height}x{width} frame")
    return frames[..., top : top + h, left : left + w]


def normalize(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(frames - mean) / std`` per channel, for float (..., 3, H, W) frames."""
    if frames.ndim < 3 or frames.shape[-3] != len(mean) or len(mean) != len(std):
        raise ValueError(
            f"mean/std of length {len(mean)}/{len(std)} do not match frames {tuple(frames.shape)}"
        )
    m = torch.tensor(mean, dtype=frames.dtype, device=frames.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=frames.dtype, device=frames.device).view(-1, 1, 1)
    return (frames - m) / s


def make_views(
    frames: torch.Tensor, size: int, num_crops: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Turn one decoded clip into ``num_crops`` normalised square views.

    Args:
        frames: uint8 (T, H, W, 3).
        size: short side after resizing, and the crop size.
        num_crops: 1 (centre) or 3 (start/centre/end along the long side); see ``spatial_crop_boxes``.

    Returns:
        float32 (num_crops, T, 3, size, size).
    """
    x = normalize(resize_short_side(frames, size), mean, std)
    boxes = spatial_crop_boxes(x.shape[-2], x.shape[-1], size, num_crops)
    return torch.stack([crop(x, box) for box in boxes])


def to_channels_first_time(x: torch.Tensor) -> torch.Tensor:
    """(..., T, 3, H, W) -> (..., 3, T, H, W), e.g. HF VideoMAE layout -> torchvision Swin3D layout."""
    if x.ndim < 4:
        raise ValueError(f"expected at least 4 dims (..., T, C, H, W), got {tuple(x.shape)}")
    return x.transpose(-4, -3)


def _side(value: Any, key: str) -> int:
    """Read a HF size entry: an int, {"shortest_edge": n}, or {"height": h, "width": w}."""
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if "height" in value and "width" in value:
            if value["height"] != value["width"]:
                raise DataError(
                    f"{key} {dict(value)} is not square; the multi-crop protocol needs square crops"
                )
            return int(value["height"])
    raise DataError(f"unsupported {key} entry in preprocessor config: {value!r}")


@dataclass(frozen=True)
class Preprocessing:
    """Resize-short-side-then-crop size plus normalisation constants for one model family."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def views(self, frames: torch.Tensor, num_crops: int) -> torch.Tensor:
        """uint8 (T, H, W, 3) -> float32 (num_crops, T, 3, size, size); see ``make_views``."""
        return make_views(frames, self.size, num_crops, self.mean, self.std)

    def normalize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 clips ``(..., 3, H, W)`` already at the input size -> normalised float32."""
        return normalize(pixels.float() / 255, self.mean, self.std)

    @classmethod
    def imagenet_default(cls, size: int = 224) -> Preprocessing:
        """ImageNet mean/std (used by VideoMAE checkpoints)."""
        return cls(size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    @classmethod
    def kinetics_swin(cls, size: int = 224) -> Preprocessing:
        """torchvision ``swin3d_{t,s,b}`` Kinetics-400 weights.

        Those weights' own transform normalises with the ImageNet mean/std (not torchvision's
        Kinetics statistics (0.432, 0.395, 0.376)/(0.228, 0.221, 0.217), which its ResNet3D/MViT
        weights use), and resizes the short side to 256 before a 224 centre crop. For the
        multi-crop protocol we instead resize the short side to ``size`` and crop ``size``.
        """
        return cls(size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    @classmethod
    def from_hf_processor_config(cls, path_or_dict: str | Path | Mapping[str, Any]) -> Preprocessing:
        """Build from a HF ``preprocessor_config.json`` (a dict, the file, or its directory).

        Uses ``image_mean``/``image_std`` (identity if ``do_normalize`` is false) and
        ``crop_size`` if present, else ``size``; sizes may be ints, ``{"shortest_edge": n}`` or
        square ``{"height": n, "width": n}``. HF first rescales pixel values ``p`` in 0..255 to
        ``p * rescale_factor - offset`` (default 1/255, no offset; ViViT's processors use 1/127.5 and
        an offset of 1, i.e. [-1, 1]), then normalises; both steps are folded into one mean/std on
        [0, 1] frames, so ``normalize(x, mean, std)`` gives exactly HF's values.
        """
        if isinstance(path_or_dict, Mapping):
            config = dict(path_or_dict)
        else:
            path = Path(path_or_dict)
            if path.is_dir():
                path = path / "preprocessor_config.json"
            config = json.loads(path.read_text(encoding="utf-8"))
        if "crop_size" in config and config["crop_size"] is not None:
            size = _side(config["crop_size"], "crop_size")
        elif "size" in config:
            size = _side(config["size"], "size")
        else:
            raise DataError("preprocessor config has neither 'crop_size' nor 'size'")
        if config.get("do_normalize", True):
            mean = tuple(float(v) for v in config.get("image_mean", IMAGENET_MEAN))
            std = tuple(float(v) for v in config.get("image_std", IMAGENET_STD))
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if len(mean) != 3 or len(std) != 3:
            raise DataError(f"image_mean/image_std must have 3 values, got {mean} / {std}")
        scale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0
        # ViViT's video processor always offsets; its image processor says so in "offset".
        always_offset = "Vivit" in str(config.get("video_processor_type", ""))
        offset = 1.0 if config.get("offset", always_offset) else 0.0
        # (255 x * scale - offset - m) / s  ==  (x - (m + offset) / (255 scale)) / (s / (255 scale))
        unit = round(255.0 * scale, 6)  # 0.00392156862745098 * 255 is 1 up to float error
        mean = tuple((m + offset) / unit for m in mean)
        std = tuple(v / unit for v in std)
        return cls(size=size, mean=mean, std=std)  # type: ignore[arg-type]

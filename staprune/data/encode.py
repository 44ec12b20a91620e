"""Write small videos with PyAV (for tests and the demo).

Only what we need: uint8 RGB frames in, one H.264 (or MPEG-4 part 2) stream out.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

# Preferred first. libx264 is not in every FFmpeg build (licensing), mpeg4 almost always is.
_CODEC_PREFERENCE: tuple[str, ...] = ("libx264", "mpeg4")


def encoder_available(name: str) -> bool:
    """True if this PyAV/FFmpeg build has an encoder called ``name``."""
    try:
        av.codec.Codec(name, "w")
    except (ValueError, av.error.FFmpegError):  # UnknownCodecError is a ValueError
        return False
    return True


def pick_codec(preferred: Sequence[str] = _CODEC_PREFERENCE) -> str:
    """First encoder from ``preferred`` that exists in this build.

    Raises:
        RuntimeError: none of them is available.
    """
    for name in preferred:
        if encoder_available(name):
            return name
    raise RuntimeError(f"none of the encoders {list(preferred)} is available in this PyAV build")


def _as_uint8_numpy(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must have shape (T, H, W, 3), got {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {arr.dtype}")
    if arr.shape[0] == 0:
        raise ValueError("cannot write a video with 0 frames")
    height, width = arr.shape[1:3]
    # yuv420p stores chroma at half resolution, so encoders reject odd sizes.
    if height % 2 or width % 2:
        raise ValueError(f"frame height and width must be even for yuv420p, got {height}x{width}")
    return np.ascontiguousarray(arr)


def write_video(
    path: str | Path,
    frames: torch.Tensor | np.ndarray,
    fps: float = 25,
    codec: str | None = None,
    gop: int | None = None,
    quality: int = 18,
) -> Path:
    """Encode ``frames`` into a video file at ``path``.

    Args:
        path: output file; the container format is taken from its suffix (.mp4, .mkv, .avi, ...).
        frames: uint8 RGB, shape (T, H, W, 3), H and W even.
        fps: frame rate (may be fractional, e.g. 29.97).
        codec: encoder name; ``None`` picks libx264 if present, else mpeg4.
        gop: keyframe interval in frames (``None`` = encoder default). Small values make
            seeking land close to any frame; tests use it to get several keyframes.
        quality: libx264 CRF / mpeg4 qscale-like level; lower is better (default is visually lossless).

    Returns:
        ``path`` as a Path.
    """
    arr = _as_uint8_numpy(frames)
    path = Path(path)
    codec = codec or pick_codec()
    rate = Fraction(fps).limit_denominator(1001 * 1000)

    options: dict[str, str] = {}
    if codec in ("libx264", "h264"):
        options["crf"] = str(quality)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.width = arr.shape[2]
        stream.height = arr.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec not in ("libx264", "h264"):
            # mpeg4's default bit rate (200 kb/s) smears small test patterns; ask for high quality.
            stream.codec_context.qmin = 1
            stream.codec_context.qmax = max(2, quality // 6)
            stream.bit_rate = 8_000_000
        if gop is not None:
            if gop < 1:
                raise ValueError(f"gop must be >= 1, got {gop}")
            stream.codec_context.gop_size = gop
        for image in arr:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():  # flush delayed (B-)frames
            container.mux(packet)
    return path

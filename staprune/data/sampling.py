"""Test-time view sampling (which frames, which crops) as pure index arithmetic.

Nothing here decodes video: the functions map a frame count / frame size to indices and boxes,
so they are cheap to test exhaustively. All rounding is done in exact integer arithmetic so the
results don't depend on float error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..core.errors import UsageError


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) != value or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")


def uniform_clip_indices(num_frames: int, clip_len: int, stride: int, num_clips: int) -> list[list[int]]:
    """Evenly spaced dense clips (Kinetics multi-view testing, as in VideoMAE/SlowFast).

    A clip covers ``span = clip_len * stride`` frames; frame j of a clip is ``start + j * stride``.
    With ``slack = max(num_frames - span, 0)``:

    * ``num_clips == 1``: ``start = slack // 2`` (the centre clip);
    * otherwise ``start_i = floor(i * slack / (num_clips - 1))`` for i in 0..num_clips-1,
      so the first clip starts at frame 0 and the last clip's span ends at the last frame.

    Too-short videos (``num_frames < span``): every start is 0 and indices past the end are
    clamped to ``num_frames - 1`` (the last frame repeats). Callers that want to reject such
    videos can compare ``num_frames`` with ``clip_len * stride`` themselves.

    Returns:
        ``num_clips`` lists of ``clip_len`` frame indices, each in [0, num_frames - 1].
    """
    _check_positive(num_frames=num_frames, clip_len=clip_len, stride=stride, num_clips=num_clips)
    slack = max(num_frames - clip_len * stride, 0)
    if num_clips == 1:
        starts = [slack // 2]
    else:
        starts = [i * slack // (num_clips - 1) for i in range(num_clips)]
    last = num_frames - 1
    return [[min(start + j * stride, last) for j in range(clip_len)] for start in starts]


def segment_clip_indices(num_frames: int, clip_len: int, num_clips: int) -> list[list[int]]:
    """TSN-style segment sampling (Something-Something V2 testing in VideoMAE).

    The video is cut into ``clip_len`` equal segments of length ``seg = num_frames / clip_len``
    (a fraction). Clip k (0-based, of ``num_clips``) takes from segment j the frame

        ``idx[k][j] = floor(seg * j + seg * (k + 0.5) / num_clips)``

    i.e. the clips take evenly interleaved offsets inside every segment (with one clip: each
    segment's middle frame). Computed exactly as
    ``floor(num_frames * (2*j*num_clips + 2*k + 1) / (2 * clip_len * num_clips))``.
    Indices are clamped to [0, num_frames - 1]; for videos shorter than ``clip_len`` frames,
    frames repeat.

    Returns:
        ``num_clips`` lists of ``clip_len`` frame indices, each non-decreasing.
    """
    _check_positive(num_frames=num_frames, clip_len=clip_len, num_clips=num_clips)
    denominator = 2 * clip_len * num_clips
    last = num_frames - 1
    return [
        [min(num_frames * (2 * j * num_clips + 2 * k + 1) // denominator, last) for j in range(clip_len)]
        for k in range(num_clips)
    ]


def spatial_crop_boxes(
    height: int, width: int, crop_size: int, num_crops: int
) -> list[tuple[int, int, int, int]]:
    """Square crops for multi-crop testing, as (top, left, h, w) boxes.

    ``height``/``width`` are the size of the frame the crops are taken from, normally after its
    short side was resized to ``crop_size`` (see ``transforms.resize_short_side``). The crops
    slide along the LONGER side: ``num_crops == 1`` gives the centre crop, ``num_crops == 3``
    gives start / centre / end, and in general crop i starts at
    ``floor(i * (long - crop_size) / (num_crops - 1))``. Along the shorter side crops are centred.

    Raises:
        ValueError: the frame is smaller than ``crop_size`` or an argument is not positive.
    """
    _check_positive(height=height, width=width, crop_size=crop_size, num_crops=num_crops)
    if min(height, width) < crop_size:
        raise ValueError(f"frame {height}x{width} is smaller than crop size {crop_size}; resize first")
    # Portrait frames slide the crop vertically, landscape (and square) frames horizontally.
    along_h = height > width
    slack_long = (height if along_h else width) - crop_size
    fixed = ((width if along_h else height) - crop_size) // 2
    if num_crops == 1:
        moving = [slack_long // 2]
    else:
        moving = [i * slack_long // (num_crops - 1) for i in range(num_crops)]
    return [(m, fixed, crop_size, crop_size) if along_h else (fixed, m, crop_size, crop_size) for m in moving]


@dataclass(frozen=True)
class ViewProtocol:
    """How one test video becomes ``clips * crops`` model inputs."""

    clips: int
    crops: int
    frames: int
    stride: int
    sampling: Literal["uniform", "segment"]

    @property
    def num_views(self) -> int:
        return self.clips * self.crops

    def clip_indices(self, num_frames: int) -> list[list[int]]:
        """Frame indices of every clip of a video with ``num_frames`` frames."""
        if self.sampling == "segment":
            return segment_clip_indices(num_frames, self.frames, self.clips)
        return uniform_clip_indices(num_frames, self.frames, self.stride, self.clips)


DATASETS: tuple[str, ...] = ("k400", "ssv2")


def parse_views(text: str) -> tuple[int, int]:
    """Parse ``"<clips>x<crops>"`` (e.g. ``"5x3"``, case-insensitive, spaces allowed) into (clips, crops)."""
    parts = text.strip().lower().split("x")
    if len(parts) == 2:
        try:
            clips, crops = int(parts[0]), int(parts[1])
        except ValueError:
            pass
        else:
            if clips >= 1 and crops >= 1:
                return clips, crops
    raise UsageError(
        f"views must look like '<clips>x<crops>' with positive integers, e.g. '5x3'; got {text!r}"
    )

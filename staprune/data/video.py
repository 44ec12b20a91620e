"""Decode frames from video files with PyAV.

``read_frames`` decodes only what the wanted frames need. It reads the keyframe positions from the
container's packets (no decoding), then walks the wanted frames in order: it seeks to the keyframe
before a wanted frame and decodes forward, and keeps decoding linearly only while the next wanted
frame lies in a GOP it has already entered; a wanted frame beyond the next keyframe is reached by
seeking again. So 16 frames spread over a long video cost about 16 GOP fragments, not every frame
in between (``strategy="linear"``: seek once, decode from the first wanted frame to the last, the
reader before; ``"full"``: decode from the start). Frames are identified by their presentation
timestamp, which is what makes every strategy return exactly the frames a full sequential decode
would (tests/test_data_video.py compares them bit for bit, B-frame and variable-frame-rate clips
included).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from ..core.errors import DataError


class VideoReadError(DataError):
    """A video could not be read. ``path`` is the file, ``reason`` says what went wrong."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class VideoInfo:
    """Basic facts about the first video stream of a file."""

    num_frames: int
    fps: float
    width: int
    height: int
    duration_s: float


def _open(path: Path) -> av.container.InputContainer:
    # Check ourselves first: FFmpeg's messages for these cases are terse.
    if not path.exists():
        raise VideoReadError(path, "file does not exist")
    if not path.is_file():
        raise VideoReadError(path, "not a regular file")
    try:
        return av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoReadError(path, f"cannot open as a video container ({e})") from e


def _video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise VideoReadError(path, "file has no video stream")
    return container.streams.video[0]


def _fps(stream: av.video.stream.VideoStream, path: Path) -> Fraction:
    # average_rate is what muxers store; guessed_rate covers containers that only have r_frame_rate.
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0:
        raise VideoReadError(path, "cannot determine the frame rate")
    return Fraction(rate)


def _count_packets(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    # One packet per frame for the video codecs we care about; size-0 packets are end-of-stream
    # markers that PyAV's demuxer emits for flushing, not frames.
    return sum(1 for packet in container.demux(stream) if packet.size > 0)


def probe(path: str | Path) -> VideoInfo:
    """Read frame count, frame rate and size without decoding any frame.

    When the container does not store the frame count (e.g. Matroska/WebM), the video
    packets are demuxed and counted, which is still far cheaper than decoding.

    Raises:
        VideoReadError: missing file, not a video, or unreadable container.
    """
    path = Path(path)
    with _open(path) as container:
        stream = _video_stream(container, path)
        fps = _fps(stream, path)
        width = stream.codec_context.width
        height = stream.codec_context.height
        num_frames = stream.frames
        try:
            if not num_frames:
                num_frames = _count_packets(container, stream)
        except av.error.FFmpegError as e:
            raise VideoReadError(path, f"cannot demux video packets ({e})") from e
        if stream.duration is not None and stream.time_base is not None:
            duration_s = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration_s = container.duration / av.time_base
        else:
            duration_s = num_frames / float(fps)
    if num_frames <= 0:
        raise VideoReadError(path, "video stream has no frames")
    if width <= 0 or height <= 0:
        raise VideoReadError(path, f"invalid frame size {width}x{height}")
    return VideoInfo(num_frames=num_frames, fps=float(fps), width=width, height=height, duration_s=duration_s)


class _SeekOvershot(Exception):
    """Seeking landed after the wanted frame (bad index or odd timestamps); decode from the start."""


def _indexed_frames(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    fps: Fraction,
    seek_to: int,
) -> Iterator[tuple[int, av.VideoFrame]]:
    """Yield (frame index, frame), optionally seeking near frame ``seek_to`` first (0 = no seek)."""
    time_base = stream.time_base
    start_pts = stream.start_time or 0
    if seek_to > 0:
        # Aim half a frame early so rounding in the stored timestamps can't push us past it;
        # backward=True then lands on the keyframe at or before that time.
        target = start_pts + math.floor((Fraction(seek_to) - Fraction(1, 2)) / (fps * time_base))
        container.seek(target, stream=stream, backward=True)
    previous = -1
    for frame in container.decode(stream):
        if frame.pts is None:
            if seek_to > 0:
                raise _SeekOvershot  # can't place frames after a seek without timestamps
            index = previous + 1  # from the start, counting is the only option left
        else:
            index = round((frame.pts - start_pts) * time_base * fps)
        previous = index
        yield index, frame


def _keyframes(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
               fps: Fraction) -> list[int]:
    """Frame indices of the stream's keyframes, from its packets (nothing is decoded)."""
    start_pts = stream.start_time or 0
    keys = sorted(round((packet.pts - start_pts) * stream.time_base * fps) for packet in container.demux(stream)
                  if packet.is_keyframe and packet.pts is not None)
    container.seek(0, stream=stream, backward=True)  # demuxing consumed the packets: back to the start
    return keys


def _collect(path: Path, wanted: set[int], first: int, last: int, seek: bool,
             strategy: str = "linear") -> dict[int, np.ndarray]:
    found: dict[int, np.ndarray] = {}
    with _open(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"  # frame+slice threads; results are identical, just faster
        fps = _fps(stream, path)
        if seek and strategy == "segments":
            return _collect_segments(container, stream, fps, sorted(wanted))
        seek_to = first if seek else 0
        checked_landing = False
        for index, frame in _indexed_frames(container, stream, fps, seek_to):
            if not checked_landing:
                checked_landing = True
                if seek_to > 0 and index > first:
                    raise _SeekOvershot
            if index in wanted and index not in found:
                found[index] = frame.to_ndarray(format="rgb24")
            if index >= last:
                break
    return found


def _collect_segments(container: av.container.InputContainer, stream: av.video.stream.VideoStream, fps: Fraction,
                      wanted: list[int]) -> dict[int, np.ndarray]:
    """The seeking strategy: one decode run per stretch of wanted frames. A run starts with a seek to
    (the keyframe before) its first frame and decodes forward; the next wanted frame joins the run
    unless a keyframe lies after the run's last frame and at or before it: then seeking there skips
    decoding the frames in between."""
    keys = _keyframes(container, stream, fps)

    def key_before(index: int) -> int:
        position = bisect.bisect_right(keys, index) - 1
        return keys[position] if position >= 0 else 0

    runs: list[list[int]] = []
    for w in wanted:
        if runs and key_before(w) <= runs[-1][-1]:
            runs[-1].append(w)
        else:
            runs.append([w])
    found: dict[int, np.ndarray] = {}
    for run in runs:
        first = True
        for index, frame in _indexed_frames(container, stream, fps, run[0]):
            if first and index > run[0]:
                raise _SeekOvershot  # the seek landed after the wanted frame
            first = False
            if index in run and index not in found:
                found[index] = frame.to_ndarray(format="rgb24")
            if index >= run[-1]:
                break
    return found


STRATEGIES = ("segments", "linear", "full")


def read_frames(path: str | Path, indices: Sequence[int], strategy: str = "segments") -> torch.Tensor:
    """Decode the frames with the given 0-based indices.

    Args:
        path: video file.
        indices: frame indices, any order, repeats allowed.
        strategy: ``segments`` (seek before every stretch of wanted frames, the default), ``linear``
            (seek once, decode from the first wanted frame to the last) or ``full`` (decode from the
            start); all return the same frames (see the module docstring).

    Returns:
        uint8 tensor of shape (len(indices), H, W, 3), RGB, in the order of ``indices``.

    Raises:
        VideoReadError: missing/corrupt file, or an index at or beyond the number of frames.
        ValueError: a negative index.
    """
    path = Path(path)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; choose one of {', '.join(STRATEGIES)}")
    wanted_list = [int(i) for i in indices]
    if any(i < 0 for i in wanted_list):
        raise ValueError(f"frame indices must be >= 0, got {min(wanted_list)}")
    info = probe(path)
    if not wanted_list:
        return torch.empty((0, info.height, info.width, 3), dtype=torch.uint8)
    first, last = min(wanted_list), max(wanted_list)
    if last >= info.num_frames:
        raise VideoReadError(path, f"video has {info.num_frames} frames, clip needs frame {last}")
    wanted = set(wanted_list)
    try:
        try:
            found = _collect(path, wanted, first, last, seek=strategy != "full", strategy=strategy)
        except _SeekOvershot:
            found = _collect(path, wanted, first, last, seek=False)
    except av.error.FFmpegError as e:
        raise VideoReadError(path, f"decoding failed ({e})") from e
    missing = sorted(wanted - found.keys())
    if missing:
        # The stored frame count promised more than the stream delivers (truncated file, bad header).
        raise VideoReadError(
            path, f"could not decode frame {missing[0]} (header says {info.num_frames} frames)"
        )
    return torch.from_numpy(np.stack([found[i] for i in wanted_list]))


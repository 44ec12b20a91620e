"""Decoding tests on small synthetic videos whose frames encode their own index.

Frame i shows a white 8-px-wide bar starting at column i on black, so the bar's horizontal
centroid identifies the frame even after lossy compression.
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from staprune.data import encode, video
from staprune.data.encode import encoder_available, pick_codec, write_video
from staprune.data.video import VideoReadError, probe, read_frames

NUM_FRAMES, HEIGHT, WIDTH, BAR = 80, 48, 96, 8
GOP = 8  # several keyframes, so seeking really skips most of the file


def make_frames(num_frames: int = NUM_FRAMES) -> np.ndarray:
    frames = np.zeros((num_frames, HEIGHT, WIDTH, 3), np.uint8)
    for i in range(num_frames):
        frames[i, 8:40, i : i + BAR] = 255
    return frames


def frame_ids(frames: torch.Tensor) -> list[int]:
    """Recover each decoded frame's index from the bar's centroid."""
    profile = frames[:, 8:40, :, :].float().mean(dim=(1, 3))  # (T, W)
    columns = torch.arange(WIDTH, dtype=torch.float32)
    centroid = (profile * columns).sum(1) / profile.sum(1)
    return (centroid - (BAR - 1) / 2).round().long().tolist()


CASES = [("libx264", ".mp4"), ("mpeg4", ".avi"), ("libx264", ".mkv")]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}{c[1]}")
def clip(request, tmp_path_factory) -> tuple:
    codec, suffix = request.param
    if not encoder_available(codec):
        pytest.skip(f"encoder {codec} not in this PyAV build")
    path = tmp_path_factory.mktemp("videos") / f"bar{suffix}"
    write_video(path, make_frames(), fps=25, codec=codec, gop=GOP)
    full = read_frames(path, range(NUM_FRAMES), strategy="full")
    return path, full


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    path = tmp_path_factory.mktemp("mp4") / "bar video.mp4"  # space in name on purpose
    write_video(path, make_frames(), fps=25, gop=GOP)
    return path


def test_probe(clip):
    path, _ = clip
    info = probe(path)
    assert info.num_frames == NUM_FRAMES
    assert (info.width, info.height) == (WIDTH, HEIGHT)
    assert info.fps == pytest.approx(25.0)
    assert info.duration_s == pytest.approx(NUM_FRAMES / 25.0, abs=0.05)


def test_probe_counts_packets_when_container_has_no_frame_count(tmp_path):
    path = write_video(tmp_path / "v.mkv", make_frames(37), gop=GOP)
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0  # Matroska stores no count: the demux path is used
    assert probe(path).num_frames == 37


def test_full_decode_has_every_frame_in_order(clip):
    _, full = clip
    assert full.dtype == torch.uint8 and full.shape == (NUM_FRAMES, HEIGHT, WIDTH, 3)
    assert frame_ids(full) == list(range(NUM_FRAMES))


@pytest.mark.parametrize(
    "indices",
    [[0], [1], [7, 8, 9], [8], [50, 52], [NUM_FRAMES - 1], list(range(12, 76, 4)), [33, 12, 70, 5, 5, 33]],
)
def test_seeking_read_equals_full_decode(clip, indices):
    path, full = clip
    got = read_frames(path, indices)
    assert got.shape == (len(indices), HEIGHT, WIDTH, 3)
    assert torch.equal(got, full[indices])  # bit-identical, not just the same frame ids
    assert frame_ids(got) == indices


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(indices=st.lists(st.integers(0, NUM_FRAMES - 1), min_size=1, max_size=6))
def test_seeking_read_equals_full_decode_random(mp4, indices):
    full = read_frames(mp4, range(NUM_FRAMES))
    assert torch.equal(read_frames(mp4, indices), full[indices])


def test_returns_requested_order_with_repeats(mp4):
    indices = [30, 5, 5, 30, 17, 79, 0]
    assert frame_ids(read_frames(mp4, indices)) == indices


def test_seek_decodes_only_the_clip(mp4, monkeypatch):
    seen: list[int] = []
    original = video._indexed_frames

    def spy(*args, **kwargs):
        for index, frame in original(*args, **kwargs):
            seen.append(index)
            yield index, frame

    with av.open(str(mp4)) as c:
        s = c.streams.video[0]
        keyframes = [round(p.pts * s.time_base * 25) for p in c.demux(s) if p.is_keyframe]
    assert len(keyframes) >= NUM_FRAMES // GOP  # the encoder honoured the short GOP

    monkeypatch.setattr(video, "_indexed_frames", spy)
    read_frames(mp4, [61, 60])
    # Decoding starts at the last keyframe at or before frame 60 and stops at 61.
    assert seen[0] == max(k for k in keyframes if k <= 60)
    assert seen[-1] == 61
    assert seen == list(range(seen[0], 62))
    assert len(seen) <= GOP + 2


def test_seek_overshoot_falls_back_to_decoding_from_start(mp4, monkeypatch):
    calls: list[int] = []
    original = video._indexed_frames

    def bad_seek(container, stream, fps, seek_to):
        calls.append(seek_to)
        # Pretend the seek landed 20 frames too late, as a broken index would.
        return original(container, stream, fps, seek_to + 20 if seek_to else 0)

    monkeypatch.setattr(video, "_indexed_frames", bad_seek)
    got = read_frames(mp4, [40, 42])
    assert calls == [40, 0]
    assert frame_ids(got) == [40, 42]


def test_empty_indices_give_empty_tensor(mp4):
    out = read_frames(mp4, [])
    assert out.shape == (0, HEIGHT, WIDTH, 3) and out.dtype == torch.uint8


def test_negative_index_rejected(mp4):
    with pytest.raises(ValueError, match=">= 0"):
        read_frames(mp4, [3, -1])


def test_index_beyond_length(tmp_path):
    path = write_video(tmp_path / "short.mp4", make_frames(40))
    with pytest.raises(VideoReadError, match="video has 40 frames, clip needs frame 63") as err:
        read_frames(path, [10, 63, 20])
    assert err.value.path == path
    with pytest.raises(VideoReadError, match="clip needs frame 40"):
        read_frames(path, [40])
    assert read_frames(path, [39]).shape[0] == 1  # the last frame itself is fine


def test_missing_file(tmp_path):
    path = tmp_path / "nope.mp4"
    with pytest.raises(VideoReadError, match="does not exist") as err:
        read_frames(path, [0])
    assert str(path) in str(err.value)
    assert err.value.reason == "file does not exist"
    with pytest.raises(VideoReadError):
        probe(path)


def test_directory_is_not_a_video(tmp_path):
    with pytest.raises(VideoReadError, match="not a regular file"):
        probe(tmp_path)


def test_random_bytes(tmp_path):
    path = tmp_path / "x.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoReadError) as err:
        read_frames(path, [0])
    assert err.value.path == path and "cannot open" in err.value.reason


def test_truncated_mp4(tmp_path, mp4):
    path = tmp_path / "cut.mp4"
    path.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])  # loses the trailing index (moov)
    with pytest.raises(VideoReadError, match="cut.mp4"):
        probe(path)
    with pytest.raises(VideoReadError):
        read_frames(path, [0])


def test_truncated_mkv_reports_the_frames_it_has(tmp_path):
    full = write_video(tmp_path / "full.mkv", make_frames(), gop=GOP)
    path = tmp_path / "cut.mkv"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    available = probe(path).num_frames
    assert 0 < available < NUM_FRAMES
    with pytest.raises(
        VideoReadError, match=f"video has {available} frames, clip needs frame {NUM_FRAMES - 1}"
    ):
        read_frames(path, [NUM_FRAMES - 1])
    assert frame_ids(read_frames(path, [2, 0])) == [2, 0]


def test_write_video_validates_input(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 47, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", np.zeros((2, 48, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        write_video(tmp_path / "g.mp4", np.zeros((48, 64, 3), np.uint8))


def test_write_video_accepts_tensor_and_fractional_fps(tmp_path):
    path = write_video(tmp_path / "t.mp4", torch.from_numpy(make_frames(12)), fps=29.97)
    info = probe(path)
    assert info.num_frames == 12 and info.fps == pytest.approx(29.97, abs=1e-3)
    assert frame_ids(read_frames(path, range(12))) == list(range(12))


def test_codec_selection(monkeypatch):
    assert not encoder_available("no-such-encoder")
    assert encoder_available(pick_codec())
    assert pick_codec(["no-such-encoder", "mpeg4"]) == "mpeg4"
    with pytest.raises(RuntimeError, match="none of the encoders"):
        pick_codec(["no-such-encoder"])
    monkeypatch.setattr(encode, "encoder_available", lambda name: name == "mpeg4")
    assert pick_codec() == "mpeg4"  # falls back when libx264 is missing


# --- the seeking strategy against the readers before it -----------------------------------------
def write_vfr(path, num_frames: int = NUM_FRAMES, gop: int = GOP) -> None:
    """A variable-frame-rate H.264 clip with B-frames: frame gaps alternate 30 and 50 ms."""
    frames = make_frames(num_frames)
    millisecond = Fraction(1, 1000)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=25, options={"crf": "18", "bf": "3", "g": str(gop)})
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.time_base = millisecond
        pts = 0
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = pts, millisecond
            pts += 30 if i % 2 else 50
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module", params=["x264-bframes.mp4", "mpeg4.avi", "x264.mkv", "vfr-bframes.mp4"])
def any_clip(request, tmp_path_factory):
    name = request.param
    path = tmp_path_factory.mktemp("strategies") / name
    if name.startswith("vfr"):
        if not encoder_available("libx264"):
            pytest.skip("libx264 not in this PyAV build")
        write_vfr(path)
    else:
        codec = "mpeg4" if name.startswith("mpeg4") else "libx264"
        if not encoder_available(codec):
            pytest.skip(f"{codec} not in this PyAV build")
        write_video(path, make_frames(), fps=25, codec=codec, gop=GOP)
    return path


SPREAD = [[0, 20, 40, 60, NUM_FRAMES - 1], list(range(3, NUM_FRAMES, 5)), [79, 1, 45, 46, 47, 12, 12], [0], [9, 10]]


@pytest.mark.parametrize("indices", SPREAD)
def test_every_strategy_returns_the_same_bits(any_clip, indices):
    """Seeking before every stretch of frames returns exactly what one seek and a linear decode, and
    a decode from the start, return: B-frames, an AVI, a Matroska file and a variable frame rate."""
    n = probe(any_clip).num_frames
    wanted = [min(i, n - 1) for i in indices]
    segments, linear, full = (read_frames(any_clip, wanted, strategy=s) for s in ("segments", "linear", "full"))
    assert torch.equal(segments, linear) and torch.equal(segments, full)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(indices=st.lists(st.integers(0, NUM_FRAMES - 1), min_size=1, max_size=10))
def test_segments_equal_linear_random(mp4, indices):
    assert torch.equal(read_frames(mp4, indices), read_frames(mp4, indices, strategy="linear"))


def test_segments_decode_a_fragment_per_gop_not_the_whole_span(mp4, monkeypatch):
    decoded: list[int] = []
    original = video._indexed_frames

    def count(*args, **kwargs):
        for index, frame in original(*args, **kwargs):
            decoded.append(index)
            yield index, frame

    monkeypatch.setattr(video, "_indexed_frames", count)
    spread = [4, 21, 38, 55, 72]
    read_frames(mp4, spread, strategy="linear")
    linear = len(decoded)
    decoded.clear()
    read_frames(mp4, spread)
    assert linear >= 72 - 4 + 1 and len(decoded) <= len(spread) * GOP  # each from its GOP's keyframe
    assert {4, 21, 38, 55, 72} <= set(decoded)


def test_unknown_strategy(mp4):
    with pytest.raises(ValueError, match="strategy"):
        read_frames(mp4, [0], strategy="fastest")

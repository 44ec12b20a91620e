"""View sampling: expected values are worked out by hand in each test."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from staprune.data.sampling import (
    ViewProtocol,
    parse_views,
    segment_clip_indices,
    spatial_crop_boxes,
    uniform_clip_indices,
)
from staprune.families import family_named


def protocol(family: str, dataset: str) -> ViewProtocol:
    return family_named(family).protocol(dataset)

# ---------------------------------------------------------------- uniform (K400) clips


def test_uniform_k400_vit_five_clips():
    # span = 16 * 4 = 64, slack = 300 - 64 = 236, starts = i * 236 / 4 = 0, 59, 118, 177, 236.
    clips = uniform_clip_indices(300, clip_len=16, stride=4, num_clips=5)
    assert [c[0] for c in clips] == [0, 59, 118, 177, 236]
    assert clips[1] == [59 + 4 * j for j in range(16)]
    assert clips[-1][-1] == 296  # 236 + 15 * 4: the last span (236..299) ends on the last frame


def test_uniform_starts_are_floored():
    # slack = 101 - 64 = 37; 37 * i / 4 = 0, 9.25, 18.5, 27.75, 37.
    assert [c[0] for c in uniform_clip_indices(101, 16, 4, 5)] == [0, 9, 18, 27, 37]


def test_uniform_single_clip_is_centred():
    # slack 236 -> start 118; slack 37 -> 18 (floored).
    assert uniform_clip_indices(300, 16, 4, 1)[0][0] == 118
    assert uniform_clip_indices(101, 16, 4, 1)[0][0] == 18


def test_uniform_short_video_clamps_to_last_frame():
    clips = uniform_clip_indices(20, clip_len=16, stride=4, num_clips=3)
    expected = [0, 4, 8, 12, 16] + [19] * 11
    assert clips == [expected] * 3


def test_uniform_exact_fit():
    assert uniform_clip_indices(64, 16, 4, 2) == [list(range(0, 64, 4))] * 2


@pytest.mark.parametrize("bad", [dict(num_frames=0), dict(clip_len=0), dict(stride=-1), dict(num_clips=0)])
def test_uniform_rejects_non_positive(bad):
    args = dict(num_frames=100, clip_len=16, stride=4, num_clips=5) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        uniform_clip_indices(**args)


@given(
    num_frames=st.integers(1, 2000),
    clip_len=st.integers(1, 40),
    stride=st.integers(1, 8),
    num_clips=st.integers(1, 10),
)
def test_uniform_properties(num_frames, clip_len, stride, num_clips):
    clips = uniform_clip_indices(num_frames, clip_len, stride, num_clips)
    assert len(clips) == num_clips and all(len(c) == clip_len for c in clips)
    assert all(0 <= i < num_frames for c in clips for i in c)
    starts = [c[0] for c in clips]
    assert starts == sorted(starts)
    if num_frames >= clip_len * stride:  # long enough: no clamping, exact stride, full coverage
        assert all(b - a == stride for c in clips for a, b in zip(c, c[1:], strict=False))
        if num_clips > 1:  # first clip at frame 0, last clip's final step lands on the last stride
            assert starts[0] == 0 and clips[-1][-1] == num_frames - stride


# ---------------------------------------------------------------- segment (SSV2) clips


def test_segment_integer_segments():
    # seg = 32 / 4 = 8; clip 0 offset 8 * 0.5 / 2 = 2, clip 1 offset 8 * 1.5 / 2 = 6.
    assert segment_clip_indices(32, clip_len=4, num_clips=2) == [[2, 10, 18, 26], [6, 14, 22, 30]]


def test_segment_fractional_segments():
    # seg = 10 / 4 = 2.5; clip 0 offset 0.625 -> 0.625, 3.125, 5.625, 8.125
    #                     clip 1 offset 1.875 -> 1.875, 4.375, 6.875, 9.375
    assert segment_clip_indices(10, 4, 2) == [[0, 3, 5, 8], [1, 4, 6, 9]]
    # one clip: middle of each segment, 1.25, 3.75, 6.25, 8.75
    assert segment_clip_indices(10, 4, 1) == [[1, 3, 6, 8]]


def test_segment_short_video_repeats_frames():
    # seg = 3 / 8 = 0.375, offset 0.1875: 0.19, 0.56, 0.94, 1.31, 1.69, 2.06, 2.44, 2.81
    assert segment_clip_indices(3, 8, 1) == [[0, 0, 0, 1, 1, 2, 2, 2]]
    assert segment_clip_indices(1, 4, 2) == [[0] * 4, [0] * 4]


@given(num_frames=st.integers(1, 1000), clip_len=st.integers(1, 32), num_clips=st.integers(1, 6))
def test_segment_each_index_lies_in_its_segment(num_frames, clip_len, num_clips):
    clips = segment_clip_indices(num_frames, clip_len, num_clips)
    assert len(clips) == num_clips and all(len(c) == clip_len for c in clips)
    for clip in clips:
        for j, idx in enumerate(clip):
            # seg*j <= idx < seg*(j+1), written without division.
            assert idx * clip_len < num_frames * (j + 1)
            assert (idx + 1) * clip_len > num_frames * j
            assert 0 <= idx < num_frames
    if num_frames >= clip_len * num_clips:  # enough frames: the clips never pick the same frame
        flat = [i for c in clips for i in c]
        assert len(set(flat)) == len(flat)


# ---------------------------------------------------------------- spatial crops


def test_crops_landscape():
    # slack along width = 300 - 224 = 76 -> lefts 0, 38, 76.
    assert spatial_crop_boxes(224, 300, 224, 3) == [(0, 0, 224, 224), (0, 38, 224, 224), (0, 76, 224, 224)]
    assert spatial_crop_boxes(224, 300, 224, 1) == [(0, 38, 224, 224)]


def test_crops_portrait():
    # slack along height = 398 - 224 = 174 -> tops 0, 87, 174.
    assert spatial_crop_boxes(398, 224, 224, 3) == [(0, 0, 224, 224), (87, 0, 224, 224), (174, 0, 224, 224)]
    assert spatial_crop_boxes(398, 224, 224, 1) == [(87, 0, 224, 224)]


def test_crops_odd_slack_and_centred_short_side():
    # width slack 77 -> 0, 38, 77; height slack 6 -> top 3 for every crop.
    assert spatial_crop_boxes(230, 301, 224, 3) == [(3, 0, 224, 224), (3, 38, 224, 224), (3, 77, 224, 224)]


def test_crops_square_frame():
    assert spatial_crop_boxes(224, 224, 224, 3) == [(0, 0, 224, 224)] * 3


def test_crops_reject_small_frames():
    with pytest.raises(ValueError, match="smaller than crop size"):
        spatial_crop_boxes(200, 300, 224, 3)
    with pytest.raises(ValueError, match="num_crops"):
        spatial_crop_boxes(224, 300, 224, 0)


# ---------------------------------------------------------------- protocol table (the paper's Sec. 4.1)


@pytest.mark.parametrize(
    ("family", "dataset", "expected"),
    [
        ("videomae", "k400", (5, 3, 16, 4, "uniform")),
        ("videomae", "ssv2", (2, 3, 16, 2, "segment")),
        ("swin3d", "k400", (4, 3, 32, 2, "uniform")),
        ("swin3d", "ssv2", (1, 3, 32, 2, "uniform")),
        ("videomae", "K400", (5, 3, 16, 4, "uniform")),
    ],
)
def test_protocol_table(family, dataset, expected):
    p = protocol(family, dataset)
    assert (p.clips, p.crops, p.frames, p.stride, p.sampling) == expected
    assert p.num_views == expected[0] * expected[1]


def test_protocol_clip_indices_dispatch():
    vit_ssv2 = protocol("videomae", "ssv2")
    assert vit_ssv2.clip_indices(64) == segment_clip_indices(64, 16, 2)
    swin_k400 = protocol("swin3d", "k400")
    assert swin_k400.clip_indices(300) == uniform_clip_indices(300, 32, 2, 4)
    assert ViewProtocol(1, 1, 4, 2, "uniform").clip_indices(20) == [[6, 8, 10, 12]]


def test_protocol_errors_list_valid_names():
    with pytest.raises(ValueError, match="unknown model family 'resnet'; known: videomae, swin3d"):
        protocol("resnet", "k400")
    with pytest.raises(ValueError, match="unknown dataset 'ucf101'; valid: k400, ssv2"):
        protocol("videomae", "ucf101")


@pytest.mark.parametrize(("text", "expected"), [("5x3", (5, 3)), ("2X3", (2, 3)), (" 4 x 1 ", (4, 1))])
def test_parse_views(text, expected):
    assert parse_views(text) == expected


@pytest.mark.parametrize("text", ["", "5", "5x", "x3", "0x3", "5x0", "5x3x1", "axb", "-1x3", "5*3", "2.5x3"])
def test_parse_views_rejects(text):
    with pytest.raises(ValueError, match="<clips>x<crops>"):
        parse_views(text)

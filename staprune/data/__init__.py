"""Data loading: decoding (video), dataset lists (lists), view sampling (sampling), preprocessing
(transforms) and a small encoder for tests/demos (encode)."""

from .encode import encoder_available, pick_codec, write_video
from .lists import VIDEO_SUFFIXES, VideoItem, load_items, read_list, scan_folders
from .sampling import (
    DATASETS,
    ViewProtocol,
    parse_views,
    segment_clip_indices,
    spatial_crop_boxes,
    uniform_clip_indices,
)
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    crop,
    make_views,
    normalize,
    resize_short_side,
    to_channels_first_time,
)
from .video import VideoInfo, VideoReadError, probe, read_frames

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Preprocessing",
    "VIDEO_SUFFIXES",
    "VideoInfo",
    "VideoItem",
    "VideoReadError",
    "ViewProtocol",
    "crop",
    "encoder_available",
    "load_items",
    "make_views",
    "normalize",
    "parse_views",
    "pick_codec",
    "probe",
    "read_frames",
    "read_list",
    "resize_short_side",
    "scan_folders",
    "segment_clip_indices",
    "spatial_crop_boxes",
    "to_channels_first_time",
    "uniform_clip_indices",
    "write_video",
]

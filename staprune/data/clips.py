"""Labelled clip sets for training and in-memory evaluation.

* :class:`ClipTensorSet`: clips already in memory (the generated demo clips), as ``staprune
  finetune --demo`` trains and scores them and as ``staprune ablate`` scores its held-out clips;
* :class:`ListClipSet`: one random, augmented training clip per video of a dataset list, decoded on
  demand (``staprune finetune --data``); :func:`readable_items` leaves out the videos that do not open.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..core.errors import DataError
from .lists import VideoItem
from .transforms import Preprocessing, normalize, resize_short_side
from .video import VideoReadError, probe, read_frames


class ClipTensorSet:
    """Clips held in memory as uint8 ``(N, T, 3, H, W)`` with labels ``(N,)``.

    ``prep`` (the model's normalisation) is needed only by :meth:`batch`; scoring through
    :func:`staprune.api.evaluation.score_clips` takes the raw ``clips`` and normalises itself.
    """

    def __init__(self, clips: Tensor, labels: Tensor, prep: Preprocessing | None = None):
        self.clips, self.labels, self.prep = clips, labels, prep

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised float views ``(B, T, 3, H, W)`` and labels ``(B,)`` of the clips at ``indices`` ``(B,)``."""
        if self.prep is None:
            raise ValueError("ClipTensorSet.batch needs the model's preprocessing (prep)")
        x = self.clips[indices].float().div_(255.0)
        mean = torch.tensor(self.prep.mean).view(3, 1, 1)
        std = torch.tensor(self.prep.std).view(3, 1, 1)
        return (x - mean) / std, self.labels[indices]

    def shard(self, rank: int, world_size: int) -> ClipTensorSet:
        """Every ``world_size``-th clip from ``rank`` (``clips[rank::world_size]``): one rank's share,
        no padding, so each clip is scored exactly once over all ranks."""
        mine = torch.arange(len(self))[rank::world_size]
        return ClipTensorSet(self.clips[mine], self.labels[mine], self.prep)


class ListClipSet(Dataset):
    """One random training clip per video of a list; item ``(index, seed)`` -> ``(views, label)``.

    The clip is ``frames`` frames at ``stride`` from a random start (indices past the end repeat the
    last frame), short side resized to ``prep.size``, a random ``size x size`` crop, an optional
    horizontal flip, normalised: float ``(T, 3, size, size)``. All randomness comes from ``seed``, so
    an epoch's augmentation is a function of the seeds it is given (exact resume).
    """

    def __init__(self, items: Sequence[VideoItem], frames: int, stride: int, prep: Preprocessing, flip: bool,
                 who: str = "staprune finetune"):
        self.items, self.frames, self.stride, self.prep, self.flip = list(items), frames, stride, prep, flip
        self.who = who  # the prefix of the one line said about a video skipped while training

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        index, seed = key
        for attempt in range(len(self.items)):  # an unreadable video is replaced by the next one
            item = self.items[(index + attempt) % len(self.items)]
            try:
                return self.clip(item.path, seed), item.label
            except VideoReadError as e:  # opened at setup, fails to decode now: one line, the next video instead
                print(f"{self.who}: skipping training video {item.path}: {e.reason}", file=sys.stderr, flush=True)
        raise DataError("no training video of the list could be decoded; check --data and --root")

    def clip(self, path: Path, seed: int) -> Tensor:
        """The augmented clip ``(T, 3, size, size)`` of the video at ``path`` drawn from ``seed``."""
        g = torch.Generator().manual_seed(int(seed))
        n = probe(path).num_frames
        span = (self.frames - 1) * self.stride + 1
        start = int(torch.randint(0, max(1, n - span + 1), (1,), generator=g))
        frames = read_frames(path, [min(start + k * self.stride, n - 1) for k in range(self.frames)])
        x = resize_short_side(frames, self.prep.size)  # (T, 3, H', W') in [0, 1]
        size = self.prep.size
        top = int(torch.randint(0, x.shape[-2] - size + 1, (1,), generator=g))
        left = int(torch.randint(0, x.shape[-1] - size + 1, (1,), generator=g))
        x = x[..., top : top + size, left : left + size]
        if self.flip and bool(torch.rand(1, generator=g) < 0.5):
            x = x.flip(-1)
        return normalize(x, self.prep.mean, self.prep.std).contiguous()


def readable_items(items: Sequence[VideoItem], who: str = "staprune finetune") -> list[VideoItem]:
    """The videos of ``items`` that open (their headers read); the others are said once, with the
    first reason, on stderr. Raises :class:`~staprune.core.errors.DataError` if none opens."""
    readable, failed = [], []
    for item in items:
        try:
            probe(item.path)
            readable.append(item)
        except VideoReadError as err:
            failed.append((item.path, err.reason))
    if not readable:
        raise DataError(f"no training video of the list could be read (first: {failed[0][0]}: {failed[0][1]}); "
                        "check --data and --root")
    if failed:
        print(f"{who}: {len(failed)} of {len(items)} training videos cannot be read and are left out "
              f"(first: {failed[0][0]}: {failed[0][1]})", file=sys.stderr, flush=True)
    return readable


__all__ = ["ClipTensorSet", "ListClipSet", "readable_items"]

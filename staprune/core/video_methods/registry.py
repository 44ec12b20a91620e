"""The registry of video-token methods: what a method is given, what it returns, and the one
function (:func:`select_video_tokens`) every video LLM calls for each video.

A method is a function of one video's tokens and layout (plus what it declares it needs: the
vision keys, each token's pixel change, seeded noise) and the tokens to keep per temporal unit; it
returns the kept indices, or the kept indices and their merged values for a method that merges.
The budget is the same for every method: ``keep`` tokens per unit (:func:`kept_per_unit`), so two
methods at one ``keep_ratio`` differ only in which tokens they keep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import STAConfig, register_method_name
from ..errors import UsageError
from ..score import PerSampleRandom
from .layout import VideoLayout, kept_per_unit

NEEDS = ("keys", "pixel_change", "noise")  # what a method may ask the model's adapter for


@dataclass(frozen=True)
class VideoTokens:
    """One video as the language model would receive it, and what its method asked for.

    Attributes:
        tokens: ``(L_v, C)`` the video's projected tokens, ``L_v = layout.tokens``.
        layout: its temporal units.
        keys: ``(L_v, c)`` the vision tower's keys, one row per token (``"keys"``), else None.
        change: ``(units, per_unit)`` each token's pixel change since the previous unit
            (``"pixel_change"``), else None.
        rng: the video's own seeded noise (``"noise"``), else None.
    """

    tokens: Tensor
    layout: VideoLayout
    keys: Tensor | None = None
    change: Tensor | None = None
    rng: PerSampleRandom | None = None


@dataclass(frozen=True)
class Selection:
    """What a merging method returns: ``kept`` ``(K,)`` ascending indices into the video's units and
    ``merged`` ``(K, C)`` the values those tokens take (each kept token with what merged into it)."""

    kept: Tensor
    merged: Tensor | None = None


SelectFn = Callable[[VideoTokens, int, STAConfig], "Tensor | Selection"]


@dataclass(frozen=True)
class VideoMethod:
    """A video-token method.

    Attributes:
        name: what ``method=`` names (``staprune.patch(model, keep_ratio=k, method=name)``).
        select: ``(video, keep, config)`` -> the kept indices ``(K,)`` into ``video.layout.body``
            (any order) or a :class:`Selection`; ``keep`` tokens per unit on average.
        needs: ``config`` -> what the method reads besides the tokens (a subset of :data:`NEEDS`).
        kept_count: ``(layout, keep)`` -> tokens kept of the body (FLOPs before a model runs);
            default ``layout.units * keep``.
        description: one line for listings and the docs.
    """

    name: str
    select: SelectFn
    needs: Callable[[STAConfig], frozenset[str]] = lambda config: frozenset()
    kept_count: Callable[[VideoLayout, int], int] = lambda layout, keep: layout.units * keep
    description: str = ""


_methods: dict[str, VideoMethod] = {}


def register_video_method(method: VideoMethod) -> VideoMethod:
    """Add a method (a second one of the same name replaces the first); ``STAConfig`` accepts its name."""
    unknown = set(method.needs(STAConfig())) - set(NEEDS)
    if unknown:
        raise UsageError(f"video method {method.name!r} needs {sorted(unknown)}; a method may need {', '.join(NEEDS)}")
    _methods[method.name] = method
    register_method_name(method.name)
    return method


def unregister_video_method(name: str) -> None:
    """Remove a registered method (a test's, a plugin's being unloaded); ``STAConfig`` still parses
    its name, and a family refuses it as unknown."""
    _methods.pop(name, None)


def video_method(name: str) -> VideoMethod:
    """The method called ``name``."""
    if name not in _methods:
        raise UsageError(f"unknown video-token method {name!r}; known: {', '.join(video_method_names())}")
    return _methods[name]


def video_method_names() -> list[str]:
    """Every registered video-token method, in registration order (``none`` not included)."""
    return list(_methods)


def needs_of(config: STAConfig) -> frozenset[str]:
    """What ``config``'s method reads besides the tokens (nothing for ``method="none"``)."""
    return frozenset() if config.method == "none" else video_method(config.method).needs(config)


def kept_tokens_of(layout: VideoLayout, config: STAConfig) -> int:
    """Tokens one video of ``layout`` keeps under ``config``, the tail included."""
    if config.method == "none":
        return layout.tokens
    keep = kept_per_unit(config, layout.per_unit)  # r=0 or keep_ratio=1: the whole unit
    if keep == layout.per_unit:
        return layout.tokens
    return video_method(config.method).kept_count(layout, keep) + layout.tail


def select_video_tokens(video: VideoTokens, config: STAConfig) -> Selection:
    """The kept tokens of one video under ``config``'s method and budget.

    Returns:
        a :class:`Selection`: ``kept`` ``(K,)`` long, ascending indices into the video's placeholder
        tokens (the ``tail`` always included) and, for a merging method, ``merged`` ``(K, C)``.
    """
    layout, device = video.layout, video.tokens.device
    keep = kept_per_unit(config, layout.per_unit)
    tail = torch.arange(layout.body, layout.tokens, device=device)
    if keep == layout.per_unit or config.method == "none":
        return Selection(torch.arange(layout.tokens, device=device))
    chosen = video_method(config.method).select(video, keep, config)
    if isinstance(chosen, Tensor):
        return Selection(torch.cat([chosen.sort().values, tail]))
    kept = torch.cat([chosen.kept, tail])
    merged = None if chosen.merged is None else torch.cat([chosen.merged, video.tokens[tail]])
    return Selection(kept, merged)


__all__ = ["NEEDS", "Selection", "VideoMethod", "VideoTokens", "kept_tokens_of", "needs_of", "register_video_method",
           "select_video_tokens", "unregister_video_method", "video_method", "video_method_names"]

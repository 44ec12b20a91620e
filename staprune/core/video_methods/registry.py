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
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import STAConfig, register_method_name
from ..errors import ConfigError, UsageError
from ..score import PerSampleRandom
from ..selection_hook import selection_function
from .layout import VideoLayout, kept_per_unit

NEEDS = ("keys", "pixel_change", "noise", "attention")  # what a method may ask the model's adapter for


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
        attention: ``(L_v,)`` the attention each token received (``"attention"``): in the vision
            tower for a method before the language model (what that is for each tower:
            docs/families/methods.md), from the last prompt token in the layer before ``after_layer`` for a
            method inside it; else None.
    """

    tokens: Tensor
    layout: VideoLayout
    keys: Tensor | None = None
    change: Tensor | None = None
    rng: PerSampleRandom | None = None
    attention: Tensor | None = None


@dataclass(frozen=True)
class Selection:
    """What a merging method returns: ``kept`` ``(K,)`` ascending indices into the video's units and
    ``merged`` ``(K, C)`` the values those tokens take (each kept token with what merged into it)."""

    kept: Tensor
    merged: Tensor | None = None


@dataclass(frozen=True)
class MethodOption:
    """One of a method's own options (a keyword of ``staprune.patch``, ``--method-option NAME=VALUE``).

    Attributes:
        name: the keyword, prefixed with the method's name (``fastv_layer``) so it never clashes.
        default: the published default (its type is the option's type).
        valid: value -> whether it is in range.
        accepts: what ``valid`` accepts, as the error states it (``an integer >= 0``).
        help: one line for listings and the docs.
    """

    name: str
    default: int | float | str | bool
    valid: Callable[[object], bool]
    accepts: str
    help: str = ""

    def check(self, method: str, value: object) -> None:
        """Raise :class:`ConfigError` in one line unless ``value`` is of the option's type and valid."""
        kind = type(self.default)
        typed = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            typed = True
        if not typed or not self.valid(value):
            raise ConfigError(f"{self.name}={value!r} is not valid for method={method!r}: give {self.accepts} "
                              f"(default {self.default!r})")


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
        options: the method's own options, at their published defaults unless given
            (:func:`method_options` reads them).
        after_layer: for a method that acts inside the language model: ``config`` -> the decoder
            layer after which it selects (it reads ``"attention"``: what the last prompt token paid
            each video token in the layer before); None for a method that selects before the
            language model (all but FastV).
    """

    name: str
    select: SelectFn
    needs: Callable[[STAConfig], frozenset[str]] = lambda config: frozenset()
    kept_count: Callable[[VideoLayout, int], int] = lambda layout, keep: layout.units * keep
    description: str = ""
    options: tuple[MethodOption, ...] = field(default_factory=tuple)
    after_layer: Callable[[STAConfig], int] | None = None

    def check_options(self, given: dict) -> None:
        """Raise :class:`ConfigError` for a value out of range (names are checked by ``STAConfig``)."""
        by_name = {o.name: o for o in self.options}
        for name, value in given.items():
            by_name[name].check(self.name, value)


_methods: dict[str, VideoMethod] = {}


def register_video_method(method: VideoMethod) -> VideoMethod:
    """Add a method (a second one of the same name replaces the first); ``STAConfig`` accepts its name."""
    unknown = set(method.needs(STAConfig())) - set(NEEDS)
    if unknown:
        raise UsageError(f"video method {method.name!r} needs {sorted(unknown)}; a method may need {', '.join(NEEDS)}")
    _methods[method.name] = method
    register_method_name(method.name, frozenset(o.name for o in method.options), method.check_options)
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


def method_options(config: STAConfig) -> dict[str, object]:
    """``config``'s method's own options: those given in ``config.method_options``, the rest at their
    defaults."""
    if config.method not in _methods:
        return {}
    return {o.name: o.default for o in _methods[config.method].options} | dict(config.method_options)


def in_language_model(config: STAConfig) -> int | None:
    """The decoder layer after which ``config``'s method selects inside the language model (FastV), or
    None when it selects before the language model (every other method, and ``none``)."""
    if config.method == "none" or video_method(config.method).after_layer is None:
        return None
    return video_method(config.method).after_layer(config)


VISION_NEEDS = frozenset({"keys", "attention", "pixel_change"})  # the needs read off the vision encoder


def vision_needs_of(config: STAConfig) -> frozenset[str]:
    """What ``config``'s method reads off the vision encoder (a method inside the language model reads
    its ``"attention"`` there, not in the vision tower)."""
    needs = needs_of(config) & VISION_NEEDS
    return needs - {"attention"} if in_language_model(config) is not None else needs


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


@selection_function  # its time and FLOPs are the method's, not the model's
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


__all__ = ["NEEDS", "MethodOption", "Selection", "VideoMethod", "VideoTokens", "in_language_model", "kept_tokens_of", "method_options", "needs_of", "register_video_method", "vision_needs_of",
           "select_video_tokens", "unregister_video_method", "video_method", "video_method_names"]

"""One pruning setting: what a model runs as in a measurement (eval, ablate, bench, finetune, demo).

A :class:`Setting` is a method, its r and the other :class:`~staprune.core.config.STAConfig` fields
set. It has one meaning of **dense**: ``method="none"``, or r=0 with a method that drops tokens
(``sta``, ``random``; ToMe at r=0 still patches), run as staprune's patched model dropping nothing,
``patch(model, r=0, method="none")``. For every family but Video Swin that is the stock model's own
forward; a patched Video Swin runs its window attention through the fused kernel (the same function,
to float rounding), so its dense and pruned rows time the same kernels and a speed-up measures
pruning, not a kernel. ``staprune bench`` times the unpatched stock model beside it where the two
differ (:attr:`staprune.families.Family.stock_kernels_at_r0`). See docs/usage/commands.md#dense.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..core.config import STAConfig
from ..families.base import Family, Spec
from .patching import patch, unpatch


@dataclass(frozen=True)
class Setting:
    """A pruning setting (hashable: settings key result tables and timings).

    Attributes:
        r: tokens dropped per temporal unit at the first stage (Video Swin: r1).
        method: ``sta``, ``random``, ``tome`` or ``none`` (dense); a video LLM's video-token methods.
        options: the other STAConfig fields set, as sorted ``(name, value)`` pairs.
        keep_ratio: a video LLM's budget instead of ``r``: the share of each video's tokens kept.
    """

    r: int = 0
    method: str = "sta"
    options: tuple[tuple[str, Any], ...] = ()
    keep_ratio: float | None = None

    @classmethod
    def of(cls, method: str = "sta", r: int = 0,
           options: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None,
           keep_ratio: float | None = None) -> Setting:
        """A setting from a method, r (or ``keep_ratio``) and the other options (a mapping or
        ``(name, value)`` pairs, sorted into :attr:`options`)."""
        return cls(r, method, tuple(sorted(dict(options or {}).items())), keep_ratio)

    @property
    def is_dense(self) -> bool:
        """Drops nothing: ``method="none"``, or r=0 with a dropping method (and no explicit schedule,
        which gives every stage's r itself)."""
        if self.method == "none":
            return True
        schedule = dict(self.options).get("schedule", "decreasing")
        drops = self.r > 0 or (self.keep_ratio is not None and self.keep_ratio < 1) or (
            not isinstance(schedule, str) and any(r for _, r in schedule))
        return not drops and self.method != "tome"

    def config(self) -> STAConfig:
        """The STAConfig this setting patches with (dense: ``method="none"``, no options)."""
        if self.is_dense:
            return STAConfig(r=0, method="none")
        return STAConfig(r=self.r, method=self.method, keep_ratio=self.keep_ratio, **dict(self.options))

    def apply(self, model: nn.Module) -> nn.Module:
        """Re-patch ``model`` in place for this setting (dense included: see the module docstring)."""
        unpatch(model)
        return patch(model, config=self.config())

    @property
    def label(self) -> str:
        """``dense`` or ``<method> <budget>`` (``sta r=8``, ``sta keep 0.3``): how tables name the setting."""
        return "dense" if self.is_dense else f"{self.method} {self.config().budget}"

    @property
    def recorded_options(self) -> dict[str, Any]:
        """The options as JSON values (schedule pairs and locations as lists)."""
        return recorded(dict(self.options))

    @property
    def dirname(self) -> str:
        """``<method>_r<r>``, then each option set, so that settings never share a run folder."""
        parts = [f"{self.method}_r{self.r}" if self.keep_ratio is None else f"{self.method}_keep{self.keep_ratio:g}"]
        for key, value in sorted(self.options):
            if key == "schedule" and not isinstance(value, str):
                text = "-".join(f"{u}x{r}" for u, r in value)
            else:
                text = "-".join(map(str, value)) if isinstance(value, tuple) else str(value)
            parts.append(re.sub(r"[^A-Za-z0-9.x-]+", "_", f"{key}-{text}"))
        return "_".join(parts)


def check_plans(family: Family, spec: Spec, settings: Iterable[Setting]) -> None:
    """Every pruned setting fits ``spec``'s token grid (no model needed: a registry model is checked
    before it is built).

    Raises:
        ConfigError: an r too large for the token grid (the message states the largest valid r).
    """
    for setting in settings:
        if not setting.is_dense:
            family.plan(spec, setting.config())


def check_settings_fit(family: Family, model: nn.Module, settings: Iterable[Setting], frames: int, size: int) -> None:
    """Every setting patches ``model`` and fits its ``frames`` x ``size``² input, checked before any
    data is made or read (the model is left unpatched).

    Raises:
        ConfigError: an option the family refuses, or an r too large for the token grid (the
            message states the largest valid r).
    """
    spec = family.spec_of(model, frames, size)
    try:
        for setting in settings:
            setting.apply(model)
            check_plans(family, spec, [setting])
    finally:
        unpatch(model)


def recorded(options: dict[str, Any]) -> dict[str, Any]:
    """Options as JSON values (schedule pairs and locations as lists)."""
    return {k: [list(p) for p in v] if k == "schedule" and not isinstance(v, str) else
            (list(v) if isinstance(v, tuple) else v) for k, v in options.items()}


__all__ = ["Setting", "check_plans", "check_settings_fit", "recorded"]

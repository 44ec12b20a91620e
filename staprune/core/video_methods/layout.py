"""A video's placeholder tokens as a video LLM lays them out, and how many of each unit a budget keeps."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import STAConfig
from ..errors import ConfigError


@dataclass(frozen=True)
class VideoLayout:
    """One video's placeholder tokens: ``units`` temporal units of ``rows x cols`` tokens (units in
    temporal order, each unit row-major), then ``tail`` tokens that are never dropped (LLaVA's newline)."""

    units: int
    rows: int
    cols: int
    tail: int = 0

    @property
    def per_unit(self) -> int:
        return self.rows * self.cols

    @property
    def body(self) -> int:
        """The tokens a method chooses from: every unit's, the tail excluded."""
        return self.units * self.per_unit

    @property
    def tokens(self) -> int:
        return self.body + self.tail


def kept_per_unit(config: STAConfig, per_unit: int) -> int:
    """Tokens a temporal unit of ``per_unit`` tokens keeps under ``r`` or ``keep_ratio``.

    Raises:
        ConfigError: the budget empties a unit.
    """
    if config.keep_ratio is not None:
        keep = math.floor(per_unit * config.keep_ratio + 0.5)
        if keep < 1:
            raise ConfigError(
                f"keep_ratio={config.keep_ratio} keeps no token of a temporal unit of {per_unit} tokens; "
                f"the smallest keep_ratio for this video is {1 / per_unit:.4g}"
            )
        return keep
    if config.r >= per_unit:
        raise ConfigError(
            f"r={config.r} drops every token of a temporal unit of {per_unit} tokens; use r <= {per_unit - 1} "
            "or keep_ratio"
        )
    return per_unit - config.r


__all__ = ["VideoLayout", "kept_per_unit"]

"""What the analyses need to know about a backbone, asked of its family (:mod:`staprune.families`):
input layout, token grids, blocks, final tokens.

Every family describes an input as a :class:`~staprune.families.TokenGeometry`: columnar ViTs
(VideoMAE, ViViT, V-JEPA 2, TimeSformer) have one token grid shared by every block and every
pruning stage; Video Swin has one grid per stage and prunes each on its own. ``kept_tokens``
indices are always ``t * h * w + row * w + col`` on the grid the stage refers to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..adapters.state import kept_stages
from ..families import Family, StageGrid, TokenGeometry, family_of


@dataclass(frozen=True)
class Backbone:
    """Geometry of one model for one input size, and its family's answers about it."""

    family: Family
    geometry: TokenGeometry

    @property
    def frames(self) -> int:
        return self.geometry.frames

    @property
    def size(self) -> int:
        return self.geometry.size

    @property
    def tubelet(self) -> int:
        return self.geometry.tubelet

    @property
    def grids(self) -> tuple[StageGrid, ...]:
        return self.geometry.grids

    @property
    def final_grid(self) -> StageGrid:
        return self.geometry.final_grid

    def model_input(self, views: Tensor) -> Tensor:
        """``(B, T, 3, H, W)`` views -> the model's input layout."""
        return self.family.to_input(views)

    def blocks(self, model: nn.Module) -> list[tuple[nn.Module, StageGrid]]:
        """Every transformer block with the grid of its output, in depth order."""
        return [(block, self.grids[k]) for block, k in self.family.blocks(model)]

    def patch_tokens(self, output: Tensor, grid: StageGrid) -> Tensor:
        """A block output (or its gradient) -> ``(B, grid.tokens, C)`` patch tokens, ``t * N + s``."""
        return self.family.patch_tokens(output, grid)

    def kept_grids(self, model: nn.Module) -> list[StageGrid]:
        """The grid each entry of ``staprune.kept_tokens(model)`` refers to (after a forward)."""
        return [self.grids[self.family.kept_grid_index(s)] for s in kept_stages(model)]

    def final_features(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Final-block patch tokens ``(B, L, C)`` and their original flat indices ``(B, L)`` on
        :attr:`final_grid` (``None``: dense, token ``k`` is index ``k``). ``x`` is model input."""
        return self.family.final_features(model, x)


def describe(model: nn.Module, frames: int | None = None, size: int | None = None) -> Backbone:
    """Geometry of ``model`` for ``frames`` x ``size``² input (defaults: the model's configured
    input; Video Swin 32 x 224², the paper's).

    Raises:
        TypeError: a model no family supports.
    """
    family = family_of(model)
    return Backbone(family, family.geometry(family.spec_of(model, frames, size)))


def predicted_loss(logits: Tensor) -> Tensor:
    """Cross-entropy of ``(B, classes)`` logits against their own argmax (summed over the batch)."""
    return torch.nn.functional.cross_entropy(logits, logits.argmax(-1).detach(), reduction="sum")


__all__ = ["Backbone", "StageGrid", "describe", "predicted_loss"]

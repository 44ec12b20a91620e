"""Video classifiers: the family kind of video backbones with a head (VideoMAE, Video Swin, ViViT,
V-JEPA 2, TimeSformer), clips in and class logits out, pruned inside the backbone as the paper does.

What a video-classifier family answers besides the core (:class:`~staprune.families.base.Family`):

* **geometry**: :meth:`VideoClassifierFamily.geometry` gives the token grids of an input;
  :meth:`VideoClassifierFamily.plan` resolves a pruning config for it (``ValueError`` for r too
  large, frames that do not divide); :meth:`VideoClassifierFamily.levels` the paper's levels;
* **input layout and outputs**: :meth:`VideoClassifierFamily.to_input` turns views
  ``(B, T, 3, H, W)`` into what the model's forward takes, :meth:`VideoClassifierFamily.logits`
  unwraps its output;
* **loading** state-dict files (:meth:`VideoClassifierFamily.load_file`) and architectures with a
  weights file (:meth:`VideoClassifierFamily.load_builder`), verified key by key;
* **evaluation protocol**: :meth:`VideoClassifierFamily.protocol`;
* **analysis hooks**: :meth:`VideoClassifierFamily.blocks`, :meth:`VideoClassifierFamily.patch_tokens`,
  :meth:`VideoClassifierFamily.final_features`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.config import CLASSIFIER_METHODS, PruningPlan, STAConfig, Stage
from ..core.errors import ConfigError, UsageError
from ..data.sampling import ViewProtocol
from .base import VIDEO_CLASSIFIER, Family, LoadedModel, Spec, StageGrid, TokenGeometry


class VideoClassifierFamily(Family):
    """Base class of the video-classifier families. Subclasses set the class attributes and
    override the methods (the core's too: :class:`~staprune.families.base.Family`).

    Attributes:
        input_layout: ``BTCHW`` (views as they come) or ``BCTHW`` (channels before time).
        protocols: evaluation protocol per dataset (``k400``, ``ssv2``).
        r_name: what the family's r is called in tables (``r``; Video Swin: ``r1``).
        supports_tome: the ToMe baseline (``method="tome"``) works on this family (it merges
            tokens, which needs an attention that can weigh a token by its size).
        tome_refusal: why ToMe does not apply, for the error of a family that refuses it.
        block_locations: pruning locations are block indices of one columnar stack (the paper's
            ViT placement ``0, L/3, 2L/3``), so the ablations over locations apply.
        stock_kernels_at_r0: a patched model that drops nothing runs the stock model's kernels
            (False for Video Swin, whose patch fuses window attention even at r=0).
        supports_gradient_checkpointing: pruning layers may sit inside transformers' per-layer
            activation checkpointing (their forward replaces the instance's, so they run once).
        no_weight_decay: parameter-name fragments fine-tuning exempts from weight decay (besides
            biases and norms), e.g. Swin's relative-position tables.
    """

    kind = VIDEO_CLASSIFIER
    input_layout: ClassVar[str] = "BTCHW"
    protocols: ClassVar[Mapping[str, ViewProtocol]] = {}
    r_name: ClassVar[str] = "r"
    supports_tome: ClassVar[bool] = False
    tome_refusal: ClassVar[str] = "ToMe is implemented for VideoMAE only"
    block_locations: ClassVar[bool] = True
    stock_kernels_at_r0: ClassVar[bool] = True
    supports_gradient_checkpointing: ClassVar[bool] = False
    no_weight_decay: ClassVar[tuple[str, ...]] = ()

    def methods(self) -> tuple[str, ...]:
        return CLASSIFIER_METHODS

    def check_method(self, config: STAConfig) -> None:
        """Refuse a method this family cannot run (ToMe where :attr:`supports_tome` is False) and the
        video-LLM options (``keep_ratio``, ``positions``)."""
        if config.method == "tome" and not self.supports_tome:
            raise ConfigError(f"method='tome' is not supported for {self.title}: {self.tome_refusal}; use sta, "
                              "random or none")
        if config.method not in self.methods():
            raise ConfigError(f"method={config.method!r} is a video-LLM method; {self.title} takes sta, random, "
                              "tome or none")
        if config.keep_ratio is not None or config.positions != "original":
            raise ConfigError(f"keep_ratio and positions apply to video LLMs; {self.title} prunes r tokens "
                              "per temporal unit: staprune.patch(model, r=...)")

    # geometry ----------------------------------------------------------------------------------
    def geometry(self, spec: Spec) -> TokenGeometry:
        """Token grids of ``spec``'s input."""
        raise NotImplementedError

    def plan(self, spec: Spec, config: STAConfig) -> PruningPlan:
        """``config`` resolved for ``spec``'s geometry (``ValueError`` when it does not fit)."""
        raise NotImplementedError

    def levels(self, spec: Spec) -> tuple[int, ...]:
        """Three pruning levels (non-zero r) for ``spec``: the paper's where they fit, else
        scaled to the token count."""
        raise NotImplementedError

    # input and output --------------------------------------------------------------------------
    def to_input(self, views: Tensor) -> Tensor:
        """Views ``(B, T, 3, H, W)`` -> the model's input layout."""
        if self.input_layout == "BCTHW":
            return views.transpose(1, 2).contiguous()
        return views

    def example_input(self, spec: Spec, batch_size: int = 1, **tensor_kwargs: Any) -> Tensor:
        """A random input for a model of ``spec`` in the model's layout."""
        views = torch.randn(batch_size, spec.frames, spec.in_chans, spec.size, spec.size, **tensor_kwargs)
        return self.to_input(views)

    def logits(self, output: Any) -> Tensor:
        """Logits ``(B, classes)`` from the model's output (HF output object or a tensor)."""
        return output.logits if hasattr(output, "logits") else output

    # loading files ---------------------------------------------------------------------------------
    def load_file(self, path: Path, state: Mapping[str, Tensor], **geometry: Any) -> LoadedModel:
        """A model from a state-dict file this family claims (``geometry``: frames, image_size,
        num_heads for layouts that do not store them)."""
        raise NotImplementedError

    def load_builder(self, name: str, weights: str | Path) -> LoadedModel:
        """One of :attr:`builder_names` with weights from a local file."""
        raise NotImplementedError

    def protocol(self, dataset: str) -> ViewProtocol:
        """Test view protocol for ``dataset``."""
        key = dataset.strip().lower()
        if key not in self.protocols:
            raise UsageError(f"unknown dataset {dataset!r}; valid: {', '.join(self.protocols)}")
        return self.protocols[key]

    # analysis ----------------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> list[tuple[nn.Module, int]]:
        """Every transformer block in depth order, with the index (into :attr:`TokenGeometry.grids`)
        of the grid its output lives on."""
        raise NotImplementedError

    def patch_tokens(self, output: Tensor, grid: StageGrid) -> Tensor:
        """A dense block output (or its gradient) -> ``(B, grid.tokens, C)`` patch tokens in
        ``t * N + s`` order (extra tokens removed)."""
        return output.reshape(output.shape[0], grid.tokens, output.shape[-1])

    def kept_grid_index(self, stage: Stage) -> int:
        """Which grid the indices a pruning stage reports (``staprune.kept_tokens``) refer to."""
        return 0

    def final_features(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Final-block patch tokens ``(B, L, C)`` and their original flat indices ``(B, L)`` on the
        final grid (``None``: dense, token ``k`` is index ``k``). ``x`` is model input."""
        raise NotImplementedError



__all__ = ["VideoClassifierFamily"]

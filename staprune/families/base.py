"""The family interface: everything staprune knows about one kind of model, behind one class.

A *family* is a kind of backbone (Hugging Face VideoMAE, torchvision Video Swin, ViViT, ...).
Its module (``staprune/families/<name>.py``) defines one :class:`Family` subclass and the named
models of its registry (:class:`ModelEntry`). Everything else in staprune (flops, bench, eval,
visualize, analyze, finetune, the demo) asks the family and never branches on family names.

What a family answers:

* **recognition and patching**: :meth:`Family.recognizes`, :meth:`Family.patch` (the adapter:
  it finds the tensors the algorithm needs and applies the indices it returns);
* **geometry**: :meth:`Family.spec_of` reads a :class:`Spec` (width, depth, input) off a built
  model; :meth:`Family.geometry` gives the token grids of an input; :meth:`Family.plan` resolves
  a pruning config for it (``ValueError`` for r too large, frames that do not divide);
* **input layout and outputs**: :meth:`Family.to_input` turns views ``(B, T, 3, H, W)`` into what
  the model's forward takes, :meth:`Family.logits` unwraps its output;
* **FLOPs**: :meth:`Family.flops`, analytic, one multiply-add = one FLOP;
* **building and loading**: :meth:`Family.build` (random weights from a spec), and the loaders
  :meth:`Family.load_folder` (HF folders and hub ids by ``config.json`` ``model_type``) and
  :meth:`Family.load_file` (state-dict files the family recognises), each verified key by key;
* **preprocessing and evaluation protocol**: :meth:`Family.preprocessing`, :meth:`Family.protocol`;
* **analysis hooks**: :meth:`Family.blocks`, :meth:`Family.patch_tokens`, :meth:`Family.final_features`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.config import PruningPlan, STAConfig, Stage
from ..core.errors import ConfigError, UsageError
from ..data.sampling import ViewProtocol
from ..data.transforms import Preprocessing
from ..storage.state_dicts import state_digest


# --- geometry -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageGrid:
    """A token grid: ``frames`` temporal positions of ``height x width`` tokens, each token
    covering ``pixels x pixels`` input pixels (the last row/column may run into padding)."""

    name: str
    frames: int
    height: int
    width: int
    pixels: int

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def tokens(self) -> int:
        return self.frames * self.tokens_per_frame


@dataclass(frozen=True)
class TokenGeometry:
    """How one input clip becomes tokens.

    Attributes:
        frames: input frames per clip; size: input side in pixels (square views).
        tubelet: input frames per temporal token position.
        grids: the token grid of every block stage (columnar ViTs: one; Video Swin: one per stage).
        extra_tokens: tokens that belong to no grid position (a CLS token), never pruned.
    """

    frames: int
    size: int
    tubelet: int
    grids: tuple[StageGrid, ...]
    extra_tokens: int = 0

    @property
    def final_grid(self) -> StageGrid:
        return self.grids[-1]


class Spec:
    """Geometry of a model as plain data (analytic FLOPs never build a model).

    Every family's spec is a frozen dataclass deriving from this, with at least the fields
    ``frames``, ``size``, ``num_classes`` and ``in_chans``; ``family`` names the owning family.
    """

    family: ClassVar[str] = ""
    frames: int
    size: int
    num_classes: int
    in_chans: int

    def with_input(self, frames: int | None = None, size: int | None = None) -> Spec:
        """The same model on another input clip (``None`` keeps the current value)."""
        changes = {k: v for k, v in (("frames", frames), ("size", size)) if v is not None}
        for key, value in changes.items():
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ConfigError(f"--{key} must be a positive integer, got {value!r}")
        patch = getattr(self, "patch", None)
        if size is not None and isinstance(patch, int) and size % patch:
            # Square patches cut the frame without padding: the last row and column would be lost.
            lower, upper = size // patch * patch, (size // patch + 1) * patch
            fits = " or ".join(str(v) for v in (lower, upper) if v)
            raise ConfigError(f"an input side of {size} pixels is not a multiple of this model's {patch}-pixel "
                              f"patches; use {fits}")
        tubelet = getattr(self, "tubelet", None)
        if frames is not None and isinstance(tubelet, int) and tubelet > 1:
            check_frames(int(frames), tubelet, "this model")  # before a model is built for it
        return replace(self, **changes) if changes else self


# --- geometry helpers every family uses ---------------------------------------------------------
PAPER_VIT_LEVELS = (32, 48, 64)  # the paper's r for ViTs: tokens dropped per tubelet-frame of 196


def scaled_levels(tokens_per_frame: int, reference: tuple[int, ...] = PAPER_VIT_LEVELS, of: int = 196) -> tuple[int, ...]:
    """The paper's levels (default r = 32/48/64 of 196 tokens per tubelet-frame) scaled to another
    grid: the same share of each frame is dropped (49 tokens: 8/12/16; 256 tokens: 42/63/84)."""
    return tuple(max(1, round(tokens_per_frame * r / of)) for r in reference)


def check_frames(spec_frames: int, tubelet: int, what: str) -> int:
    """Tubelet-frames of a clip, refusing a clip length the tubelet does not divide."""
    if spec_frames % tubelet:
        lower = spec_frames - spec_frames % tubelet
        nearest = [v for v in (lower, lower + tubelet) if v > 0]  # 1 frame of tubelet 2: "use 2", not "2 or 2"
        raise ConfigError(
            f"{what} cuts clips into tubelets of {tubelet} frames: {spec_frames} frames is not a multiple of "
            f"{tubelet}; use {' or '.join(map(str, nearest))} frames"
        )
    return spec_frames // tubelet


def side(size: int | tuple[int, ...] | list[int]) -> int:
    """The first side of a HF config's ``image_size`` / ``patch_size`` (an int or a pair)."""
    return size if isinstance(size, int) else size[0]


def check_fixed_clip(pixels: Tensor, frames: int, channels: int, size: int, what: str, why: str) -> None:
    """Refuse an input ``(B, T, C, H, W)`` other than the ``frames x channels x size²`` clips a model
    is built for (``why``: what fixes it, e.g. its position table)."""
    expected = (frames, channels, size, size)
    if pixels.dim() != 5 or tuple(pixels.shape[1:]) != expected:
        raise ConfigError(
            f"{what} takes clips (B, {', '.join(map(str, expected))}) (B, T, 3, H, W): {why}; got {tuple(pixels.shape)}"
        )


def capture_output(module: nn.Module, run: Callable[[], Any]) -> Any:
    """What ``module``'s forward returns while ``run()`` runs (its first call)."""
    captured: list[Any] = []
    handle = module.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        run()
    finally:
        handle.remove()
    return captured[0]


# --- a loaded model -----------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model ready for evaluation, plus what the commands must know about it.

    Attributes:
        model: the network (eval mode, CPU, float32 when freshly loaded).
        family: the :class:`Family` that knows its layout, geometry and FLOPs.
        preprocessing: resize/crop size and normalisation for this checkpoint.
        num_classes: width of the classifier.
        frames: input frames the model is built for (None: any, as for Video Swin).
        image_size: input side the model is built for (None: any).
        source: human-readable origin, for logs and ``results.json``.
        protocols: evaluation protocols that replace the family's (dataset -> protocol), e.g. the
            demo models' 16 consecutive frames.
        levels: default pruning levels of this model (None: the family's for its geometry).
        pruning: the STAConfig the model was saved with and is patched with (``save_pretrained`` of a
            patched model, a ``staprune finetune`` checkpoint), or None.
    """

    model: nn.Module
    family: Family
    preprocessing: Preprocessing
    num_classes: int
    frames: int | None
    image_size: int | None
    source: str
    protocols: Mapping[str, ViewProtocol] | None = None
    levels: tuple[int, ...] | None = None
    pruning: STAConfig | None = None
    _digest: str | None = field(default=None, repr=False, compare=False)

    def to_input(self, views: Tensor) -> Tensor:
        """Views ``(B, T, 3, H, W)`` -> the model's input layout."""
        return self.family.to_input(views)

    def logits(self, views: Tensor) -> Tensor:
        """Views ``(B, T, 3, H, W)`` in the model's dtype/device -> logits ``(B, num_classes)``."""
        return self.family.logits(self.model(self.family.to_input(views)))

    def protocol(self, dataset: str) -> ViewProtocol:
        """The test view protocol for ``dataset`` (``k400`` or ``ssv2``); a model built for a fixed
        clip length reads clips of that length."""
        if self.protocols and dataset in self.protocols:
            base = self.protocols[dataset]
        else:
            base = self.family.protocol(dataset)
        return replace(base, frames=self.frames) if self.frames and base.frames != self.frames else base

    def default_levels(self, frames: int | None = None, size: int | None = None) -> tuple[int, ...]:
        """Pruning levels (non-zero r) that suit this model's geometry."""
        if self.levels is not None:
            return self.levels
        return self.family.levels(self.family.spec_of(self.model, frames or self.frames, size or self.image_size))

    def digest(self) -> str:
        """SHA-1 of the model's weights (:func:`staprune.storage.state_dicts.state_digest`), computed
        once: results record it, so a resumed run is the same model, not just the same name."""
        if self._digest is None:
            self._digest = state_digest(self.model)
        return self._digest

    def default_r(self, frames: int | None = None, size: int | None = None) -> int:
        """The middle of :meth:`default_levels`: the r commands use when none is given (as the paper
        trains STA48-ViT-B, levels 32/48/64)."""
        levels = self.default_levels(frames, size)
        return levels[len(levels) // 2]


# --- named models -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelEntry:
    """A registry name: a model geometry to build with random weights (timing, FLOPs), or with
    weights of its own (``loader``, e.g. the bundled demo models).

    Attributes:
        name: what users type (``--model ViT-B``).
        family: the owning family's name.
        spec: geometry (and what :meth:`Family.build` builds).
        levels: default non-zero r values (paper levels); None: the family's for the geometry.
        paper_gflops: published GFLOPs per view at the paper's input, by r (the FLOPs tables).
        loader: the model with weights of its own: ``loader(weights)`` with ``weights`` one of
            ``auto`` (its own if available, else untrained), ``bundled`` (its own, or
            FileNotFoundError) or ``random`` (untrained, drawn from torch's global RNG);
            None: the family's :meth:`Family.build` of ``spec`` (random weights).
        fixed_input: the model takes only ``spec``'s frames and size.
        protocols: evaluation protocols replacing the family's (dataset -> protocol).
        preprocessing: normalisation replacing the family's default.
        description: one line for listings.
    """

    name: str
    family: str
    spec: Spec
    levels: tuple[int, ...] | None = None
    paper_gflops: Mapping[int, float] | None = None
    loader: Callable[[str], LoadedModel] | None = None
    fixed_input: bool = False
    protocols: Mapping[str, ViewProtocol] | None = None
    preprocessing: Preprocessing | None = None
    description: str = ""

    def spec_for(self, frames: int | None = None, size: int | None = None) -> Spec:
        """This entry's geometry on another input (refused for fixed-input models)."""
        if self.fixed_input and (frames or self.spec.frames, size or self.spec.size) != (
            self.spec.frames,
            self.spec.size,
        ):
            raise ConfigError(
                f"{self.name} takes {self.spec.frames}x{self.spec.size}x{self.spec.size} clips only "
                f"(got frames={frames}, size={size}); leave out the frame count and the image size options"
            )
        return self.spec.with_input(frames, size)


# --- the family interface -----------------------------------------------------------------------
class Family:
    """Base class of a model family. Subclasses set the class attributes and override the methods.

    Attributes:
        name: short name (``videomae``), the key of the registry and of :attr:`Spec.family`.
        title: what the family covers, for listings and errors.
        classes: the model classes it patches, for the "unsupported model" TypeError.
        hf_model_types: ``config.json`` ``model_type`` values of HF folders it loads.
        input_layout: ``BTCHW`` (views as they come) or ``BCTHW`` (channels before time).
        protocols: evaluation protocol per dataset (``k400``, ``ssv2``).
        r_name: what the family's r is called in tables (``r``; Video Swin: ``r1``).
        builder_names: architecture names that take a weights file (``--model swin3d_t --weights F``).
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
        video_llm: a video LLM (pruned before its language model): takes ``keep_ratio``,
            ``positions`` and ``method="uniform"``/``"static"``, which the video classifiers refuse.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    classes: ClassVar[tuple[str, ...]] = ()
    hf_model_types: ClassVar[tuple[str, ...]] = ()
    input_layout: ClassVar[str] = "BTCHW"
    protocols: ClassVar[Mapping[str, ViewProtocol]] = {}
    r_name: ClassVar[str] = "r"
    builder_names: ClassVar[tuple[str, ...]] = ()
    supports_tome: ClassVar[bool] = False
    tome_refusal: ClassVar[str] = "ToMe is implemented for VideoMAE only"
    block_locations: ClassVar[bool] = True
    stock_kernels_at_r0: ClassVar[bool] = True
    supports_gradient_checkpointing: ClassVar[bool] = False
    no_weight_decay: ClassVar[tuple[str, ...]] = ()
    video_llm: ClassVar[bool] = False

    # recognition and patching ------------------------------------------------------------------
    def recognizes(self, model: nn.Module) -> bool:
        """Whether ``model`` is one this family patches."""
        raise NotImplementedError

    def check_method(self, config: STAConfig) -> None:
        """Refuse a method this family cannot run (ToMe where :attr:`supports_tome` is False)."""
        if config.method == "tome" and not self.supports_tome:
            others = ("sta", "random", "uniform", "static", "none") if self.video_llm else ("sta", "random", "none")
            raise ConfigError(
                f"method='tome' is not supported for {self.title}: {self.tome_refusal}; use "
                f"{', '.join(others[:-1])} or {others[-1]}"
            )
        if not self.video_llm:
            if config.method in ("uniform", "static"):
                raise ConfigError(f"method={config.method!r} is a video-LLM baseline; {self.title} "
                                  "takes sta, random, tome or none")
            if config.keep_ratio is not None or config.positions != "original":
                raise ConfigError(f"keep_ratio and positions apply to video LLMs; {self.title} prunes r tokens "
                                  "per temporal unit: staprune.patch(model, r=...)")

    def patch(self, model: nn.Module, config: STAConfig) -> nn.Module:
        """Patch ``model`` in place (see :func:`staprune.patch`); validates ``config`` first."""
        raise NotImplementedError

    # geometry ----------------------------------------------------------------------------------
    def spec_of(self, model: nn.Module, frames: int | None = None, size: int | None = None) -> Spec:
        """The geometry of a built model, optionally on another input clip."""
        raise NotImplementedError

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

    # FLOPs, building, loading ------------------------------------------------------------------
    def flops(self, spec: Spec, config: STAConfig):
        """Analytic :class:`staprune.core.flops.FlopCount` of one view of ``spec`` under ``config``."""
        raise NotImplementedError

    def build(self, spec: Spec, attn_implementation: str = "sdpa") -> nn.Module:
        """A model of ``spec`` with random weights, in eval mode."""
        raise NotImplementedError

    def tiny_model(self, seed: int = 0, **overrides: Any) -> nn.Module:
        """The family's tiny test model: random weights drawn from ``seed``, in eval mode, small enough
        for a unit test in seconds (a few layers, 112² or less). ``overrides`` change its config
        (e.g. ``frames``, ``layers``, ``num_classes``); tests and ``--smoke`` benchmarks build from here,
        so a new family's tests come from its registration."""
        raise NotImplementedError(f"{self.title} has no tiny test model")

    def wrap(self, model: nn.Module, source: str, folder: Path | None = None) -> LoadedModel:
        """A :class:`LoadedModel` for a built model of this family (``folder``: where it was loaded
        from, when its preprocessing is stored there)."""
        raise NotImplementedError

    def load_folder(self, folder: Path, name: str) -> LoadedModel:
        """A model from a HF folder whose ``config.json`` has one of :attr:`hf_model_types`,
        every stored tensor verified. ``name`` is what the user gave (folder or hub id)."""
        raise NotImplementedError(f"{self.title} cannot be loaded from a Hugging Face folder")

    def claims_file(self, state: Mapping[str, Tensor]) -> bool:
        """Whether a state dict read from a file is in a layout :meth:`load_file` reads."""
        return False

    def load_file(self, path: Path, state: Mapping[str, Tensor], **geometry: Any) -> LoadedModel:
        """A model from a state-dict file this family claims (``geometry``: frames, image_size,
        num_heads for layouts that do not store them)."""
        raise NotImplementedError

    def load_builder(self, name: str, weights: str | Path) -> LoadedModel:
        """One of :attr:`builder_names` with weights from a local file."""
        raise NotImplementedError

    def preprocessing(self, size: int) -> Preprocessing:
        """Normalisation of the family's released checkpoints at input side ``size``."""
        return Preprocessing.imagenet_default(size)

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


@dataclass
class FamilyModels:
    """What one family module registers: its :class:`Family` and its named models."""

    family: Family
    models: tuple[ModelEntry, ...] = field(default_factory=tuple)


__all__ = [
    "Family",
    "FamilyModels",
    "LoadedModel",
    "ModelEntry",
    "Spec",
    "StageGrid",
    "TokenGeometry",
    "capture_output",
    "check_fixed_clip",
    "check_frames",
    "scaled_levels",
    "side",
]

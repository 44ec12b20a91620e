"""The family core: what staprune knows about one kind of model, behind one class, whatever its kind.

A *family* is a kind of model (Hugging Face VideoMAE, torchvision Video Swin, Qwen2.5-VL, ...).
Its module defines one family class and the named models of its registry (:class:`ModelEntry`).
Everything else in staprune asks the family and never branches on family names.

Every family answers the same core (:class:`Family`): recognising and patching a model, checking
options (refused, never ignored), its geometry as plain data (:class:`Spec`), analytic FLOPs,
building from a registry name, its tiny test model, and loading a folder. Families come in two
kinds, each a subclass with what only that kind has:

* video classifiers (:class:`staprune.families.classifier.VideoClassifierFamily`): token grids,
  pruning plans and levels, input layout and logits, state-dict files, evaluation protocols,
  analysis hooks;
* video LLMs (:class:`staprune.families.video_llms.base.VideoLLMFamily`): prompts, each video's
  placeholder layout, the video-token methods, prefill FLOPs.

A command supports one kind or both; on a family of a kind it does not run it says so in one line
(:func:`require_kind`) before any work.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from ..core.config import STAConfig
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

    def transform(self, tag: str, change: Callable[[nn.Module], Any]) -> LoadedModel:
        """Apply ``change`` to the model in place (int8 quantization, ...): its digest becomes the
        weights' digest and ``tag``, so results of the changed model never resume or mix with the
        original's, and the same change of the same weights resumes its own."""
        original = self.digest()
        change(self.model)
        self._digest = hashlib.sha1(f"{original}+{tag}".encode()).hexdigest()
        return self

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
VIDEO_CLASSIFIER = "video classifier"  # a video backbone and its head: clips in, class logits out
VIDEO_LLM = "video LLM"  # a vision tower and a language model: prompts with videos in, text out


class Family:
    """What every family answers, whichever kind of model it covers (:attr:`kind`).

    The two kinds build on this: :class:`~staprune.families.classifier.VideoClassifierFamily`
    (token grids, pruning plans, evaluation protocols, analysis hooks) and
    :class:`~staprune.families.video_llms.base.VideoLLMFamily` (prompts, video layouts, video-token
    methods). A command that supports one kind dispatches on :attr:`kind` and refuses the other
    in one line (:func:`require_kind`).

    Attributes:
        name: short name (``videomae``), the key of the registry and of :attr:`Spec.family`.
        title: what the family covers, for listings and errors.
        kind: :data:`VIDEO_CLASSIFIER` or :data:`VIDEO_LLM`.
        classes: the model classes it patches, for the "unsupported model" TypeError.
        hf_model_types: ``config.json`` ``model_type`` values of HF folders it loads.
        builder_names: architecture names that take a weights file (``--model swin3d_t --weights F``).
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    classes: ClassVar[tuple[str, ...]] = ()
    hf_model_types: ClassVar[tuple[str, ...]] = ()
    builder_names: ClassVar[tuple[str, ...]] = ()

    # recognition and patching ------------------------------------------------------------------
    def recognizes(self, model: nn.Module) -> bool:
        """Whether ``model`` is one this family patches."""
        raise NotImplementedError

    def methods(self) -> tuple[str, ...]:
        """The ``method`` values this family takes."""
        raise NotImplementedError

    def check_method(self, config: STAConfig) -> None:
        """Refuse, in one line, a method or an option this family cannot honour (nothing is ignored)."""
        if config.method not in self.methods():
            raise ConfigError(f"method={config.method!r} does not apply to {self.title} ({self.kind}); use "
                              f"{self.method_choices()}")

    def method_choices(self) -> str:
        """The methods for a message: ``sta, random, uniform, static or none``."""
        methods = [m for m in self.methods() if m != "none"]
        return f"{', '.join(methods)} or none" if "none" in self.methods() else ", ".join(methods)

    def patch(self, model: nn.Module, config: STAConfig) -> nn.Module:
        """Patch ``model`` in place (see :func:`staprune.patch`); validates ``config`` first."""
        raise NotImplementedError

    # geometry and FLOPs ------------------------------------------------------------------------
    def spec_of(self, model: nn.Module, frames: int | None = None, size: int | None = None) -> Spec:
        """The geometry of a built model, optionally on another input clip."""
        raise NotImplementedError

    def flops(self, spec: Spec, config: STAConfig):
        """Analytic :class:`staprune.core.flops.FlopCount` of one input of ``spec`` under ``config``."""
        raise NotImplementedError

    # building and loading ----------------------------------------------------------------------
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
        """Whether a state dict read from a file is in a layout this family loads (video classifiers)."""
        return False

    def preprocessing(self, size: int) -> Preprocessing:
        """Normalisation of the family's released checkpoints at input side ``size``."""
        return Preprocessing.imagenet_default(size)


def require_kind(family: Family, kind: str, what: str, instead: str = "") -> None:
    """Refuse, in one line, to run ``what`` (a command, an option) on a family of another kind.

    Args:
        instead: what to use on this family instead, e.g. ``staprune bench --keep 0.3``.
    Raises:
        UsageError: ``family.kind`` is not ``kind``.
    """
    if family.kind != kind:
        hint = f"; {instead}" if instead else ""
        raise UsageError(f"{what} runs on {kind}s; {family.title} is a {family.kind}{hint}")


@dataclass
class FamilyModels:
    """What one family module registers: its :class:`Family` and its named models."""

    family: Family
    models: tuple[ModelEntry, ...] = field(default_factory=tuple)


__all__ = [
    "VIDEO_CLASSIFIER",
    "VIDEO_LLM",
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
    "require_kind",
    "scaled_levels",
    "side",
]

"""What every Hugging Face family shares: loading a folder with every tensor verified, the folder's
preprocessing, and :class:`HuggingFaceFamily`, the base of the transformers families.

A transformers video classifier is ``<Name>ForVideoClassification`` holding its encoder as an
attribute (``model.videomae``, ``model.vivit``, ...), the encoder's blocks in a list, and a config
that fixes the clip. The base class answers everything that follows from that: which classes the
family patches (:attr:`HuggingFaceFamily.transformers_classes`), loading a folder, the token grid of
a tubelet ViT, its pruning plan and levels, its blocks, and the last block's output.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.config import PruningPlan, STAConfig, resolve_plan
from ..core.errors import CheckpointError
from ..data.transforms import Preprocessing
from ..storage.state_dicts import listing, load_verified, read_hf_weights, verify_state_dict
from .base import (
    Family,
    LoadedModel,
    Spec,
    StageGrid,
    TokenGeometry,
    capture_output,
    check_frames,
    scaled_levels,
)
from .classifier import VideoClassifierFamily


# --- Hugging Face folders ----------------------------------------------------------------------
def hf_preprocessing(folder: Path | None, image_size: int, default: Preprocessing) -> Preprocessing:
    """A HF folder's ``preprocessor_config.json`` if present, else ``default``; its crop must be the
    model's input side."""
    processor = folder / "preprocessor_config.json" if folder is not None else None
    if processor is not None and processor.is_file():
        prep = Preprocessing.from_hf_processor_config(processor)
        if prep.size != image_size:
            raise CheckpointError(
                f"{processor}: crop size {prep.size} differs from the model's image_size {image_size}"
            )
        return prep
    return default


@contextlib.contextmanager
def _quiet_transformers():
    """No "Loading weights" progress bar from transformers: staprune reports what it loaded itself."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def saved_layout(model: nn.Module) -> dict[str, Tensor]:
    """The model's tensors under the names ``save_pretrained`` writes: transformers >= 5 renames some
    models' weights on load (ViViT's ``encoder.layer.N.attention.attention.key`` -> ``layers.N.attention.k_proj``)
    and back on save; older releases keep the state-dict names."""
    state = dict(model.state_dict())
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return state
    return dict(revert_weight_conversion(model, state))


def stored_once(expected: dict[str, Tensor], state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``expected`` without the names of tied tensors ``state`` holds under another name:
    ``save_pretrained`` writes a tied weight once (a language-model head sharing the embeddings)."""
    stored = {t.data_ptr() for k, t in expected.items() if k in state and t.numel()}
    return {k: t for k, t in expected.items() if k in state or not t.numel() or t.data_ptr() not in stored}


def load_hf_pretrained(cls, folder: Path, name: str, *, fix_state=None) -> nn.Module:
    """``cls.from_pretrained(folder)``, then every stored tensor compared, name by name and value by
    value, with what the model holds (in the folder's own naming, :func:`saved_layout`), so nothing is
    left at its initial value. ``fix_state`` renames keys of an older layout first.

    Raises:
        CheckpointError: weights that do not fit the folder's config, names that do not match, or
            stored tensors that did not land in the model.
    """
    from safetensors import SafetensorError

    try:
        with _quiet_transformers():
            model = cls.from_pretrained(str(folder))
    except (OSError, RuntimeError, ValueError, SafetensorError) as err:
        raise CheckpointError(
            f"{name}: the weights in {folder} do not fit its config.json ({str(err).splitlines()[0][:300]})"
        ) from err
    state = read_hf_weights(folder)
    if fix_state is not None:
        state = fix_state(state)
    current = model.state_dict()
    renamed = not set(state) <= set(current)  # transformers >= 5 renamed some weights on load
    expected = stored_once(saved_layout(model) if renamed else current, state)
    verify_state_dict(model, state, f"checkpoint {name}", expected)
    ignored = [k for k in state if not torch.equal(expected[k], state[k].to(expected[k].dtype))]
    if ignored and renamed:
        raise CheckpointError(f"{name}: {len(ignored)} stored tensors did not load into the model: {listing(ignored)}")
    if ignored:
        # This transformers release did not load these (typically q_bias/v_bias); we do.
        print(f"staprune: {len(ignored)} stored tensors were not loaded by transformers "
              f"({listing(ignored)}); loading them explicitly", file=sys.stderr)
        load_verified(model, state, f"checkpoint {name}")
    return model.eval()


# --- the base class -------------------------------------------------------------------------------
class TransformersFamily(Family):
    """A family whose models are ``transformers`` classes, named in :attr:`transformers_classes`
    (the top-level model first, then its base model); they give :attr:`Family.classes` and
    :meth:`recognizes`."""

    transformers_classes: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.transformers_classes and "classes" not in cls.__dict__:
            cls.classes = tuple(f"transformers {name}" for name in cls.transformers_classes)

    @staticmethod
    def transformers_class(name: str) -> type | None:
        """A ``transformers`` class by name (None when transformers or the class is missing)."""
        try:
            import transformers
        except ImportError:
            return None
        return getattr(transformers, name, None)

    def recognizes(self, model: nn.Module) -> bool:
        found = [cls for name in self.transformers_classes if (cls := self.transformers_class(name)) is not None]
        return bool(found) and isinstance(model, tuple(found))


class HuggingFaceFamily(TransformersFamily, VideoClassifierFamily):
    """Base of the families of transformers models (VideoMAE, ViViT, V-JEPA 2, TimeSformer).

    Subclasses set :attr:`transformers_classes` (the video classifier first, then its encoder),
    :attr:`backbone_attribute` and :attr:`clip_owner`; the tubelet-ViT answers below read a spec
    with ``frames``, ``size``, ``tubelet``, ``patch``, ``grid_side`` and ``layers``.

    Attributes:
        transformers_classes: the ``transformers`` class names the family patches, the video
            classifier first; they give :attr:`Family.classes`, :meth:`recognizes` and
            :meth:`load_folder`.
        backbone_attribute: the classifier's attribute holding the encoder (``videomae``).
        clip_owner: how messages name the model (``this VideoMAE``).
        any_clip_length: the family's models take clips of any length (:meth:`wrap` then records
            no fixed frame count).
        extra_tokens: leading tokens of every block's sequence that are not patches (a CLS token).
    """

    backbone_attribute: ClassVar[str] = ""
    clip_owner: ClassVar[str] = ""
    any_clip_length: ClassVar[bool] = False
    extra_tokens: ClassVar[int] = 0

    # the model's parts -----------------------------------------------------------------------------
    def backbone(self, model: nn.Module) -> nn.Module:
        """The encoder: the classifier's :attr:`backbone_attribute`, or the model itself."""
        return getattr(model, self.backbone_attribute) if hasattr(model, self.backbone_attribute) else model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The encoder's transformer blocks in depth order."""
        return self.backbone(model).encoder.layer

    @staticmethod
    def num_classes_of(model: nn.Module) -> int:
        """Width of the model's classifier (0 for a bare encoder)."""
        return getattr(getattr(model, "classifier", None), "out_features", 0) or 0

    # geometry of a tubelet ViT ----------------------------------------------------------------------
    def geometry(self, spec: Spec) -> TokenGeometry:
        t = check_frames(spec.frames, spec.tubelet, self.clip_owner)
        grid = StageGrid("tokens", t, spec.grid_side, spec.grid_side, spec.patch)
        return TokenGeometry(spec.frames, spec.size, spec.tubelet, (grid,), extra_tokens=self.extra_tokens)

    def plan(self, spec: Spec, config: STAConfig) -> PruningPlan:
        self.check_method(config)
        grid = self.geometry(spec).grids[0]
        return resolve_plan(config, spec.layers, grid.frames, grid.tokens_per_frame, tubelet=spec.tubelet)

    def levels(self, spec: Spec) -> tuple[int, ...]:
        return scaled_levels(spec.grid_side**2)

    # loading ---------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, source: str, folder: Path | None = None) -> LoadedModel:
        """A :class:`LoadedModel` for a built model of this family (input geometry read off the
        model; preprocessing from a HF ``folder``'s processor config when given)."""
        spec = self.spec_of(model)
        preprocessing = hf_preprocessing(folder, spec.size, self.preprocessing(spec.size))
        frames = None if self.any_clip_length else spec.frames
        return LoadedModel(model.eval(), self, preprocessing, spec.num_classes, frames, spec.size, source)

    def load_folder(self, folder: Path, name: str) -> LoadedModel:
        """The video classifier (the first of :attr:`transformers_classes`) from a HF folder, every
        stored tensor verified."""
        classifier = self.transformers_class(self.transformers_classes[0])
        if classifier is None:
            raise CheckpointError(f"{name}: this transformers release has no {self.transformers_classes[0]}")
        return self.wrap(load_hf_pretrained(classifier, folder, name), f"hf:{name}", folder)

    # analysis --------------------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> list[tuple[nn.Module, int]]:
        return [(layer, 0) for layer in self.layers(model)]

    def patch_tokens(self, output: Tensor, grid: StageGrid) -> Tensor:
        return output[:, self.extra_tokens:].reshape(output.shape[0], grid.tokens, output.shape[-1])

    def last_block_output(self, model: nn.Module, run: Callable[[], Any]) -> Any:
        """What the last block returns while ``run()`` runs the model."""
        return capture_output(self.layers(model)[-1], run)


__all__ = ["HuggingFaceFamily", "hf_preprocessing", "load_hf_pretrained", "saved_layout"]

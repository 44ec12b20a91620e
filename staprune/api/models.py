"""Named models: geometry specs and random-weight builders, through the family registry (loading
any model, named or not, is :func:`staprune.load`).

The registry names are the families' own (:mod:`staprune.families`): the paper's ``ViT-S/B/L/H``
(VideoMAE, 16x224²) and ``VideoSwin-T/S/B``, ``VideoSwin-B-SSV2`` (torchvision), the wider
families' names (``ViViT-B``, ``VJEPA2-L-fpc16``, ``TimeSformer-B``, ``VideoMAEv2-g``, ...) and
whatever registers through the ``staprune.models`` entry points (the bundled ``demo-vit``,
``demo-swin``). Specs are plain data so analytic FLOP counts never have to build a model.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..families import family_of, family_of_entry, family_of_spec, model_entry, model_names
from ..families.base import Spec


def names() -> list[str]:
    """Every registry name."""
    return model_names()


def get_spec(name: str, frames: int | None = None, size: int | None = None) -> Spec:
    """The geometry of a registry model, optionally with another input ``frames`` x ``size``²."""
    return model_entry(name).spec_for(frames, size)


def spec_of_model(model: nn.Module, frames: int | None = None, size: int | None = None) -> Spec:
    """Read the geometry off a built model of any supported family."""
    return family_of(model).spec_of(model, frames, size)


def build_model(
    name: str, frames: int | None = None, size: int | None = None, attn_implementation: str = "sdpa"
) -> nn.Module:
    """A registry model with random weights, in eval mode.

    Args:
        name: a registry name (:func:`names`).
        frames: input clip length; models that fix their input (ViTs' position tables) are
            configured for it.
        size: input side in pixels, likewise.
        attn_implementation: transformers attention backend (``sdpa`` or ``eager``).
    """
    entry = model_entry(name)
    return family_of_entry(entry).build(entry.spec_for(frames, size), attn_implementation)


def example_input(spec: Spec, batch_size: int = 1, **tensor_kwargs: Any) -> Tensor:
    """A random input for a model of ``spec``, in the model's layout (ViT ``(B, T, 3, H, W)``,
    Swin ``(B, 3, T, H, W)``)."""
    return family_of_spec(spec).example_input(spec, batch_size, **tensor_kwargs)


__all__ = [
    "build_model",
    "example_input",
    "get_spec",
    "names",
    "spec_of_model",
]

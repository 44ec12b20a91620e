"""The registry of model families and named models.

Families are of two kinds on one core (:mod:`.base`): video classifiers (:mod:`.classifier`; one
module or package each: videomae, swin3d, vivit, vjepa2, timesformer) and video LLMs
(:mod:`.video_llms`; one module each). Adding a family is one new module (a family class of its
kind and its named models, exported as ``REGISTRATION``) plus one line in :data:`FAMILY_MODULES`. Models that live outside the library (the bundled demo models, a
third-party package) register through the ``staprune.models`` entry-point group: each entry
point names a callable that receives this module and calls :func:`register_model` (or
:func:`register_family`). They are loaded the first time a name is looked up, so nothing here
imports them.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable

from torch import nn

from ..core.errors import UnknownModelError, UnsupportedModelError, UsageError
from .base import (
    VIDEO_CLASSIFIER,
    VIDEO_LLM,
    Family,
    FamilyModels,
    LoadedModel,
    ModelEntry,
    Spec,
    StageGrid,
    TokenGeometry,
    require_kind,
)

# One line per family, in the order the registry lists them.
FAMILY_MODULES: tuple[str, ...] = (
    "staprune.families.videomae",
    "staprune.families.swin3d",
    "staprune.families.vivit",
    "staprune.families.vjepa2",
    "staprune.families.timesformer",
    "staprune.families.video_llms.qwen2_5_vl",
    "staprune.families.video_llms.qwen3_vl",
    "staprune.families.video_llms.llava_onevision",
    "staprune.families.video_llms.internvl",
)
ENTRY_POINT_GROUP = "staprune.models"

_families: dict[str, Family] = {}
_models: dict[str, ModelEntry] = {}
_state = {"builtins": False, "plugins": False}


def register_family(family: Family, models: Iterable[ModelEntry] = ()) -> None:
    """Add a family (and its named models); a second family of the same name replaces the first."""
    _families[family.name] = family
    for entry in models:
        register_model(entry)


def register_model(entry: ModelEntry) -> None:
    """Add a named model; its family must be registered (built-in families always are)."""
    _load_builtins()
    if entry.family not in _families:
        raise UsageError(f"model {entry.name!r} names unknown family {entry.family!r}")
    _models[entry.name] = entry


def _load_builtins() -> None:
    if _state["builtins"]:
        return
    _state["builtins"] = True
    for module in FAMILY_MODULES:
        registration: FamilyModels = importlib.import_module(module).REGISTRATION
        register_family(registration.family, registration.models)


def _load_plugins() -> None:
    """Run every ``staprune.models`` entry point once (the demo models register this way)."""
    _load_builtins()
    if _state["plugins"]:
        return
    _state["plugins"] = True
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINT_GROUP):
        point.load()(__import__(__name__, fromlist=["register_model"]))


# --- families -----------------------------------------------------------------------------------
def families() -> list[Family]:
    """Every registered family."""
    _load_plugins()
    return list(_families.values())


def family_named(name: str) -> Family:
    _load_plugins()
    if name not in _families:
        raise UsageError(f"unknown model family {name!r}; known: {', '.join(_families)}")
    return _families[name]


def supported_classes() -> list[str]:
    """The model classes staprune patches, for error messages and listings."""
    return [cls for family in families() for cls in family.classes]


def family_of(model: nn.Module) -> Family:
    """The family that patches ``model``.

    Raises:
        TypeError: no family recognises it (the message lists what is supported).
    """
    if isinstance(model, nn.Module):
        for family in families():
            if family.recognizes(model):
                return family
    raise UnsupportedModelError(
        f"staprune cannot patch {type(model).__name__}; supported models: {', '.join(supported_classes())}"
    )


def family_of_spec(spec: Spec) -> Family:
    return family_named(spec.family)


# --- named models -------------------------------------------------------------------------------
def model_names() -> list[str]:
    """Every registry name (built-in families first, then plugins)."""
    _load_plugins()
    return list(_models)


def find_model(name: str) -> ModelEntry | None:
    """The registry entry called ``name``, or None."""
    _load_plugins()
    return _models.get(name)


def suggest(name: str) -> str | None:
    """The registry name closest to a mistyped ``name`` (``ViT-b`` -> ``ViT-B``), if any is close."""
    names = model_names()
    by_case = {n.lower(): n for n in names}
    if name.lower() in by_case:
        return by_case[name.lower()]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    return close[0] if close else None


def model_entry(name: str) -> ModelEntry:
    """The registry entry called ``name``.

    Raises:
        ValueError: unknown name (with the closest registry name when one is close).
    """
    entry = find_model(name)
    if entry is None:
        hint = suggest(name)
        did_you_mean = f"; did you mean {hint!r}?" if hint else ""
        raise UnknownModelError(f"unknown model {name!r}{did_you_mean} Valid names: {', '.join(model_names())}")
    return entry


def family_of_entry(entry: ModelEntry) -> Family:
    return family_named(entry.family)


def levels_of(name: str, spec: Spec) -> tuple[int, ...]:
    """Default pruning levels (non-zero r) of the model ``name`` on ``spec``'s input: its registry
    entry's when it has them and ``spec`` is the entry's own input (a paper's levels are for the
    paper's clip: r=64 of 196 tokens does not fit 49), else its family's for that geometry (also for
    names outside the registry, such as paths)."""
    entry = find_model(name)
    if entry is not None and entry.levels and spec == entry.spec:
        return entry.levels
    return family_of_spec(spec).levels(spec)


__all__ = [
    "ENTRY_POINT_GROUP",
    "VIDEO_CLASSIFIER",
    "VIDEO_LLM",
    "FAMILY_MODULES",
    "Family",
    "FamilyModels",
    "LoadedModel",
    "ModelEntry",
    "Spec",
    "StageGrid",
    "TokenGeometry",
    "families",
    "family_named",
    "family_of",
    "family_of_entry",
    "family_of_spec",
    "find_model",
    "levels_of",
    "model_entry",
    "model_names",
    "register_family",
    "register_model",
    "require_kind",
    "suggest",
]

"""``patch`` / ``unpatch`` / ``kept_tokens``: dispatch to the adapter of the model's family
(:mod:`staprune.families`)."""

from __future__ import annotations

import copy
from types import MethodType

from torch import nn

from ..adapters.state import PATCH_ATTR, get_config
from ..core.config import STAConfig, as_config, config_from_record, config_record
from ..core.errors import CheckpointError, ConfigError, UsageError
from ..families import VIDEO_LLM, family_of, supported_classes


def supported() -> list[str]:
    """The model classes staprune patches (one entry per class of every registered family)."""
    return supported_classes()


def patch(model: nn.Module, r: int | None = None, *, config: STAConfig | None = None, **options) -> nn.Module:
    """Make ``model`` prune spatio-temporal tokens, in place; returns the same model.

    Args:
        model: a supported backbone or video LLM (see :func:`supported`).
        r: tokens dropped per temporal unit at the first stage (the paper's r_1). Video LLMs
            take ``keep_ratio`` (the share of each video's tokens kept) instead, or ``r``.
        config: a full :class:`STAConfig`; ``r`` and ``options`` override its fields.
        **options: any STAConfig field, e.g. ``method="random"``, ``order="FFF"``.

    Raises:
        TypeError: unsupported model or unknown option.
        ValueError: invalid option value, or r too large / frames not divisible for the model's
            configured input.
    """
    family = family_of(model)  # TypeError naming the supported families
    no_budget = r is None and config is None and "r" not in options and "keep_ratio" not in options
    if no_budget and family.kind == VIDEO_LLM:
        raise UsageError(
            f"staprune.patch({type(model).__name__}) needs a budget: keep_ratio (the share of each video's tokens "
            "kept, e.g. keep_ratio=0.3) or r (tokens dropped per temporal unit)"
        )
    if no_budget:
        try:
            levels = ", ".join(map(str, family.levels(family.spec_of(model))))
        except (ValueError, TypeError):  # a geometry the levels do not fit: the message still helps
            levels = "see `staprune flops --model ...`"
        raise UsageError(
            f"staprune.patch({type(model).__name__}) needs r, the tokens dropped per temporal unit at the first "
            f"stage, e.g. staprune.patch(model, r=...) with this model's levels {levels} (r=0 keeps every token)"
        )
    cfg = as_config(config, r, **options)
    family.check_method(cfg)
    unpatch(model)
    patched = family.patch(model, cfg)
    # An instance attribute is what copy.deepcopy looks up first (EMA copies, benchmark copies).
    model.__dict__["__deepcopy__"] = MethodType(_deepcopy_patched, model)
    hf_config = _hf_config(model)
    if hf_config is not None:  # save_pretrained writes it to config.json; stock from_pretrained ignores it
        setattr(hf_config, SAVED_KEY, config_record(cfg))
    return patched


SAVED_KEY = "staprune"  # the config.json entry that carries a saved model's pruning


def _hf_config(model: nn.Module):
    """A transformers model's config (what ``save_pretrained`` writes), or None."""
    config = getattr(model, "config", None)
    return config if hasattr(config, "to_json_string") else None


def saved_pruning(model: nn.Module) -> STAConfig | None:
    """The pruning a transformers model's ``config.json`` recorded (``save_pretrained`` of a patched
    model), or None.

    Raises:
        CheckpointError: the record is damaged.
    """
    record = getattr(_hf_config(model), SAVED_KEY, None)
    if record is None:
        return None
    try:
        return config_from_record(record)
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"config.json's {SAVED_KEY!r} entry is not a pruning staprune can restore ({err}); "
                              f"remove the entry to load the dense model") from err


def _deepcopy_patched(model: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy`` of a patched model: a copy patched with the same config.

    Copying the patched model itself would share the patch's forwards, hooks and per-forward
    state with the original (they are closures over the original's modules), so the copy is made
    of the unpatched model and both are patched again (the original keeps its last forward's
    kept tokens; the copy has none until it runs).
    """
    config, state = get_config(model), model.__dict__[PATCH_ATTR].state
    unpatch(model)
    try:
        clone = copy.deepcopy(model, memo)
    finally:
        patch(model, config=config)
        model.__dict__[PATCH_ATTR].state = state  # kept_tokens() of the last forward survives
    return patch(clone, config=config)


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the stock forward of a patched model (no-op on an unpatched one)."""
    p = model.__dict__.pop(PATCH_ATTR, None)
    model.__dict__.pop("__deepcopy__", None)
    if p is not None:
        p.undo()
        hf_config = _hf_config(model)
        if hf_config is not None and hasattr(hf_config, SAVED_KEY):
            delattr(hf_config, SAVED_KEY)
    return model



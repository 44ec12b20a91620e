"""Gradient checkpointing with pruning, and the guards that keep it correct.

The pruning step mutates per-forward state (the kept-token record), so it must not be re-run in
backward. With transformers >= 5 the checkpoint wrapper sits in each layer class's ``forward``; the
pruning layers' patched forward replaces the instance's ``forward``, so those layers run
un-checkpointed (once) and every other layer is checkpointed. ToMe (whose non-pruning layers read
the merge sizes) and a transformers that checkpoints whole layers from the encoder loop are
rejected (:func:`check_gradient_checkpointing`); after every backward the number of recorded
pruning stages is checked (:func:`assert_pruned_once`), so a re-run never goes unnoticed.
"""

from __future__ import annotations

from torch import nn

from ..adapters.state import get_config, pruning_stage_count, recorded_stage_count
from ..core.errors import UsageError
from ..families import families, family_of


def enable_checkpointing(model: nn.Module) -> None:
    """Turn on Hugging Face activation (gradient) checkpointing, under either of its names, where the
    model's family allows it with pruning (:attr:`~staprune.families.Family.supports_gradient_checkpointing`)."""
    family = family_of(model)
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
        model, "gradient_checkpointing_enable", None
    )
    if enable is None or not family.supports_gradient_checkpointing:
        supported = ", ".join(f.title for f in families() if f.supports_gradient_checkpointing)
        raise UsageError(f"--gradient-checkpointing is available for {supported}, not {family.title}")
    enable()


def checkpointing_enabled(model: nn.Module) -> bool:
    """``model.is_activation_checkpointing`` (transformers >= 5.x) or ``is_gradient_checkpointing``."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name) or name in vars(model):
            return bool(getattr(model, name))
    return False


def check_gradient_checkpointing(model: nn.Module) -> None:
    """Refuse gradient checkpointing where backward's re-run would touch pruning state.

    Raises:
        ValueError: checkpointing is on and the model prunes with ToMe, or the installed
            transformers checkpoints whole layers (``layer.__call__``) from the encoder loop.
    """
    if not checkpointing_enabled(model):
        return
    cfg = get_config(model)
    if cfg is None or cfg.method == "none":
        return
    if cfg.method == "tome":
        raise UsageError(
            "gradient checkpointing cannot be combined with ToMe: the re-run layers read merge "
            "sizes that later layers have already changed; turn one of them off"
        )
    layer_cls = type(family_of(model).blocks(model)[0][0])
    if not hasattr(layer_cls.forward, "__wrapped__"):
        raise UsageError(
            "gradient checkpointing with pruning needs transformers >= 5 (checkpointing inside each layer's "
            "forward, which the pruning layers replace); this version would re-run the pruning step in "
            "backward. Turn off --gradient-checkpointing."
        )


def assert_pruned_once(model: nn.Module) -> None:
    """After backward: each pruning stage of the last forward was applied exactly once (a re-run by
    gradient checkpointing would append to the kept-token record again).

    Raises:
        RuntimeError: the record holds another number of stages than the model prunes at.
    """
    expected = pruning_stage_count(model)
    if expected is None:
        return
    kept = recorded_stage_count(model)
    if kept != expected:
        raise RuntimeError(
            f"pruning state was updated {kept} times for {expected} stages in one step: a "
            "pruning layer was re-run (gradient checkpointing?); its kept-token record is wrong"
        )


__all__ = ["assert_pruned_once", "check_gradient_checkpointing", "checkpointing_enabled", "enable_checkpointing"]

"""One training step on a (pruned) video model, and ``torch.compile`` with an eager fallback.

Pruning runs in train mode: the kept indices are computed without gradients, the kept tokens are
gathered with them (:mod:`staprune.adapters`), so the step is the stock one; dropout and drop-path
work as in the stock model. ``bf16`` trains under autocast (weights and optimizer state stay fp32).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api.settings import Setting
from ..families import Family

# --dtype -> autocast dtype (None: no autocast, fp32).
AUTOCAST: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class StepConfig:
    """What every training step needs besides the batch."""

    family: Family
    autocast: torch.dtype | None
    label_smoothing: float
    clip_grad: float
    device: torch.device


def apply_pruning(model: nn.Module, method: str, r: int | None, options: dict | None = None) -> nn.Module:
    """(Re-)patch ``model`` for ``method`` at ``r`` (and other STAConfig ``options``); ``none`` or r=0
    is the dense setting. Returns ``model``."""
    return Setting.of(method, r or 0, options if method != "none" else None).apply(model)


def logits_of(model: nn.Module, x: Tensor, family: Family) -> Tensor:
    """Logits ``(B, classes)`` of views ``(B, T, 3, H, W)``, put into the model's layout by its family."""
    return family.logits(model(family.to_input(x)))


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    lr: float,
    cfg: StepConfig,
    check: Callable[[], None] | None = None,
) -> Tensor:
    """One optimizer step on views ``x`` ``(B, T, 3, H, W)``, labels ``y`` ``(B,)``; returns the
    loss (a detached scalar, fp32 even under autocast).

    ``check``: called after backward, before the update (the pruning-state guard,
    :func:`~staprune.training.guards.assert_pruned_once`).
    """
    for group in opt.param_groups:
        group["lr"] = lr
    with torch.autocast(
        cfg.device.type, dtype=cfg.autocast or torch.float32, enabled=cfg.autocast is not None
    ):
        logits = logits_of(model, x, cfg.family)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if check is not None:
        check()
    if cfg.clip_grad > 0:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    opt.step()
    return loss.detach()


def try_compile(
    model: nn.Module, first_step: Callable[[nn.Module], object], backend: str = "inductor"
) -> tuple[nn.Module, str]:
    """``torch.compile(model)`` and run ``first_step(compiled)``; on failure warn and use ``model``.

    The first step is where compilation happens (and fails), so it runs inside the fallback.

    Returns the module to train with and a one-line account of what happened.
    """
    try:
        compiled = torch.compile(model, backend=backend)
        first_step(compiled)
        return compiled, "torch.compile: ok"
    except Exception as e:  # noqa: BLE001 - any compiler failure means: train eager instead
        import torch._dynamo as dynamo

        dynamo.reset()
        message = f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); training eager"
        warnings.warn(message, stacklevel=2)
        return model, message


__all__ = ["AUTOCAST", "StepConfig", "apply_pruning", "logits_of", "train_step", "try_compile"]

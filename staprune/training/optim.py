"""The optimizer and its learning rate, shared by every training loop here (``staprune finetune``
and the demo models' trainer, :mod:`staprune.demo.train`): AdamW with weight decay on weight
matrices only, the paper's linear scaling rule, linear warm-up then cosine decay to 0."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The paper's linear scaling rule: ``base_lr * global_batch / 256``."""
    return base_lr * global_batch / 256


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float, exempt: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Decay only weight matrices/kernels; biases, norms (ndim < 2) and parameters whose name holds
    one of ``exempt`` (the family's :attr:`~staprune.families.Family.no_weight_decay`, e.g. Swin's
    relative-position tables) get none, as in the VideoMAE / Video Swin fine-tuning code.

    Returns:
        two AdamW parameter groups: ``[decayed, not decayed]``.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not any(part in name for part in exempt) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, exempt: Sequence[str] = ()) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, betas (0.9, 0.999) (the paper's recipe)."""
    return torch.optim.AdamW(param_groups(model, weight_decay, exempt), lr=lr, betas=(0.9, 0.999))


__all__ = ["build_optimizer", "lr_at", "param_groups", "scaled_lr"]

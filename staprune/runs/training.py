"""What every training loop here shares: the learning-rate schedule and the AdamW parameter groups
(``staprune finetune`` and the demo models' trainer, :mod:`staprune.demo.train`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float, exempt: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Decay only weight matrices/kernels; biases, norms (ndim < 2) and parameters whose name holds
    one of ``exempt`` (the family's :attr:`~staprune.families.Family.no_weight_decay`, e.g. Swin's
    relative-position tables) get none, as in the VideoMAE / Video Swin fine-tuning code."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not any(part in name for part in exempt) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, exempt: Sequence[str] = ()) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay, exempt), lr=lr, betas=(0.9, 0.999))


__all__ = ["build_optimizer", "lr_at", "param_groups"]

"""One epoch of training: the recipe's schedule over this rank's batches, with ``torch.compile``
tried on the first step and the pruning-state check after every backward."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data.clips import ClipTensorSet, ListClipSet
from ..families import Family
from ..runs.distributed import DistInfo
from .guards import assert_pruned_once, check_gradient_checkpointing, enable_checkpointing
from .optim import build_optimizer, lr_at
from .recipe import epoch_plan
from .sharding import rank_batches
from .step import AUTOCAST, StepConfig, train_step, try_compile


@dataclass
class Trainer:
    """What the epoch loop needs; ``model`` and ``compile_note`` change when compiling (first step)."""

    model: nn.Module  # what forward runs on (maybe DDP / compiled)
    opt: torch.optim.Optimizer
    step_cfg: StepConfig
    train_set: ClipTensorSet | ListClipSet
    recipe: dict[str, Any]  # staprune.training.recipe.make_recipe's: schedule, batch, seed
    info: DistInfo = field(default_factory=DistInfo)
    workers: int = 0  # decoding processes of a ListClipSet
    check: Callable[[], None] | None = None  # after every backward (gradient checkpointing's guard)
    compile_backend: str | None = None  # torch.compile on the first step with it; None: eager
    compile_note: str = ""  # what compiling did (empty until it was tried)


def build_trainer(
    model: nn.Module,
    family: Family,
    train_set: ClipTensorSet | ListClipSet,
    recipe: dict[str, Any],
    device: torch.device,
    info: DistInfo | None = None,
    *,
    workers: int = 0,
    gradient_checkpointing: bool = False,
    compile_backend: str | None = None,
) -> Trainer:
    """A :class:`Trainer` for the patched ``model`` under ``recipe``: gradient checkpointing turned on
    and checked (:mod:`staprune.training.guards`), the model moved to ``device`` in train mode, AdamW
    at the recipe's lr and weight decay (the family's exemptions), the step's autocast, label
    smoothing and clipping from the recipe.
    """
    if gradient_checkpointing:
        enable_checkpointing(model)
        check_gradient_checkpointing(model)
    model.to(device).train()
    opt = build_optimizer(model, recipe["lr"], recipe["weight_decay"], family.no_weight_decay)
    step_cfg = StepConfig(family, AUTOCAST[recipe["dtype"]], recipe["label_smoothing"], recipe["clip_grad"], device)
    # Under gradient checkpointing: verify after every backward that no pruning step was re-run.
    check = (lambda: assert_pruned_once(model)) if gradient_checkpointing else None
    return Trainer(model, opt, step_cfg, train_set, recipe, info or DistInfo(), workers, check, compile_backend)


def train_epoch(trainer: Trainer, epoch: int, bar: Any = None,
                log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Epoch ``epoch`` (0-based) of the recipe: ``steps_per_epoch`` optimizer steps on this rank's
    slice of each global batch, the learning rate following the whole run's schedule.

    Args:
        bar: a progress reporter (``update``, ``set_postfix``, ``close``) or None; closed at the end.
        log: told what compiling did (once, on the first compiled step).

    Returns:
        ``loss`` (mean over this rank's steps), ``seconds``, ``clips_per_s`` (all ranks together).
    """
    r = trainer.recipe
    total_steps = r["steps_per_epoch"] * r["epochs"]
    indices, seeds = epoch_plan(len(trainer.train_set), epoch, r["seed"], r["global_batch"])
    losses: list[float] = []
    trainer.model.train()
    device = trainer.step_cfg.device
    start = time.perf_counter()
    for i, (x, y) in enumerate(rank_batches(trainer.train_set, indices, seeds, trainer.info, trainer.workers)):
        step = epoch * r["steps_per_epoch"] + i
        lr = lr_at(step, total_steps, r["warmup_steps"], r["lr"])
        x, y = x.to(device), y.to(device)
        if trainer.compile_backend and not trainer.compile_note:
            first: list[float] = []
            trainer.model, trainer.compile_note = try_compile(
                trainer.model,
                backend=trainer.compile_backend,
                first_step=lambda m, x=x, y=y, lr=lr, first=first: first.append(
                    float(train_step(m, trainer.opt, x, y, lr, trainer.step_cfg))
                ),
            )
            if log is not None:
                log(trainer.compile_note)
            if first:  # the compiled model has taken this step already
                losses.extend(first)
                _advance(bar, losses, lr)
                continue
        losses.append(float(train_step(trainer.model, trainer.opt, x, y, lr, trainer.step_cfg, trainer.check)))
        _advance(bar, losses, lr)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    clips = r["steps_per_epoch"] * r["global_batch"]
    return {"loss": sum(losses) / max(1, len(losses)), "seconds": seconds, "clips_per_s": clips / seconds}


def _advance(bar: Any, losses: list[float], lr: float | None = None) -> None:
    if bar is not None:
        bar.update(1)
        post = {"loss": f"{losses[-1]:.3f}"}
        if lr is not None:
            post["lr"] = f"{lr:.2e}"
        bar.set_postfix(post)


__all__ = ["Trainer", "build_trainer", "train_epoch"]

"""The fine-tuning recipe: what defines a training run, and the rule that resuming needs the same.

The paper's supplementary A "Training details", minus its augmentations (RandAugment, mixup,
cutmix and repeated augmentation are not implemented): AdamW, weight decay 0.05 on weight matrices
only, betas (0.9, 0.999) (:mod:`.optim`); peak learning rate given, or the linear scaling rule
``base_lr x global batch / 256``; per-step schedule: linear warm-up (default 5 % of the epochs,
the paper's 5 of 100), then cosine decay to 0; cross-entropy with label smoothing 0.1; no gradient
clipping unless asked. List training draws one random clip per video with a random crop and flip
(:class:`staprune.data.clips.ListClipSet`); the demo clips are used as generated.

The recipe is a JSON-able dict stored in every checkpoint's ``epoch_NNN.train.json``. A resumed run
must have the same :data:`RECIPE_KEYS`; the other fields (the per-process batch, steps per epoch,
weights path, image size) are recorded for :func:`staprune.load` and the summary, not compared.

The data order and the augmentation seeds of epoch ``e`` are a pure function of ``(seed, e)``
(:func:`epoch_plan`), so a resumed run needs no sampler state to reproduce the uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.errors import UsageError
from ..storage.runfolder import differences
from .optim import scaled_lr

# Recipe fields that must not change between a run and its resumption.
RECIPE_KEYS = (
    "model",
    "data",
    "demo",
    "train_clips",
    "data_seed",
    "method",
    "r",
    "epochs",
    "lr",
    "global_batch",
    "weight_decay",
    "warmup_steps",
    "label_smoothing",
    "clip_grad",
    "seed",
    "dtype",
    "frames",
    "stride",
    "flip",
    "init",
    "options",
)


def make_recipe(
    *,
    model: str,
    data: str | None,
    train_clips: int,
    data_seed: int,
    method: str,
    r: int | None,
    epochs: int,
    lr: float | None,
    base_lr: float,
    batch_per_process: int,
    world_size: int,
    weight_decay: float,
    warmup_epochs: float | None,
    num_clips: int,
    label_smoothing: float,
    clip_grad: float,
    seed: int,
    dtype: str,
    frames: int,
    stride: int,
    flip: bool,
    init: str | None,
    options: dict[str, Any] | None,
    weights: str | None,
    image_size: int | None,
) -> dict[str, Any]:
    """The recipe dict of a run on ``num_clips`` training clips (field order as stored in checkpoints).

    ``data`` None means the generated demo clips (then ``train_clips`` and ``data_seed`` are recorded,
    ``flip`` is not); ``lr`` None or 0 means :func:`~staprune.training.optim.scaled_lr` of ``base_lr``
    at the global batch ``batch_per_process * world_size``; ``warmup_epochs`` None means 5 % of the
    epochs (the paper's 5 of 100), rounded to whole steps (at least one). ``r`` is dropped for the
    dense method ``none``.
    """
    demo = data is None
    global_batch = batch_per_process * world_size
    steps_per_epoch = num_clips // global_batch  # the last partial global batch is dropped
    if steps_per_epoch == 0:
        raise UsageError(f"{num_clips} training clips cannot fill one global batch of {global_batch}")
    warmup = warmup_epochs if warmup_epochs is not None else 0.05 * epochs
    return {
        "model": model,
        "data": None if demo else str(data),
        "demo": demo,
        "train_clips": train_clips if demo else None,
        "data_seed": data_seed if demo else None,
        "method": method,
        "r": r if method != "none" else None,
        "epochs": epochs,
        "lr": lr if lr else scaled_lr(base_lr, global_batch),
        "global_batch": global_batch,
        "batch_per_process": batch_per_process,
        "weight_decay": weight_decay,
        "warmup_steps": max(1, round(warmup * steps_per_epoch)),
        "steps_per_epoch": steps_per_epoch,
        "label_smoothing": label_smoothing,
        "clip_grad": clip_grad,
        "seed": seed,
        "dtype": dtype,
        "frames": frames,
        "stride": stride,
        "flip": None if demo else bool(flip),
        "init": init,  # where the initial weights came from
        "options": options or None,  # the other STAConfig fields set
        # Not compared on resume; what `staprune.load` needs to rebuild the architecture.
        "weights": weights,
        "image_size": image_size,
    }


def check_recipe(stored: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Raise :class:`~staprune.core.errors.UsageError` (a ValueError) naming every field of
    :data:`RECIPE_KEYS` that differs between a checkpoint's recipe and this run's."""
    changed = differences(stored, current, RECIPE_KEYS)
    if changed:
        raise UsageError(f"cannot resume from {where}: the recipe changed ({changed})")


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (order matters), so (seed, epoch, rank) streams never collide."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


def epoch_plan(num_items: int, epoch: int, seed: int, global_batch: int) -> tuple[Tensor, Tensor]:
    """Which items each step of ``epoch`` uses, and one augmentation seed per item.

    A pure function of ``(seed, epoch)``: resuming needs no sampler state. The last partial
    global batch is dropped (every rank must take the same number of steps).

    Returns:
        indices ``(steps, global_batch)`` long; seeds ``(steps, global_batch)`` long.
    """
    steps = num_items // global_batch
    if steps == 0:
        raise UsageError(f"{num_items} training clips cannot fill one global batch of {global_batch}")
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, 0xDA7A))
    order = torch.randperm(num_items, generator=g)[: steps * global_batch]
    seeds = torch.randint(0, 2**62, (steps * global_batch,), generator=g)
    return order.view(steps, global_batch), seeds.view(steps, global_batch)


__all__ = ["RECIPE_KEYS", "check_recipe", "epoch_plan", "make_recipe", "mix_seed"]

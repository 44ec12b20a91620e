"""The three-file training checkpoint of one epoch, and resuming from it.

Written by rank 0 after every epoch, atomically, JSON last:

* ``epoch_NNN.safetensors``: the model's ``state_dict`` (float32; loads into the unpatched model);
* ``epoch_NNN.train.safetensors``: flat tensors ``optimizer.state.<param index>.<key>``
  (``exp_avg``, ``exp_avg_sq``, ``step``) and ``rng.torch.rank<k>`` (each rank's CPU RNG state:
  dropout and drop-path draws);
* ``epoch_NNN.train.json``: format, epoch, the caller's metadata (global step = the scheduler's
  position, the recipe, cumulative training seconds, ...), the optimizer's ``param_groups``
  (hyper-parameters, parameter indices) and non-tensor state, the world size.

The file names and the "complete epoch" rule (all three files exist; the JSON is written last)
are :mod:`staprune.storage.runfolder`'s, which :func:`staprune.load` shares to load a run folder.
Optimizer state is flattened to named tensors because safetensors holds flat tensors only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..runs.distributed import DistInfo
from ..storage.runfolder import (
    atomic_write,
    atomic_write_json,
    check_no_results,
    claim_folder,
    epoch_files,
    latest_epoch,
)
from .recipe import check_recipe, mix_seed

FORMAT_VERSION = 1


def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Optimizer state as flat named tensors (``optimizer.state.<index>.<key>``, on the CPU) plus
    JSON-able metadata (``param_groups``, non-tensor ``scalars``)."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            name = f"optimizer.state.{index}.{key}"
            if isinstance(value, Tensor):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer`: a ``state_dict`` for ``Optimizer.load_state_dict``
    (other entries of ``tensors``, such as the RNG states, are ignored)."""
    state: dict[int, dict[str, Any]] = {}
    items = [(k, v) for k, v in tensors.items() if k.startswith("optimizer.state.")]
    for name, value in [*items, *meta["scalars"].items()]:
        index, key = name[len("optimizer.state.") :].split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    out: Path,
    epoch: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    rng_states: Sequence[Tensor],
    meta: dict[str, Any],
) -> Path:
    """Write epoch ``epoch``'s three files (JSON last: its presence marks a complete checkpoint).

    Args:
        model: the unwrapped model (not DDP / compiled), whose ``state_dict`` loads into the stock one.
        rng_states: every rank's ``torch.get_rng_state()`` (uint8 tensors), indexed by rank.
        meta: merged into the JSON (``step``, ``recipe``, ``train_seconds``, ...).

    Returns:
        the weights file's path.
    """
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    claim_folder(out, "finetune")  # marks the folder (checked before the training started)
    files = epoch_files(out, epoch)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors, opt_meta = flatten_optimizer(opt)
    tensors.update({f"rng.torch.rank{k}": s.contiguous() for k, s in enumerate(rng_states)})
    atomic_write(files.weights, lambda p: save_file(state, str(p)))
    atomic_write(files.train_tensors, lambda p: save_file(tensors, str(p)))
    doc = {
        "format": FORMAT_VERSION,
        "epoch": epoch,
        **meta,
        "optimizer": opt_meta,
        "world_size": len(rng_states),
    }
    atomic_write_json(files.train_json, doc, indent=1)
    return files.weights


def load_checkpoint(out: Path, epoch: int) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """(model state_dict, training tensors, training JSON) of epoch ``epoch``."""
    from safetensors.torch import load_file

    files = epoch_files(out, epoch)
    return (
        load_file(str(files.weights)),
        load_file(str(files.train_tensors)),
        json.loads(files.train_json.read_text(encoding="utf-8")),
    )


def resume_from(
    out: Path,
    epoch: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    recipe: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
) -> tuple[dict[str, Any], bool]:
    """Load epoch ``epoch`` of ``out`` into ``model`` (unwrapped) and ``opt``, after checking that
    its recipe is ``recipe`` (:func:`~staprune.training.recipe.check_recipe`), and restore this
    rank's CPU RNG state (dropout / drop-path draws) when the world size is the checkpoint's.

    Returns:
        the checkpoint's training JSON, and whether the RNG state was restored.
    """
    weights, tensors, doc = load_checkpoint(out, epoch)
    check_recipe(doc["recipe"], recipe, out)
    model.load_state_dict(weights, strict=True)
    opt.load_state_dict(unflatten_optimizer(tensors, doc["optimizer"]))
    rng = tensors.get(f"rng.torch.rank{rank}")
    if rng is not None and doc["world_size"] == world_size:
        torch.set_rng_state(rng)
        return doc, True
    return doc, False


def resume_latest(
    out: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    recipe: dict[str, Any],
    *,
    resume: bool,
    info: DistInfo,
    log: Callable[[str], None] = print,
) -> tuple[int, float]:
    """Where this rank's training starts: from the latest complete epoch of ``out`` with ``resume``
    (weights, optimizer, RNG: :func:`resume_from`), else from scratch; a folder holding checkpoints
    is refused without ``resume``. Seeds this rank's dropout / drop-path stream from the recipe's seed
    first (what a checkpoint's RNG state then replaces).

    Returns:
        the epoch to start at (0-based) and the training seconds already spent.
    """
    latest = latest_epoch(out)
    check_no_results(out, latest is not None, resume, f"checkpoints (epoch {latest})")
    torch.manual_seed(mix_seed(recipe["seed"], info.rank, 0xD20))  # dropout / drop-path stream of this rank
    if latest is None:
        if resume:
            log(f"nothing to resume in {out}; starting from epoch 0")
        return 0, 0.0
    doc, rng_restored = resume_from(out, latest, model, opt, recipe, info.rank, info.world_size)
    if not rng_restored:
        log("world size changed since the checkpoint: dropout RNG reseeded")
    log(f"resumed from {out} at epoch {latest} (step {doc['step']})")
    return latest, float(doc.get("train_seconds", 0.0))


__all__ = [
    "FORMAT_VERSION",
    "flatten_optimizer",
    "load_checkpoint",
    "resume_from",
    "resume_latest",
    "save_checkpoint",
    "unflatten_optimizer",
]

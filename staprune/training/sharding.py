"""Data parallel: each rank's share of every global batch, and every rank's RNG state.

Under ``torchrun`` every step of an epoch has one global batch (:func:`~staprune.training.recipe.epoch_plan`);
each rank takes its contiguous slice of it, so the ranks together train on exactly the batch a
single process would, and DistributedDataParallel averages their gradients.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..data.clips import ClipTensorSet, ListClipSet
from ..data.workers import decoding_loader, loading
from ..runs import distributed as dist_utils


def rank_batches(
    dataset: ClipTensorSet | ListClipSet, indices: Tensor, seeds: Tensor, info: dist_utils.DistInfo, workers: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """This rank's batches of one epoch: its contiguous slice of every global batch.

    Args:
        indices, seeds: ``(steps, G)`` long, as :func:`~staprune.training.recipe.epoch_plan` gives them.
        workers: decoding processes for a :class:`~staprune.data.clips.ListClipSet` (0: this one).

    Yields:
        views ``(G / world_size, T, 3, H, W)`` float and labels ``(G / world_size,)``, one per step.
    """
    per_rank = indices.shape[1] // info.world_size
    part = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
    mine_i, mine_s = indices[:, part], seeds[:, part]
    if isinstance(dataset, ClipTensorSet):
        for row in mine_i:
            yield dataset.batch(row)
        return
    keys = [(int(i), int(s)) for i, s in zip(mine_i.flatten(), mine_s.flatten(), strict=True)]
    loader = decoding_loader(dataset, workers, batch_size=per_rank, sampler=keys, drop_last=False)
    with loading(loader) as batches:
        yield from batches


def data_parallel(model: nn.Module, device: torch.device, info: dist_utils.DistInfo) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel under torchrun (as is in a single process).
    Wrap after restoring a checkpoint: checkpoints hold the unwrapped model's ``state_dict``."""
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def gather_rng_states(info: dist_utils.DistInfo) -> list[Tensor]:
    """Every rank's CPU RNG state (``torch.get_rng_state()``), indexed by rank, on every rank."""
    return dist_utils.all_gather(info, torch.get_rng_state())


__all__ = ["data_parallel", "gather_rng_states", "rank_batches"]

"""Small ``torch.distributed`` helpers for evaluation under ``torchrun``.

Everything degrades to a single process when ``WORLD_SIZE`` is unset or 1, so the evaluator calls
these unconditionally. Only object collectives are used (``all_gather_object``), which work on
both gloo (CPU) and nccl (GPU).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..core.errors import RankError
from ..storage.runfolder import RunLock

# Shards can be unbalanced (a few long videos); the default 30 min would kill a slow but healthy run.
_TIMEOUT = datetime.timedelta(hours=4)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``; ``local_rank`` picks the GPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str = "cpu") -> DistInfo:
    """Join the process group torchrun set up (env:// rendezvous), or return single-process info.

    Args:
        device: ``cpu`` selects gloo; anything CUDA selects nccl and binds this process to
            ``cuda:LOCAL_RANK``.
    """
    world = env_world_size()
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistInfo(rank, world, local_rank, initialized_here=False)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=_TIMEOUT)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, initialized_here=True)


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if :func:`init` created it, once every rank is done with it: a rank
    tearing its connections down while another still talks over them can abort that one at exit."""
    if info.initialized_here and dist.is_initialized():
        with contextlib.suppress(RuntimeError):  # a rank that died already: nothing left to wait for
            dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in a single process)."""
    if info.distributed:
        dist.barrier()


def all_gather(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), indexed by rank, on every rank."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def shard(indices: list[int], info: DistInfo) -> list[int]:
    """This rank's share: ``indices[rank::world_size]``; no padding, so each item runs exactly once."""
    return indices[info.rank :: info.world_size]


def raise_if_any(info: DistInfo, error: BaseException | None) -> None:
    """Collective error check: if any rank failed, every rank raises (no rank left waiting).

    The local exception is re-raised as is; other ranks raise a :class:`RankError` naming the rank.
    """
    errors = all_gather(info, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for rank, message in enumerate(errors):
        if message is not None:
            raise RankError(f"rank {rank} failed: {message}")


@contextlib.contextmanager
def locked_on_main(info: DistInfo, folder: str | Path, what: str = "--out",
                   command: str | None = None) -> Iterator[None]:
    """Rank 0 holds ``folder``'s :class:`~staprune.storage.runfolder.RunLock` (of ``command``) while the
    block runs (the only writer of a torchrun job's shared files); when it cannot, every rank raises."""
    lock = RunLock(Path(folder), what, command) if info.is_main else contextlib.nullcontext()
    error: BaseException | None = None
    try:
        lock.__enter__()
    except Exception as e:  # noqa: BLE001 - re-raised on every rank just below
        error = e
    raise_if_any(info, error)
    try:
        yield
    finally:
        lock.__exit__(None, None, None)

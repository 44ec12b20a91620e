"""The device and number format a command runs in: ``--device`` resolved (torchrun-aware) and ``--dtype`` names."""

from __future__ import annotations

import torch

from ..core.errors import UsageError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(requested: str | None, local_rank: int | None = None) -> torch.device:
    """The device to run on: ``requested`` (``cpu``, ``cuda``, ``cuda:1``, ...), or cuda when available.
    Under torchrun (``local_rank`` given) a bare ``cuda`` is this process's GPU, ``cuda:<local_rank>``.

    Raises:
        UsageError: not a device name, or a GPU that this machine does not have.
    """
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: staprune runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}, but this machine has no CUDA GPU (or torch was built without CUDA); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        if device.index is None and local_rank is not None:
            device = torch.device(f"cuda:{local_rank}")
    return device


__all__ = ["DTYPES", "resolve_device"]

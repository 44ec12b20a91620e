"""Will a model's weights fit this machine's memory? Asked before a registry model is built, so a
model too large is one clear line instead of the kernel killing the process (exit 137) minutes in.

Counts come from the model built on the meta device (shapes only, no memory); the memory free for
it is Linux's ``MemAvailable`` (elsewhere the check is skipped: no portable reading without a
dependency).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..core.errors import UsageError

GB = 1e9
# The weights are not all a forward needs (activations, the KV cache, the framework itself): a
# model whose weights take more than this share of the free memory is refused.
WEIGHTS_SHARE = 0.85


def available_bytes() -> int | None:
    """Memory the kernel says a new allocation can take without swapping (``MemAvailable``), or None
    where it does not say (not Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def parameter_count(build: Callable[[], nn.Module]) -> int:
    """Parameters of the model ``build()`` makes, built on the meta device (no memory for them)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def check_weights_fit(name: str, parameters: int, dtype: torch.dtype,
                      smaller: Callable[[], list[tuple[str, int]]] = list, available: int | None = None,
                      offer_dtype: bool = True) -> None:
    """Refuse, in one line, a model whose weights alone would not fit the free memory.

    Args:
        name: what the user typed (named in the message).
        parameters: its parameter count.
        dtype: the number format it would be built in.
        smaller: gives ``(name, parameters)`` of alternatives to offer where they fit (called only to refuse).
        available: free bytes (default: :func:`available_bytes`; None skips the check).
        offer_dtype: the caller can build in another dtype (the command has ``--dtype``): offer bf16.

    Raises:
        UsageError: the weights need more than :data:`WEIGHTS_SHARE` of ``available``, saying what would fit
            (``--dtype bf16``, a smaller model).
    """
    available = available_bytes() if available is None else available
    if available is None:
        return
    budget = WEIGHTS_SHARE * available
    size = dtype.itemsize
    needed = parameters * size
    if needed <= budget:
        return
    ways = []
    if offer_dtype and size > 2 and parameters * 2 <= budget:
        ways.append(f"--dtype bf16 ({parameters * 2 / GB:.1f} GB)")
    fitting = [other for other, count in smaller() if count * size <= budget]
    if fitting:
        ways.append("a smaller model (" + ", ".join(fitting) + ")")
    fix = "use " + " or ".join(ways) if ways else "use a machine with more memory"
    raise UsageError(f"{name} has {parameters / 1e9:.2f} B parameters: its {_dtype_name(dtype)} weights alone take "
                     f"{needed / GB:.1f} GB and this machine has {available / GB:.1f} GB free; {fix}")


__all__ = ["available_bytes", "check_weights_fit", "parameter_count"]

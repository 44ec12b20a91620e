"""Index bookkeeping computed from shapes alone while ``torch.export`` / ``torch.compile`` trace.

Some bookkeeping (Video Swin's window layout) depends only on the input's shape, is built with
data-dependent Python (``unique``, ``tolist``) and is cached across calls. While a graph is being
traced it must still run on real tensors and enter the graph as a constant: :func:`shape_constant`
marks such a function for Dynamo (``assume_constant_result``) and runs its body with fake tensors and
proxy tracing switched off, so ``torch.export`` (strict or not), ``torch.onnx.export(dynamo=True)``
and ``torch.compile(fullgraph=True)`` all see a constant, and the cache never holds a traced tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

T = TypeVar("T")


def tracing() -> bool:
    """Whether a graph is being traced (``torch.export``, ``torch.onnx.export``, ``torch.compile``)."""
    return torch.compiler.is_exporting() or torch.compiler.is_compiling()


def shape_constant(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` (arguments: shapes, devices, plain values) runs eagerly on real tensors even while a
    graph is traced, and its result is a constant of that graph."""

    @functools.wraps(fn)
    def eager(*args, **kwargs):
        with unset_fake_temporarily(), disable_proxy_modes_tracing():
            return fn(*args, **kwargs)

    return torch._dynamo.assume_constant_result(eager)


__all__ = ["shape_constant", "tracing"]

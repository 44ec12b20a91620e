"""Deploying a pruned model: dynamic int8 that keeps the pruning, ONNX export verified with ONNX
Runtime, and ONNX Runtime's own int8 (``staprune export --onnx-int8``; ``--int8`` in ``bench`` and ``eval``).

A patched model exports with the stock calls (``torch.export``, ``torch.onnx.export(dynamo=True)``):
the kept set is computed inside the graph, so the exported model prunes every clip as PyTorch does.
The batch axis stays dynamic; the clip shape is the example's (positions and the pruning plan fix it).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..adapters.state import get_config
from ..core.errors import ConfigError, UsageError
from ..families.base import LoadedModel
from .patching import patch, unpatch

QUANTIZATIONS = ("int8",)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 on every ``nn.Linear`` (weights int8, activations quantized per batch), in place,
    keeping the model's pruning: unpatched, quantized, patched again with the same config."""
    config = get_config(model)
    unpatch(model)
    with warnings.catch_warnings():
        # torch.ao's eager dynamic quantization warns that it moves to torchao; torch still ships it
        # and staprune depends on torch alone.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    if config is not None:
        patch(model, config=config)
    return model


def quantize_loaded(loaded: LoadedModel, quantization: str | None) -> LoadedModel:
    """``loaded`` with ``quantization`` applied (None: unchanged); its digest says so, so results of
    the quantized model never resume or mix with the float model's."""
    if quantization is None:
        return loaded
    if quantization not in QUANTIZATIONS:
        raise UsageError(f"quantization {quantization!r}: choose {', '.join(QUANTIZATIONS)}")
    if next(loaded.model.parameters()).device.type != "cpu":
        raise UsageError("--int8 is PyTorch's dynamic int8, which runs on CPU: use --device cpu")
    loaded.transform(quantization, quantize_int8)
    loaded.source += f" ({quantization}, dynamic)"
    return loaded


def export_onnx(model: nn.Module, example: Tensor, path: str | Path) -> Path:
    """``torch.onnx.export(model, (example,), dynamo=True)`` with a dynamic batch axis, saved at ``path``.

    Raises:
        ConfigError: the model cannot be exported (the exporter's first line).
    """
    path = Path(path)
    batch = torch.export.Dim("batch", min=1, max=1024)
    try:
        program = torch.onnx.export(model, (example,), dynamic_shapes=({0: batch},), dynamo=True, verbose=False)
    except Exception as err:  # the exporter raises many types; the user gets its first line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"this model cannot be exported to ONNX: {first[:300]}") from err
    program.save(str(path))
    return path


def onnx_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session of ``path`` (``threads``: intra-op threads)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, x: Tensor) -> Tensor:
    """Logits of ``x`` from an exported classifier's session."""
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy().astype(np.float32)})
    return torch.from_numpy(logits)


def max_difference(session, model: nn.Module, clips: list[Tensor], logits) -> float:
    """Largest absolute difference between ONNX Runtime's and PyTorch's logits over ``clips``
    (``logits``: the family's output -> logits)."""
    worst = 0.0
    with torch.no_grad():
        for x in clips:
            worst = max(worst, float((run_onnx(session, x) - logits(model(x)).float()).abs().max()))
    return worst


def quantize_onnx_int8(source: str | Path, target: str | Path) -> Path:
    """ONNX Runtime's dynamic int8 of an exported model (weights of MatMul/Gemm int8)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # It logs a hint to run its shape-inference pre-processing first, which fails on graphs that
    # compute their own gather indices (this one's); the quantized model is correct without it.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return Path(target)


__all__ = ["QUANTIZATIONS", "export_onnx", "max_difference", "onnx_session", "quantize_int8", "quantize_loaded",
           "quantize_onnx_int8", "run_onnx"]

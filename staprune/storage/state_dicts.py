"""Reading state-dict files safely and checking that every stored tensor fits the model.

Files are read with ``safetensors`` or ``torch.load(weights_only=True)``; loading is never trusted:
the stored tensors are compared name by name (and shape by shape) with the model's state dict and
any difference raises :class:`~staprune.core.errors.CheckpointError`, then they are loaded with
``strict=True``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.errors import CheckpointError, NotFoundError

STATE_DICT_SUFFIXES = frozenset({".pth", ".pt", ".bin", ".safetensors", ".ckpt"})
# Buffers a model computes itself; a checkpoint may or may not store them.
_DERIVABLE = re.compile(r"(^|\.)relative_position_index$")
_MAX_LISTED = 10


# --- reading and checking state dicts -----------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint file, unwrapped and with wrapper prefixes removed.

    Reads ``.safetensors`` with safetensors, anything else with ``torch.load(weights_only=True)``
    (an ``argparse.Namespace`` of training args is allowed, as in the VideoMAE release files).
    Descends into ``model`` / ``module`` / ``state_dict`` / ``model_state`` entries and strips a
    ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix shared by all keys.

    Raises:
        FileNotFoundError: no such file. CheckpointError: unreadable (truncated, not a checkpoint,
        pickled objects) or no tensors inside.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise NotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(path), device="cpu")
        except SafetensorError as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err}); is it complete?") from err
    else:
        import pickle

        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "GLOBAL" in str(err) or "Unsupported global" in str(err):  # pickled objects, not only tensors
                found = re.search(r"GLOBAL ([\w.]+)", str(err))
                what = f" ({found.group(1)})" if found else ""
                raise CheckpointError(f"{path}: holds pickled Python objects{what}, which staprune does not load "
                                      "(torch.load(weights_only=True)); save model.state_dict() instead") from err
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?)") from err
        except (RuntimeError, EOFError, OSError) as err:
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first}); is it complete?") from err
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in ("model", "module", "state_dict", "model_state") if k in obj), None)
        if not isinstance(inner, Mapping):
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {listing(map(str, obj))})")
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


def listing(names: Iterable[str]) -> str:
    """Up to 10 sorted names, comma-separated, with a count of the rest."""
    names = sorted(names)
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def verify_state_dict(
    model: nn.Module, state: Mapping[str, Tensor], source: str, expected: Mapping[str, Tensor] | None = None
) -> None:
    """Raise :class:`CheckpointError` unless ``state`` provides exactly the model's tensors.

    Compares names (missing / unexpected) and shapes with ``expected`` (default: the model's state
    dict); buffers a model derives itself (Swin's ``relative_position_index``) may be absent. Lists
    up to 10 names per kind of problem.
    """
    expected = model.state_dict() if expected is None else expected
    missing = [k for k in expected if k not in state and not _DERIVABLE.search(k)]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing weight(s): {listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weight(s): {listing(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {listing(shapes)}")
    if problems:
        raise CheckpointError(f"{source} does not match {type(model).__name__}: " + "; ".join(problems))


def load_verified(model: nn.Module, state: Mapping[str, Tensor], source: str) -> nn.Module:
    """:func:`verify_state_dict`, then copy the tensors in (derivable buffers keep the model's own)."""
    verify_state_dict(model, state, source)
    full = dict(model.state_dict())
    full.update(state)
    model.load_state_dict(full, strict=True)
    return model


def read_hf_weights(folder: str | Path) -> dict[str, Tensor]:
    """All tensors of a HF model folder (single or sharded safetensors, else ``pytorch_model*.bin``)."""
    folder = Path(folder)
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            state: dict[str, Tensor] = {}
            for shard in shards:
                state.update(read_state_dict(folder / shard))
            return state
        if (folder / single).is_file():
            return read_state_dict(folder / single)
    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin found")


def state_digest(model: nn.Module) -> str:
    """SHA-1 of a model's state dict (names, dtypes, shapes and values): what makes two results
    come from the same weights, whatever path or name the model was loaded by."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()

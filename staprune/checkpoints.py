"""Load evaluation models and verify that every stored weight landed where it belongs.

:func:`load` resolves what a user typed, in this order, asking the model families
(:mod:`staprune.families`) for everything about the model itself:

* a registry name (``ViT-B``, ``VideoSwin-T``, ``ViViT-B``, ``demo-vit``, ...: random weights, or the
  model's own, as for the bundled demo models), resolved without touching the network;
* an architecture name that takes a weights file (``swin3d_t --weights F`` or ``swin3d_t:F``);
* a local Hugging Face folder: its ``config.json`` ``model_type`` picks the family;
* a local state-dict file: the family that recognises its key layout loads it (VideoMAE / VideoMAE V2
  release ``.pth``, torchvision Swin3D, ...);
* else a hub id, fetched into the local cache (``HF_HUB_OFFLINE`` honoured) and loaded as a folder.

Loading is never trusted: the stored tensors are compared name by name (and shape by shape) with
the model's state dict and any difference raises :class:`CheckpointError`, then they are loaded with
``strict=True``. Files are read with ``safetensors`` or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from .data.transforms import Preprocessing
from .errors import CheckpointError, NotFoundError, StapruneError, UnknownModelError, UsageError
from .families.base import LoadedModel

_STATE_DICT_SUFFIXES = frozenset({".pth", ".pt", ".bin", ".safetensors", ".ckpt"})
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


# --- Hugging Face folders ----------------------------------------------------------------------
def hf_preprocessing(folder: Path | None, image_size: int, default: Preprocessing) -> Preprocessing:
    """A HF folder's ``preprocessor_config.json`` if present, else ``default``; its crop must be the
    model's input side."""
    processor = folder / "preprocessor_config.json" if folder is not None else None
    if processor is not None and processor.is_file():
        prep = Preprocessing.from_hf_processor_config(processor)
        if prep.size != image_size:
            raise CheckpointError(
                f"{processor}: crop size {prep.size} differs from the model's image_size {image_size}"
            )
        return prep
    return default


@contextlib.contextmanager
def _quiet_transformers():
    """No "Loading weights" progress bar from transformers: staprune reports what it loaded itself."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def saved_layout(model: nn.Module) -> dict[str, Tensor]:
    """The model's tensors under the names ``save_pretrained`` writes: transformers >= 5 renames some
    models' weights on load (ViViT's ``encoder.layer.N.attention.attention.key`` -> ``layers.N.attention.k_proj``)
    and back on save; older releases keep the state-dict names."""
    state = dict(model.state_dict())
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return state
    return dict(revert_weight_conversion(model, state))


def load_hf_pretrained(cls, folder: Path, name: str, *, fix_state=None) -> nn.Module:
    """``cls.from_pretrained(folder)``, then every stored tensor compared, name by name and value by
    value, with what the model holds (in the folder's own naming, :func:`saved_layout`), so nothing is
    left at its initial value. ``fix_state`` renames keys of an older layout first.

    Raises:
        CheckpointError: weights that do not fit the folder's config, names that do not match, or
            stored tensors that did not land in the model.
    """
    try:
        with _quiet_transformers():
            model = cls.from_pretrained(str(folder))
    except (OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(
            f"{name}: the weights in {folder} do not fit its config.json ({str(err).splitlines()[0][:300]})"
        ) from err
    state = read_hf_weights(folder)
    if fix_state is not None:
        state = fix_state(state)
    current = model.state_dict()
    expected = current if set(state) <= set(current) else saved_layout(model)
    verify_state_dict(model, state, f"checkpoint {name}", expected)
    ignored = [k for k in state if not torch.equal(expected[k], state[k].to(expected[k].dtype))]
    if ignored and expected is not current:
        raise CheckpointError(f"{name}: {len(ignored)} stored tensors did not load into the model: {listing(ignored)}")
    if ignored:
        # This transformers release did not load these (typically q_bias/v_bias); we do.
        print(f"staprune: {len(ignored)} stored tensors were not loaded by transformers "
              f"({listing(ignored)}); loading them explicitly", file=sys.stderr)
        load_verified(model, state, f"checkpoint {name}")
    return model.eval()


# --- dispatch -----------------------------------------------------------------------------------
def _looks_like_path(text: str) -> bool:
    # A hub id is "name" or "org/name"; anything else with path syntax is meant as a local file.
    p = Path(text)
    return (
        p.suffix in _STATE_DICT_SUFFIXES
        or text.startswith(("/", ".", "~"))
        or text.count("/") > 1
        or os.sep != "/" and os.sep in text
    )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _family_of_folder(folder: Path, name: str):
    """The family whose ``hf_model_types`` include the folder's ``config.json`` ``model_type``."""
    from .families import families

    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(
            f"{name}: the folder {folder} holds no model (no config.json); pass a Hugging Face model "
            "folder, a checkpoint file, or a registry name"
        )
    model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    for family in families():
        if model_type in family.hf_model_types:
            return family
    known = sorted(t for family in families() for t in family.hf_model_types)
    raise CheckpointError(
        f"{name}: config.json model_type {model_type!r} is not one staprune prunes (supported: {', '.join(known)})"
    )


def load_hf(name_or_path: str) -> LoadedModel:
    """A Hugging Face model from a local folder or a hub id, by its ``model_type``, verified."""
    path = Path(name_or_path).expanduser()
    folder = path if path.is_dir() else _hub_folder(name_or_path)
    return _family_of_folder(folder, name_or_path).load_folder(folder, name_or_path)


def _hub_folder(repo_id: str) -> Path:
    """The local snapshot of a hub repository (downloaded unless ``HF_HUB_OFFLINE`` is set)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    from .families import model_names

    if not _hub_offline():
        try:  # already in the local cache: no network needed
            return Path(snapshot_download(repo_id, local_files_only=True))
        except (OSError, HFValidationError, ValueError):
            pass
        _check_hub_reachable(repo_id)
    try:
        return Path(snapshot_download(repo_id, local_files_only=_hub_offline()))
    except (OSError, HFValidationError, ValueError) as err:
        offline = " (HF_HUB_OFFLINE is set: only the local cache is used)" if _hub_offline() else ""
        raise NotFoundError(
            f"cannot load model {repo_id!r}: not a registry name, not a local path and not a loadable "
            f"hub id{offline}. Registry names: {', '.join(model_names())}. ({str(err).splitlines()[0][:200]})"
        ) from err


_EPOCH_CARD = re.compile(r"^epoch_(\d{3,})\.train\.json$")


def model_card(path: Path) -> dict | None:
    """What a weights file was made from, when staprune wrote it: ``{"model", "weights", "frames",
    "image_size", "made"}`` from the training record of a ``staprune finetune`` checkpoint
    (``epoch_NNN.train.json`` beside ``epoch_NNN.safetensors``) or the card of a bundled demo model
    (``<name>.json`` naming its registry model); None for other files."""
    record = path.with_name(path.name.removesuffix(".safetensors") + ".train.json")
    try:
        if path.suffix == ".safetensors" and record.is_file():
            recipe = json.loads(record.read_text(encoding="utf-8"))["recipe"]
            return {"model": recipe["model"], "weights": recipe.get("weights"), "frames": recipe.get("frames"),
                    "image_size": recipe.get("image_size"),
                    "made": f"fine-tuned by staprune finetune ({recipe.get('method')} r={recipe.get('r')}) from "
                            f"{recipe.get('init') or recipe['model']}"}
        card = path.with_suffix(".json")
        if path.suffix == ".safetensors" and card.is_file():
            doc = json.loads(card.read_text(encoding="utf-8"))
            if isinstance(doc, dict) and isinstance(doc.get("model"), str):
                return {"model": doc["model"], "weights": None, "frames": None, "image_size": None,
                        "made": f"weights of {doc['model']} ({card.name})"}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: its card next to it is damaged ({err}); it says how to rebuild the model") from err
    return None


def latest_epoch(folder: Path) -> Path | None:
    """The weights of the last complete epoch of a ``staprune finetune`` run folder, or None."""
    epochs = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _EPOCH_CARD.match(p.name)))
    complete = [e for e in epochs if (folder / f"epoch_{e:03d}.safetensors").is_file()]
    return folder / f"epoch_{complete[-1]:03d}.safetensors" if complete else None


def _load_from_card(path: Path, card: dict, state: Mapping[str, Tensor]) -> LoadedModel:
    """Rebuild the architecture the card names, then load ``state`` into it, verified."""
    base_spec = card["model"]
    if Path(base_spec).expanduser().resolve() == path.resolve():
        raise CheckpointError(f"{path}: its card names the file itself as the model it was made from")
    try:
        loaded = load(base_spec, card.get("weights"), frames=card.get("frames"), image_size=card.get("image_size"))
    except StapruneError as err:
        raise CheckpointError(f"{path} was {card['made']}; staprune rebuilds that architecture to load it, "
                              f"but: {err}") from err
    load_verified(loaded.model, state, f"checkpoint {path}")
    loaded.source = f"{path} ({card['made']})"
    return loaded


def _check_hub_reachable(repo_id: str, timeout: float = 3.0) -> None:
    """Fail at once, in one line, when the hub cannot be reached (instead of its retries)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise NotFoundError(
            f"cannot load model {repo_id!r}: it is not a registry name or a local path, and the Hugging Face hub "
            f"({host}) cannot be reached ({err.strerror or type(err).__name__}); pass a local folder, or set "
            "HF_HUB_OFFLINE=1 to use only the local cache"
        ) from err


def load_file(path: Path, *, frames: int | None = None, image_size: int | None = None,
              num_heads: int | None = None) -> LoadedModel:
    """A state-dict file: one staprune wrote (its card says which architecture, see
    :func:`model_card`), else loaded by the family that recognises its key layout."""
    from .families import families

    state = read_state_dict(path)
    card = model_card(path)
    if card is not None:
        return _load_from_card(path, card, state)
    for family in families():
        if family.claims_file(state):
            return family.load_file(path, state, frames=frames, image_size=image_size, num_heads=num_heads)
    raise CheckpointError(
        f"{path}: unrecognised state dict (no model family reads this key layout); "
        f"keys: {listing(state)}. For a Hugging Face checkpoint pass its folder."
    )


def load_registry(name: str, frames: int | None = None, image_size: int | None = None) -> LoadedModel:
    """A registry model: its own weights when the entry has a loader (the demo models), else a
    model of its geometry with RANDOM weights (timing, FLOPs, smoke tests)."""
    from .families import family_of_entry, model_entry

    entry = model_entry(name)
    spec = entry.spec_for(frames, image_size)
    family = family_of_entry(entry)
    if entry.loader is not None:
        return entry.loader("auto")
    loaded = family.wrap(family.build(spec), f"registry:{name} (random weights)")
    if entry.preprocessing is not None:
        loaded.preprocessing = entry.preprocessing
    loaded.protocols, loaded.levels = entry.protocols, entry.levels
    return loaded


def load(
    spec: str,
    weights: str | Path | None = None,
    *,
    frames: int | None = None,
    image_size: int | None = None,
    num_heads: int | None = None,
) -> LoadedModel:
    """Load a model for evaluation from a CLI-style ``spec``.

    Args:
        spec: a registry name (``ViT-B``, ..., random weights; ``demo-vit`` its bundled weights);
            ``swin3d_t`` (with ``weights``) or ``swin3d_t:PATH``; a checkpoint file (family inferred
            from its keys); a HF folder; else a HF hub id.
        weights: weights file for an architecture name (``swin3d_t``).
        frames, image_size, num_heads: geometry for release checkpoints and registry models (not
            stored in those files); ignored otherwise.

    Raises:
        FileNotFoundError: a path that does not exist (or an unloadable hub id).
        CheckpointError: weights that do not match the model (missing / unexpected / shapes).
    """
    from .families import families, find_model, model_names, suggest

    builders = {name: family for family in families() for name in family.builder_names}
    name, _, rest = spec.partition(":")
    if weights is None and name in builders and rest:
        spec, weights = name, rest
    if spec in builders:
        if weights is None:
            raise UsageError(f"{spec} needs local weights: --model {spec} --weights PATH (or {spec}:PATH)")
        return builders[spec].load_builder(spec, weights)
    if weights is not None:
        raise UsageError(f"--weights is only for architecture names ({', '.join(builders)})")
    if find_model(spec) is not None:
        return load_registry(spec, frames, image_size)
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and (last := latest_epoch(path)) is not None:
        return load_file(last)  # a `staprune finetune` run folder: its last epoch
    if path.is_dir():
        return load_hf(str(path))
    if path.is_file():
        return load_file(path, frames=frames, image_size=image_size, num_heads=num_heads)
    if _looks_like_path(spec):
        raise NotFoundError(f"checkpoint not found: {spec}")
    hint = suggest(spec)
    if hint is not None and "/" not in spec:  # a near-miss of a registry name, not a hub id: no network
        raise UnknownModelError(f"unknown model {spec!r}; did you mean {hint!r}? Registry names: {', '.join(model_names())}")
    return load_hf(spec)

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

import functools
import json
import os
import zlib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.config import config_from_record
from ..core.errors import (
    CheckpointError,
    ConfigError,
    NotFoundError,
    StapruneError,
    UnknownModelError,
    UsageError,
)
from ..families import (
    Family,
    families,
    family_named,
    family_of_entry,
    find_model,
    model_entry,
    model_names,
    require_kind,
    suggest,
)
from ..families.base import LoadedModel
from ..storage.runfolder import epoch_files, latest_epoch, training_record_of
from ..storage.state_dicts import STATE_DICT_SUFFIXES, listing, load_verified, read_state_dict
from .memory import check_weights_fit, parameter_count
from .patching import patch, saved_pruning


# --- dispatch -----------------------------------------------------------------------------------
def _looks_like_path(text: str) -> bool:
    # A hub id is "name" or "org/name"; anything else with path syntax is meant as a local file.
    p = Path(text)
    return (
        p.suffix in STATE_DICT_SUFFIXES
        or text.startswith(("/", ".", "~"))
        or text.count("/") > 1
        or os.sep != "/" and os.sep in text
    )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _family_of_folder(folder: Path, name: str) -> Family:
    """The family whose ``hf_model_types`` include the folder's ``config.json`` ``model_type``."""
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(
            f"{name}: the folder {folder} holds no model (no config.json); pass a Hugging Face model "
            "folder, a checkpoint file, or a registry name"
        )
    try:
        document = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{name}: {config} is not valid JSON ({err}); restore it from where the model "
                              "came from") from err
    model_type = document.get("model_type") if isinstance(document, dict) else None
    for family in families():
        if model_type in family.hf_model_types:
            return family
    known = sorted(t for family in families() for t in family.hf_model_types)
    raise CheckpointError(
        f"{name}: config.json model_type {model_type!r} is not one staprune prunes (supported: {', '.join(known)})"
    )


def family_before_loading(spec: str) -> Family | None:
    """The family of what ``spec`` names, known without building a model or reading a weight: a
    registry name's, or a local Hugging Face folder's (its ``config.json`` ``model_type``). None
    where only loading tells (checkpoint files, run folders, hub ids, architecture names)."""
    entry = find_model(str(spec))
    if entry is not None:
        return family_named(entry.family)
    folder = Path(str(spec)).expanduser()
    if str(spec).strip() and (folder / "config.json").is_file():
        return _family_of_folder(folder, str(spec))
    return None


def require_model_kind(spec: str, kind: str, what: str, instead: str = "") -> None:
    """Refuse, in one line and before any work, to run ``what`` on a model of another kind (as far
    as :func:`family_before_loading` tells; the command checks the loaded model's family again)."""
    family = family_before_loading(spec)
    if family is not None:
        require_kind(family, kind, what, instead)


def folder_skeleton(path: str | Path) -> nn.Module | None:
    """A local Hugging Face folder's model built on the meta device from its ``config.json`` alone:
    its geometry without reading or allocating a weight (``staprune flops``). None when ``path`` is
    not such a folder or its config names no transformers class."""
    import transformers

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        return None
    _family_of_folder(folder, str(path))  # a model_type staprune prunes, or the usual one-line error
    config = transformers.AutoConfig.from_pretrained(str(folder))
    cls = getattr(transformers, (config.architectures or [""])[0], None)
    if cls is None:
        return None
    with torch.device("meta"):
        return cls._from_config(config)


def load_hf(name_or_path: str) -> LoadedModel:
    """A Hugging Face model from a local folder or a hub id, by its ``model_type``, verified."""
    path = Path(name_or_path).expanduser()
    folder = path if path.is_dir() else _hub_folder(name_or_path)
    return _family_of_folder(folder, name_or_path).load_folder(folder, name_or_path)


def _hub_folder(repo_id: str) -> Path:
    """The local snapshot of a hub repository (downloaded unless ``HF_HUB_OFFLINE`` is set)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

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


def model_card(path: Path) -> dict | None:
    """What a weights file was made from, when staprune wrote it: ``{"model", "weights", "frames",
    "image_size", "made"}`` from the training record of a ``staprune finetune`` checkpoint
    (``epoch_NNN.train.json`` beside ``epoch_NNN.safetensors``) or the card of a bundled demo model
    (``<name>.json`` naming its registry model); None for other files."""
    record = training_record_of(path)
    try:
        if path.suffix == ".safetensors" and record.is_file():
            recipe = json.loads(record.read_text(encoding="utf-8"))["recipe"]
            pruning = None  # what the model was trained with, restored with it
            if recipe.get("method", "none") != "none" and recipe.get("r"):
                pruning = config_from_record({**(recipe.get("options") or {}), "r": recipe["r"], "method": recipe["method"]})
            return {"model": recipe["model"], "weights": recipe.get("weights"), "frames": recipe.get("frames"),
                    "image_size": recipe.get("image_size"), "pruning": pruning,
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
    loaded.pruning = card.get("pruning")
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


INITS = ("auto", "bundled", "random")


def registry_seed(name: str) -> int:
    """The seed of a registry model's random weights, fixed by its name: every run builds the same
    model, so a resumed run continues the same result."""
    return zlib.crc32(f"staprune registry model {name}".encode())


def load_registry(name: str, frames: int | None = None, image_size: int | None = None,
                  init: str = "auto", dtype: torch.dtype | None = None) -> LoadedModel:
    """A registry model: its own weights when the entry has a loader (the demo models; ``init``
    chooses, see :func:`load`), else a model of its geometry with RANDOM weights (timing, FLOPs,
    smoke tests), drawn from :func:`registry_seed` (torch's global RNG is left as it was) in ``dtype``
    (default fp32). One too large for the machine's free memory is refused before it is built."""
    entry = model_entry(name)
    spec = entry.spec_for(frames, image_size)
    family = family_of_entry(entry)
    if entry.loader is not None:
        return entry.loader(init)
    if init == "bundled":
        raise UsageError(f"--init bundled is for models with weights of their own (the demo models), not {name}")
    chosen, dtype = dtype is not None, dtype or torch.float32
    parameters = parameter_count(functools.partial(family.build, spec))

    def smaller() -> list[tuple[str, int]]:  # the family's other registry models with fewer parameters
        others = [other for other in model_names() if model_entry(other).family == entry.family and other != name]
        counts = [(other, parameter_count(functools.partial(family.build, model_entry(other).spec_for())))
                  for other in others]
        return [(other, count) for other, count in counts if count < parameters]

    check_weights_fit(name, parameters, dtype, smaller, offer_dtype=chosen)  # --dtype only where a command has it
    default = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(registry_seed(name))
        torch.set_default_dtype(dtype)  # built in the dtype it runs in: no fp32 copy on the way
        try:
            model = family.build(spec)
        finally:
            torch.set_default_dtype(default)
    loaded = family.wrap(model, f"registry:{name} (random weights)")
    if entry.preprocessing is not None:
        loaded.preprocessing = entry.preprocessing
    # A paper's levels are for the paper's clip; on another the family scales them (LoadedModel.default_levels).
    loaded.protocols, loaded.levels = entry.protocols, entry.levels if spec == entry.spec else None
    return loaded


def load(
    spec: str,
    weights: str | Path | None = None,
    *,
    frames: int | None = None,
    image_size: int | None = None,
    num_heads: int | None = None,
    init: str = "auto",
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """The one loader: a model in eval mode, with what commands need to know about it, from what a
    user typed. Every command and script loads through here.

    Args:
        spec: a registry name (``ViT-B``, ..., random weights; ``demo-vit`` its bundled weights);
            ``swin3d_t`` (with ``weights``) or ``swin3d_t:PATH``; a checkpoint file (family inferred
            from its keys, or from the card staprune wrote beside it); a ``staprune finetune`` run
            folder (its last complete epoch); a HF folder; else a HF hub id.
        weights: weights file for an architecture name (``swin3d_t``).
        frames: input frames, for release checkpoints and registry models (not stored in those
            files); ignored otherwise.
        image_size: input side, likewise.
        num_heads: attention heads of a release checkpoint of an unusual width, likewise.
        init: for registry models with weights of their own (the demo models): ``auto`` (theirs if
            installed, else untrained), ``bundled`` (theirs, or an error) or ``random`` (untrained,
            drawn from torch's global RNG: seed it first for a repeatable init).
        dtype: the number format a registry model with random weights is built in (default fp32;
            other models load as stored and are cast by the caller). A registry model's random
            weights are drawn from a seed fixed by its name (:func:`registry_seed`).

    Raises:
        FileNotFoundError: a path that does not exist (or an unloadable hub id).
        CheckpointError: weights that do not match the model (missing / unexpected / shapes).
    """
    if init not in INITS:
        raise UsageError(f"init={init!r}; choose one of {', '.join(INITS)}")
    if not str(spec).strip():  # Path("") is the current folder: say what was typed instead
        raise UsageError("the model is empty; give a registry name (`staprune flops` lists them), a folder or a file")
    loaded = _resolve(spec, weights, frames, image_size, num_heads, init, dtype)
    return _restore_pruning(_at_image_size(loaded, image_size))


def _restore_pruning(loaded: LoadedModel) -> LoadedModel:
    """Patch a model that was saved pruned: ``save_pretrained`` of a patched model recorded its
    STAConfig in ``config.json``; a ``staprune finetune`` checkpoint's recipe names its pruning.
    Commands then take its r as the model's level."""
    config = saved_pruning(loaded.model) or loaded.pruning
    if config is None or config.method == "none":
        return loaded
    patch(loaded.model, config=config)
    loaded.pruning = config
    if config.r > 0:
        loaded.levels = (config.r,)
    loaded.source += f" (restored: {config.method} {config.budget})"
    return loaded


def _at_image_size(loaded: LoadedModel, image_size: int | None) -> LoadedModel:
    """Honour ``image_size`` for every model: one that takes any input side (Video Swin) reads its
    views at it; one built for a fixed side refuses another rather than ignoring it."""
    if image_size is None or image_size == loaded.image_size:
        return loaded
    if loaded.image_size is not None:
        raise ConfigError(f"{loaded.source} takes {loaded.image_size}x{loaded.image_size} clips (its size is fixed "
                          f"by its config); drop --image-size {image_size}")
    loaded.family.spec_of(loaded.model, None, image_size)  # refuses a side its patches do not divide
    loaded.preprocessing = replace(loaded.preprocessing, size=image_size)
    return loaded


def _resolve(spec: str, weights: str | Path | None, frames: int | None, image_size: int | None,
             num_heads: int | None, init: str, dtype: torch.dtype | None) -> LoadedModel:
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
        return load_registry(spec, frames, image_size, init, dtype)
    if init != "auto":
        raise UsageError(f"--init {init} is for models with weights of their own (the demo models), not {spec}")
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and (last := latest_epoch(path)) is not None:
        return load_file(epoch_files(path, last).weights)  # a `staprune finetune` run folder: its last epoch
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

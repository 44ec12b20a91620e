"""Load evaluation models and verify that every stored weight landed where it belongs.

Supported sources (see :func:`load`):

* a Hugging Face VideoMAE directory or hub id (``VideoMAEForVideoClassification.from_pretrained``,
  which honours ``HF_HUB_OFFLINE``); preprocessing from its ``preprocessor_config.json``;
* the original VideoMAE release's fine-tuned ``.pth`` (``blocks.0.attn.qkv.weight``, ``q_bias``,
  ...), converted to the HF layout with the config inferred from the tensor shapes;
* a torchvision Swin3D (``swin3d_t/s/b``) with a local weights file;
* a registry name of :mod:`staprune.models` (random weights, for smoke tests).

Loading is never trusted: the stored tensors are compared name by name (and shape by shape) with
the model's state dict and any difference raises :class:`CheckpointError`, then they are loaded with
``strict=True``. Files are read with ``safetensors`` or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from .data.transforms import Preprocessing

SWIN_NAMES: tuple[str, ...] = ("swin3d_t", "swin3d_s", "swin3d_b")
# (embed dim, blocks in stage 3 = features.4) -> torchvision builder name; how a bare Swin file reveals its size.
_SWIN_BY_SHAPE: dict[tuple[int, int], str] = {(96, 6): "swin3d_t", (96, 18): "swin3d_s", (128, 18): "swin3d_b"}
_STATE_DICT_SUFFIXES = frozenset({".pth", ".pt", ".bin", ".safetensors", ".ckpt"})
# Heads of the VideoMAE release models (not recoverable from shapes); others default to head dim 64.
_RELEASE_HEADS: dict[int, int] = {384: 6, 768: 12, 1024: 16, 1280: 16}
# Buffers a model computes itself; a checkpoint may or may not store them.
_DERIVABLE = re.compile(r"(^|\.)relative_position_index$")
_MAX_LISTED = 10


class CheckpointError(RuntimeError):
    """A checkpoint does not match the model it is loaded into (or cannot be interpreted)."""


@dataclass
class LoadedModel:
    """A model ready for evaluation plus what the evaluator must know about it.

    Attributes:
        model: the network in eval mode, on CPU, float32.
        backbone: ``vit`` (VideoMAE, input (B, T, 3, H, W)) or ``swin`` (torchvision, (B, 3, T, H, W)).
        preprocessing: resize/crop size and normalisation for this checkpoint.
        num_classes: width of the classifier.
        frames: input frames the model is built for (None: any, as for Swin).
        image_size: input side the model is built for (None: any).
        source: human-readable origin, for logs and ``results.json``.
    """

    model: nn.Module
    backbone: Literal["vit", "swin"]
    preprocessing: Preprocessing
    num_classes: int
    frames: int | None
    image_size: int | None
    source: str

    def logits(self, views: Tensor) -> Tensor:
        """Views (B, T, 3, H, W) in the model's dtype/device -> logits (B, num_classes)."""
        x = views.transpose(1, 2) if self.backbone == "swin" else views  # Swin3D wants (B, 3, T, H, W)
        out = self.model(x)
        return out.logits if hasattr(out, "logits") else out


# --- reading and checking state dicts -----------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint file, unwrapped and with wrapper prefixes removed.

    Reads ``.safetensors`` with safetensors, anything else with ``torch.load(weights_only=True)``
    (an ``argparse.Namespace`` of training args is allowed, as in the VideoMAE release files).
    Descends into ``model`` / ``module`` / ``state_dict`` / ``model_state`` entries and strips a
    ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix shared by all keys.

    Raises:
        FileNotFoundError: no such file. CheckpointError: no tensors inside.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: object = load_file(str(path), device="cpu")
    else:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in ("model", "module", "state_dict", "model_state") if k in obj), None)
        if not isinstance(inner, Mapping):
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {_listing(map(str, obj))})")
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


def _listing(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def verify_state_dict(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` unless ``state`` provides exactly the model's tensors.

    Compares names (missing / unexpected) and shapes; buffers a model derives itself (Swin's
    ``relative_position_index``) may be absent. Lists up to 10 names per kind of problem.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not _DERIVABLE.search(k)]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing weight(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weight(s): {_listing(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_listing(shapes)}")
    if problems:
        raise CheckpointError(f"{source} does not match {type(model).__name__}: " + "; ".join(problems))


def load_verified(model: nn.Module, state: Mapping[str, Tensor], source: str) -> nn.Module:
    """:func:`verify_state_dict`, then copy the tensors in (derivable buffers keep the model's own)."""
    verify_state_dict(model, state, source)
    full = dict(model.state_dict())
    full.update(state)
    model.load_state_dict(full, strict=True)
    return model


# --- VideoMAE: HF layout ------------------------------------------------------------------------
_QV_BIAS = re.compile(r"^(.*\.attention\.attention)\.(q|v)_bias$")


def map_qv_bias(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename HF-layout ``...attention.attention.q_bias``/``v_bias`` to ``query.bias``/``value.bias``.

    Older transformers kept VideoMAE's biases as separate ``q_bias``/``v_bias`` parameters; newer ones
    use ``query.bias``/``value.bias`` and would leave those at their initial values.

    Returns:
        (renamed state dict, original names that were renamed).
    """
    out: dict[str, Tensor] = {}
    renamed: list[str] = []
    for key, value in state.items():
        m = _QV_BIAS.match(key)
        if m:
            target = f"{m.group(1)}.{'query' if m.group(2) == 'q' else 'value'}.bias"
            if target in state and not torch.equal(state[target], value):
                raise CheckpointError(f"checkpoint stores both {key} and {target} with different values")
            out[target] = value
            renamed.append(key)
        elif key not in out:
            out[key] = value
    return out, renamed


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


def _hf_folder(name_or_path: str) -> Path:
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    # from_pretrained has already fetched what it needed; only read the local cache here.
    return Path(snapshot_download(name_or_path, local_files_only=True))


def _vit_preprocessing(folder: Path | None, image_size: int) -> Preprocessing:
    processor = folder / "preprocessor_config.json" if folder is not None else None
    if processor is not None and processor.is_file():
        prep = Preprocessing.from_hf_processor_config(processor)
        if prep.size != image_size:
            raise ValueError(
                f"{processor}: crop size {prep.size} differs from the model's image_size {image_size}"
            )
        return prep
    return Preprocessing.imagenet_default(size=image_size)


def _videomae_loaded(model: nn.Module, folder: Path | None, source: str) -> LoadedModel:
    cfg = model.config
    size = cfg.image_size if isinstance(cfg.image_size, int) else int(cfg.image_size[0])
    return LoadedModel(
        model=model.eval(),
        backbone="vit",
        preprocessing=_vit_preprocessing(folder, size),
        num_classes=int(cfg.num_labels),
        frames=int(cfg.num_frames),
        image_size=size,
        source=source,
    )


def load_hf_videomae(name_or_path: str) -> LoadedModel:
    """A HF ``VideoMAEForVideoClassification`` from a local directory or a hub id, verified.

    After ``from_pretrained`` the stored tensors are read again, ``q_bias``/``v_bias`` names are
    mapped (see :func:`map_qv_bias`), and the set of names must equal the model's; then they are
    loaded strictly, so nothing is left at its initial value.
    """
    from transformers import VideoMAEForVideoClassification

    try:
        model = VideoMAEForVideoClassification.from_pretrained(name_or_path)
    except OSError as e:
        offline = " (HF_HUB_OFFLINE is set: only the local cache is used)" if _hub_offline() else ""
        raise FileNotFoundError(
            f"cannot load VideoMAE checkpoint {name_or_path!r}: not a local directory and not a loadable "
            f"hub id{offline}. Valid model names: {', '.join(_registry_names())} (random weights), "
            f"{', '.join(SWIN_NAMES)} with --weights, or a local checkpoint path. ({e})"
        ) from e
    folder = _hf_folder(name_or_path)
    state, _ = map_qv_bias(read_hf_weights(folder))
    verify_state_dict(model, state, f"checkpoint {name_or_path}")
    current = model.state_dict()
    ignored = [k for k in state if not torch.equal(current[k], state[k].to(current[k].dtype))]
    if ignored:
        # This transformers release did not load these (typically q_bias/v_bias); we do.
        print(f"staprune: {len(ignored)} stored tensors were not loaded by transformers "
              f"({_listing(ignored)}); loading them explicitly", file=sys.stderr)
    load_verified(model, state, f"checkpoint {name_or_path}")
    return _videomae_loaded(model, folder, f"hf:{name_or_path}")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# --- VideoMAE: original release layout ----------------------------------------------------------
_RELEASE_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"^patch_embed\.proj\.(weight|bias)$", r"videomae.embeddings.patch_embeddings.projection.\1"),
        (r"^blocks\.(\d+)\.norm1\.(weight|bias)$", r"videomae.encoder.layer.\1.layernorm_before.\2"),
        (r"^blocks\.(\d+)\.norm2\.(weight|bias)$", r"videomae.encoder.layer.\1.layernorm_after.\2"),
        (r"^blocks\.(\d+)\.attn\.q_bias$", r"videomae.encoder.layer.\1.attention.attention.query.bias"),
        (r"^blocks\.(\d+)\.attn\.v_bias$", r"videomae.encoder.layer.\1.attention.attention.value.bias"),
        (r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$", r"videomae.encoder.layer.\1.attention.output.dense.\2"),
        (r"^blocks\.(\d+)\.mlp\.fc1\.(weight|bias)$", r"videomae.encoder.layer.\1.intermediate.dense.\2"),
        (r"^blocks\.(\d+)\.mlp\.fc2\.(weight|bias)$", r"videomae.encoder.layer.\1.output.dense.\2"),
        (r"^fc_norm\.(weight|bias)$", r"fc_norm.\1"),
        (r"^norm\.(weight|bias)$", r"videomae.layernorm.\1"),
        (r"^head\.(weight|bias)$", r"classifier.\1"),
    )
)
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


def is_videomae_release(state: Mapping[str, Tensor]) -> bool:
    """True for the original VideoMAE code's key layout (``blocks.N.attn.qkv.weight``)."""
    return "patch_embed.proj.weight" in state and any(_QKV.match(k) for k in state)


def convert_videomae_release(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename a release state dict to HF ``VideoMAEForVideoClassification`` names.

    ``qkv.weight`` (3C, C) is split into query/key/value in that order (the release code's
    ``reshape(B, N, 3, heads, d)``); ``q_bias``/``v_bias`` become query/value biases (HF has no key
    bias; a stored ``qkv.bias`` must have a zero key part).

    Returns:
        (converted tensors, release names that matched no rule).
    """
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        m = _QKV.match(key)
        if m:
            layer, kind = m.groups()
            q, k, v = value.chunk(3, dim=0)
            base = f"videomae.encoder.layer.{layer}.attention.attention"
            if kind == "bias" and bool(k.ne(0).any()):
                raise CheckpointError(f"{key}: non-zero key bias, which VideoMAE (HF) cannot represent")
            out[f"{base}.query.{kind}"], out[f"{base}.value.{kind}"] = q, v
            if kind == "weight":
                out[f"{base}.key.weight"] = k
            continue
        for pattern, replacement in _RELEASE_RULES:
            if pattern.match(key):
                out[pattern.sub(replacement, key)] = value
                break
        else:
            unknown.append(key)
    return out, unknown


def videomae_release_config(
    state: Mapping[str, Tensor],
    *,
    num_frames: int = 16,
    image_size: int = 224,
    num_heads: int | None = None,
    layer_norm_eps: float = 1e-6,
):
    """A ``VideoMAEConfig`` inferred from release tensor shapes.

    Read from shapes: hidden size, tubelet and patch size (patch embedding weight
    (C, 3, tubelet, p, p)), depth, MLP width, classes, mean pooling (``fc_norm`` present) and
    q/v biases. Not recoverable from shapes, hence arguments: ``num_frames`` and ``image_size``
    (the sinusoidal position table is not stored; release models use 16 x 224²), ``num_heads``
    (default: the release models' 6/12/16/16 for hidden 384/768/1024/1280, else head dim 64) and
    ``layer_norm_eps`` (the release code uses 1e-6).
    """
    from transformers import VideoMAEConfig

    if "head.weight" not in state:
        raise CheckpointError(
            "no classifier ('head.weight'): this looks like a pre-training checkpoint, not a fine-tuned one"
        )
    hidden, channels, tubelet, patch, _ = state["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := _QKV.match(k)))
    if num_heads is None:
        num_heads = _RELEASE_HEADS.get(hidden, hidden // 64 if hidden % 64 == 0 else 0)
        if not num_heads:
            raise CheckpointError(f"cannot infer attention heads for hidden size {hidden}; pass num_heads")
    return VideoMAEConfig(
        image_size=image_size,
        patch_size=int(patch),
        num_channels=int(channels),
        num_frames=num_frames,
        tubelet_size=int(tubelet),
        hidden_size=int(hidden),
        num_hidden_layers=depth,
        num_attention_heads=num_heads,
        intermediate_size=int(state["blocks.0.mlp.fc1.weight"].shape[0]),
        qv_bias="blocks.0.attn.q_bias" in state or "blocks.0.attn.qkv.bias" in state,
        use_mean_pooling="fc_norm.weight" in state,
        layer_norm_eps=layer_norm_eps,
        num_labels=int(state["head.weight"].shape[0]),
    )


def load_videomae_release(
    path: str | Path,
    *,
    num_frames: int = 16,
    image_size: int = 224,
    num_heads: int | None = None,
    layer_norm_eps: float = 1e-6,
) -> LoadedModel:
    """A fine-tuned checkpoint of the original VideoMAE code as a HF model, verified.

    The release's ``fc_norm`` uses ``layer_norm_eps`` too (HF's defaults to 1e-5), so it is set to
    match. Preprocessing: ImageNet mean/std at ``image_size``.
    """
    from transformers import VideoMAEForVideoClassification

    state = read_state_dict(path)
    if not is_videomae_release(state):
        raise CheckpointError(f"{path}: not a VideoMAE release checkpoint (keys: {_listing(state)})")
    converted, unknown = convert_videomae_release(state)
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} unexpected weight(s): {_listing(unknown)}")
    config = videomae_release_config(
        state, num_frames=num_frames, image_size=image_size, num_heads=num_heads, layer_norm_eps=layer_norm_eps
    )
    model = VideoMAEForVideoClassification(config)
    if model.fc_norm is not None:
        model.fc_norm.eps = layer_norm_eps
    load_verified(model, converted, f"checkpoint {path}")
    return _videomae_loaded(model, None, f"videomae-release:{path}")


# --- torchvision Swin3D -------------------------------------------------------------------------
def swin_name_from_state(state: Mapping[str, Tensor]) -> str:
    """Which of swin3d_t/s/b a torchvision Swin3D state dict belongs to (embed dim, stage-3 depth)."""
    embed = int(state["patch_embed.proj.weight"].shape[0])
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"^features\.4\.(\d+)\.", k))}
    name = _SWIN_BY_SHAPE.get((embed, len(blocks)))
    if name is None:
        raise CheckpointError(f"unknown Swin3D geometry: embed {embed}, {len(blocks)} blocks in stage 3")
    return name


def load_torchvision_swin(name: str | None, weights: str | Path) -> LoadedModel:
    """torchvision ``swin3d_{t,s,b}`` with weights from a local file, verified.

    ``name=None`` infers the variant from the tensors. The class count comes from ``head.weight``.
    Preprocessing: :meth:`Preprocessing.kinetics_swin` (ImageNet mean/std, 224).
    """
    import torchvision.models.video as tvv

    state = read_state_dict(weights)
    if "patch_embed.proj.weight" not in state or "head.weight" not in state:
        raise CheckpointError(f"{weights}: not a torchvision Swin3D state dict (keys: {_listing(state)})")
    name = name or swin_name_from_state(state)
    if name not in SWIN_NAMES:
        raise ValueError(f"unknown Swin3D {name!r}; valid: {', '.join(SWIN_NAMES)}")
    model = getattr(tvv, name)(weights=None, num_classes=int(state["head.weight"].shape[0]))
    load_verified(model, state, f"checkpoint {weights}")
    return LoadedModel(
        model=model.eval(),
        backbone="swin",
        preprocessing=Preprocessing.kinetics_swin(),
        num_classes=int(model.head.out_features),
        frames=None,
        image_size=None,
        source=f"torchvision:{name}:{weights}",
    )


# --- registry (random weights) ------------------------------------------------------------------
def _registry_names() -> tuple[str, ...]:
    from .models import MODEL_NAMES

    return tuple(MODEL_NAMES)


def load_registry(name: str, frames: int | None = None, image_size: int | None = None) -> LoadedModel:
    """A :mod:`staprune.models` registry model with RANDOM weights (smoke tests, timing)."""
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    from .models import build_model

    model = build_model(name, frames=frames, size=image_size)
    if isinstance(model, SwinTransformer3d):
        return LoadedModel(
            model, "swin", Preprocessing.kinetics_swin(image_size or 224), int(model.head.out_features),
            None, None, f"registry:{name} (random weights)",
        )
    return _videomae_loaded(model, None, f"registry:{name} (random weights)")


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
        spec: ``swin3d_t`` (with ``weights``) or ``swin3d_t:PATH``; a registry name (``ViT-B``, ...,
            random weights); a VideoMAE release ``.pth`` or a torchvision Swin3D state-dict file
            (variant inferred); a HF directory; else a HF hub id.
        weights: weights file for a torchvision Swin3D name.
        frames, image_size, num_heads: geometry for VideoMAE release checkpoints and registry
            models (not stored in those files); ignored otherwise.

    Raises:
        FileNotFoundError: a path that does not exist (or an unloadable hub id).
        CheckpointError: weights that do not match the model (missing / unexpected / shapes).
    """
    name, _, rest = spec.partition(":")
    if weights is None and name in SWIN_NAMES and rest:
        weights = rest
        spec = name
    if spec in SWIN_NAMES:
        if weights is None:
            raise ValueError(f"{spec} needs local weights: --model {spec} --weights PATH (or {spec}:PATH)")
        return load_torchvision_swin(spec, weights)
    if weights is not None:
        raise ValueError(f"--weights is only for torchvision Swin3D names ({', '.join(SWIN_NAMES)})")
    if spec in _registry_names():
        return load_registry(spec, frames, image_size)
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_hf_videomae(str(path))
    if path.is_file():
        state = read_state_dict(path)
        if is_videomae_release(state):
            return load_videomae_release(
                path, num_frames=frames or 16, image_size=image_size or 224, num_heads=num_heads
            )
        if any(k.startswith("features.") for k in state) and "patch_embed.proj.weight" in state:
            return load_torchvision_swin(None, path)
        raise CheckpointError(
            f"{path}: unrecognised state dict (neither VideoMAE release nor torchvision Swin3D); "
            f"keys: {_listing(state)}. For a HF checkpoint pass its directory."
        )
    if _looks_like_path(spec):
        raise FileNotFoundError(f"checkpoint not found: {spec}")
    return load_hf_videomae(spec)

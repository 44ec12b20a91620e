"""VideoMAE and VideoMAE V2 (Hugging Face ``VideoMAEModel`` / ``VideoMAEForVideoClassification``).

The paper's ViT family: joint space-time attention over ``T/2 x (H/p)(W/p)`` tubelet tokens, no
CLS token, mean pooling. Token ``t * N + s`` is tubelet-frame ``t``, spatial token ``s``.

**Adapter.** It only finds tensors and applies indices: the attention of a pruning block records
the metric (keys / queries / values), the block's output is handed to :mod:`staprune.core.score` (or the
baselines), and the returned indices are gathered. Blocks that do not prune keep the stock
forward, except under ToMe, whose proportional attention needs every block's attention.

**Loading.** HF folders (``model_type: videomae``; older ``q_bias``/``v_bias`` names mapped), and
the original code's fine-tuned ``.pth`` of VideoMAE and VideoMAE V2 (``blocks.N.attn.qkv.weight``,
``q_bias``, ...: ViT-S/B/L/H, V2's ViT-g/14 and its distilled ViT-S/B), converted to the HF layout
with the config read off the tensor shapes and verified tensor by tensor.

**Registry.** ``ViT-S/B/L/H`` (VideoMAE, 16x224², tubelet 2, patch 16: the paper's Table 2) and
``VideoMAEv2-S/B/g`` (V2's distilled ViT-S/B and ViT-g/14: 1408 wide, 40 layers, MLP 6144, patch 14,
so 16x16 tokens per frame at 224²).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters.state import Patch, current_stage, final_kept
from ..core.baselines import tome_merge
from ..core.config import PruningPlan, STAConfig, resolve_plan
from ..core.errors import CheckpointError, ConfigError
from ..core.flops import FlopCount, tubelet_vit_parts
from ..core.score import gather_tokens, head_mean
from ..data.sampling import ViewProtocol
from ..storage.state_dicts import listing, load_verified, read_state_dict
from .base import (
    PAPER_VIT_LEVELS,
    FamilyModels,
    LoadedModel,
    ModelEntry,
    Spec,
    check_frames,
    scaled_levels,
)
from .hf import HuggingFaceFamily, load_hf_pretrained

PAPER_R = (0, *PAPER_VIT_LEVELS)


@dataclass(frozen=True)
class ViTSpec(Spec):
    """A VideoMAE ViT: ``frames`` input frames of ``size``² pixels, cut into tubelets."""

    family = "videomae"
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    frames: int = 16
    size: int = 224
    tubelet: int = 2
    patch: int = 16
    num_classes: int = 400
    in_chans: int = 3

    @property
    def tubelet_frames(self) -> int:
        return self.frames // self.tubelet

    @property
    def grid_side(self) -> int:
        return self.size // self.patch

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_side**2

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden * self.mlp_ratio)


# --- adapter ------------------------------------------------------------------------------------
def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def _input_geometry(config, pixels: Tensor) -> tuple[int, int, int]:
    """Tubelet-frames, tokens per frame and the token grid width of an input ``(B, T, 3, H, W)``."""
    if pixels.dim() != 5:
        raise ConfigError(f"VideoMAE takes clips (B, T, 3, H, W); got a tensor of shape {tuple(pixels.shape)}")
    frames, channels, height, width = pixels.shape[1:]
    if channels != config.num_channels and frames == config.num_channels:
        raise ConfigError(
            f"VideoMAE takes (B, T, 3, H, W) clips; this input {tuple(pixels.shape)} looks like (B, 3, T, H, W): "
            "transpose dims 1 and 2"
        )
    patch = config.patch_size
    t = check_frames(frames, config.tubelet_size, "this VideoMAE")
    return t, (height // patch) * (width // patch), width // patch


def _qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys, values ``(B, heads, L, d)`` exactly as the stock module computes them.

    transformers >= 5 keeps VideoMAE's q/v biases inside ``query``/``value``; older releases
    stored them as separate ``q_bias``/``v_bias`` parameters.
    """
    shape = (*x.shape[:-1], -1, attn.attention_head_size)
    q_bias = getattr(attn, "q_bias", None)
    if q_bias is not None:
        q = F.linear(x, attn.query.weight, q_bias)
        k = F.linear(x, attn.key.weight, torch.zeros_like(attn.v_bias))
        v = F.linear(x, attn.value.weight, attn.v_bias)
    else:
        q, k, v = attn.query(x), attn.key(x), attn.value(x)
    return (t.view(shape).transpose(1, 2) for t in (q, k, v))


def _make_attention(p: Patch, index: int, taps_metric: bool):
    """Self-attention that records this block's metric and adds ToMe's proportional-attention
    bias ``log(size)``. SDPA stays SDPA: the bias is an additive ``attn_mask``, not the eager path."""

    def forward(self, hidden_states: Tensor, **kwargs) -> tuple[Tensor, Tensor | None]:
        q, k, v = _qkv(self, hidden_states)
        state = p.state
        if taps_metric:
            state.metric = {"key": k, "query": q, "value": v}.get(p.config.similarity, k)
        bias = None
        if state.size is not None and index > min(s.layer for s in state.plan.stages):
            bias = state.size.log().to(q.dtype)[:, None, None, :]
        scale = getattr(self, "scaling", self.attention_head_size**-0.5)
        dropout = (
            getattr(self, "dropout_prob", self.config.attention_probs_dropout_prob) if self.training else 0.0
        )
        probs = None
        if self.config._attn_implementation == "eager":
            scores = torch.matmul(q, k.transpose(2, 3)) * scale
            if bias is not None:
                scores = scores + bias
            probs = F.dropout(torch.softmax(scores, dim=-1), p=dropout, training=self.training)
            out = torch.matmul(probs, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)
        out = out.transpose(1, 2).contiguous()
        return out.reshape(*out.shape[:-2], -1), probs

    return forward


def _make_layer(p: Patch, index: int):
    """The stock VideoMAELayer forward, with the pruning step where the method puts it:
    STA/random after the block (the paper), ToMe between attention and MLP (ToMe's placement)."""

    def forward(self, hidden_states: Tensor, **kwargs) -> Tensor:
        state = p.state
        stage = current_stage(state, index)
        attention_output = self.attention(self.layernorm_before(hidden_states), **kwargs)
        hidden_states = attention_output + hidden_states
        if p.config.method == "tome" and stage.r:
            hidden_states, state.size, state.source = tome_merge(
                hidden_states, head_mean(state.metric), state.size, state.source, stage.units * stage.r
            )
            state.record(stage, state.source)
        out = self.output(self.intermediate(self.layernorm_after(hidden_states)), hidden_states)
        if p.config.method in ("sta", "random") and stage.r:
            tapped = p.config.method == "sta" and p.config.similarity != "hidden"
            metric = head_mean(state.metric) if tapped else None
            keep = p.keep_indices(stage, out, metric, state.source, state.grid_hw)
            out = gather_tokens(out, keep)
            state.source = state.source.gather(1, keep)
            state.record(stage, state.source)
        state.metric = None  # do not keep the block's keys alive
        return out

    return forward


def _make_size_weighted_head(p: Patch):
    """VideoMAEForVideoClassification.forward with ToMe's size-weighted mean pooling: a merged
    token stands for ``size`` original tokens, so the average must count it that many times."""
    from transformers.modeling_outputs import ImageClassifierOutput

    def forward(self, pixel_values: Tensor | None = None, labels: Tensor | None = None, **kwargs):
        outputs = self.videomae(pixel_values, **kwargs)
        seq = outputs.last_hidden_state
        weights = p.state.size.to(seq.dtype).unsqueeze(-1)
        pooled = self.fc_norm((seq * weights).sum(1) / weights.sum(1))
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    return forward


def patch_videomae(model: nn.Module, config: STAConfig) -> nn.Module:
    """Patch a VideoMAE in place (see :func:`staprune.patch`)."""
    backbone = FAMILY.backbone(model)
    hf = backbone.config
    layers = backbone.encoder.layer
    if config.method != "none" and getattr(model, "fc_norm", "absent") is None:
        raise ConfigError(
            "this VideoMAE classifier represents the video by its first token (use_mean_pooling=False); "
            "pruning could drop that token. Only mean-pooling heads (all released VideoMAE "
            "checkpoints) are supported."
        )

    def build(frames: int, tokens: int) -> PruningPlan:
        return resolve_plan(config, len(layers), frames, tokens, tubelet=hf.tubelet_size)

    p = Patch(config)
    height, width = _pair(hf.image_size)
    frames = check_frames(hf.num_frames, hf.tubelet_size, "this VideoMAE")
    plan = p.plan_for(frames, (height // hf.patch_size) * (width // hf.patch_size), build)  # validate now

    def start(module, args, kwargs):
        pixels = args[0] if args else kwargs.get("pixel_values")
        if kwargs.get("bool_masked_pos") is not None or (len(args) > 1 and args[1] is not None):
            raise ConfigError(
                "staprune cannot prune a VideoMAE run with bool_masked_pos (masked pre-training)"
            )
        t, n, w = _input_geometry(hf, pixels)
        p.start(p.plan_for(t, n, build), pixels, (n // w, w), pixels.device)

    p.hook(backbone, start, pre=True, with_kwargs=True)

    stage_layers = {s.layer for s in plan.stages}
    uses_attention_metric = config.method == "tome" or (
        config.method == "sta" and config.similarity != "hidden"
    )
    for i, layer in enumerate(layers):
        taps_metric = i in stage_layers and uses_attention_metric
        if config.method == "tome" or taps_metric:
            self_attn = layer.attention.attention
            p.override_forward(self_attn, MethodType(_make_attention(p, i, taps_metric), self_attn))
        if i in stage_layers and config.method != "none":
            p.override_forward(layer, MethodType(_make_layer(p, i), layer))
    if config.method == "tome" and hasattr(model, "videomae"):
        p.override_forward(model, MethodType(_make_size_weighted_head(p), model))
    model._staprune = p
    return model


# --- loading: HF layout -------------------------------------------------------------------------
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


# --- loading: the original code's release layout (VideoMAE, VideoMAE V2) -------------------------
# Heads of the release models (not recoverable from shapes); others default to head dim 64.
# 1408: VideoMAE V2's ViT-g/14 (16 heads of 88).
RELEASE_HEADS: dict[int, int] = {384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}
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
    """True for the original VideoMAE / VideoMAE V2 code's key layout (``blocks.N.attn.qkv.weight``)."""
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
    (C, 3, tubelet, p, p): patch 14 for VideoMAE V2's ViT-g), depth, MLP width (6144 for ViT-g),
    classes, mean pooling (``fc_norm`` present) and q/v biases. Not recoverable from shapes, hence
    arguments: ``num_frames`` and ``image_size`` (the sinusoidal position table is not stored;
    release models use 16 x 224²), ``num_heads`` (default: the release models' 6/12/16/16/16 for
    hidden 384/768/1024/1280/1408, else head dim 64) and ``layer_norm_eps`` (the release code uses 1e-6).
    """
    from transformers import VideoMAEConfig

    if "head.weight" not in state:
        raise CheckpointError(
            "no classifier ('head.weight'): this looks like a pre-training checkpoint, not a fine-tuned one"
        )
    hidden, channels, tubelet, patch, _ = state["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := _QKV.match(k)))
    if num_heads is None:
        num_heads = RELEASE_HEADS.get(hidden, hidden // 64 if hidden % 64 == 0 else 0)
        if not num_heads:
            raise CheckpointError(f"cannot infer attention heads for hidden size {hidden}; pass num_heads")
    if image_size % patch:
        raise ConfigError(f"image size {image_size} is not a multiple of the checkpoint's patch size {patch}")
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
    state: Mapping[str, Tensor] | None = None,
) -> LoadedModel:
    """A fine-tuned checkpoint of the original VideoMAE / VideoMAE V2 code as a HF model, verified.

    The release's ``fc_norm`` uses ``layer_norm_eps`` too (HF's defaults to 1e-5), so it is set to
    match. Preprocessing: ImageNet mean/std at ``image_size``.
    """
    from transformers import VideoMAEForVideoClassification

    state = read_state_dict(path) if state is None else state
    if not is_videomae_release(state):
        raise CheckpointError(f"{path}: not a VideoMAE release checkpoint (keys: {listing(state)})")
    converted, unknown = convert_videomae_release(state)
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} unexpected weight(s): {listing(unknown)}")
    config = videomae_release_config(
        state, num_frames=num_frames, image_size=image_size, num_heads=num_heads, layer_norm_eps=layer_norm_eps
    )
    model = VideoMAEForVideoClassification(config)
    if model.fc_norm is not None:
        model.fc_norm.eps = layer_norm_eps
    load_verified(model, converted, f"checkpoint {path}")
    return FAMILY.wrap(model, f"videomae-release:{path}")


# --- the family ---------------------------------------------------------------------------------
class VideoMAEFamily(HuggingFaceFamily):
    name = "videomae"
    title = "VideoMAE / VideoMAE V2 (transformers)"
    transformers_classes = ("VideoMAEForVideoClassification", "VideoMAEModel")
    backbone_attribute = "videomae"
    clip_owner = "this VideoMAE"
    supports_tome = True
    supports_gradient_checkpointing = True
    hf_model_types = ("videomae",)
    protocols = {
        "k400": ViewProtocol(clips=5, crops=3, frames=16, stride=4, sampling="uniform"),
        "ssv2": ViewProtocol(clips=2, crops=3, frames=16, stride=2, sampling="segment"),
    }

    def patch(self, model: nn.Module, config: STAConfig) -> nn.Module:
        return patch_videomae(model, config)

    # geometry
    def spec_of(self, model: nn.Module, frames: int | None = None, size: int | None = None) -> ViTSpec:
        hf = self.backbone(model).config
        height, _ = _pair(hf.image_size)
        return ViTSpec(
            hidden=hf.hidden_size,
            layers=hf.num_hidden_layers,
            heads=hf.num_attention_heads,
            mlp_ratio=hf.intermediate_size / hf.hidden_size,
            frames=hf.num_frames,
            size=height,
            tubelet=hf.tubelet_size,
            patch=hf.patch_size,
            num_classes=self.num_classes_of(model),
            in_chans=hf.num_channels,
        ).with_input(frames, size)

    # FLOPs and building
    def flops(self, spec: ViTSpec, config: STAConfig) -> FlopCount:
        """Blocks as :func:`staprune.core.flops.columnar_flops`; patch embedding ``L·C·3·tubelet·p²``;
        classifier ``C·classes``."""
        parts, selection = tubelet_vit_parts(spec, self.plan(spec, config))
        parts["head"] = spec.hidden * spec.num_classes
        return FlopCount(sum(parts.values()), selection, parts)

    def build(self, spec: ViTSpec, attn_implementation: str = "sdpa") -> nn.Module:
        from transformers import VideoMAEConfig, VideoMAEForVideoClassification

        cfg = VideoMAEConfig(
            image_size=spec.size,
            patch_size=spec.patch,
            num_frames=spec.frames,
            tubelet_size=spec.tubelet,
            hidden_size=spec.hidden,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            intermediate_size=spec.mlp_hidden,
            qkv_bias=True,
            use_mean_pooling=True,
            num_labels=spec.num_classes,
            attn_implementation=attn_implementation,
        )
        return VideoMAEForVideoClassification(cfg).eval()

    def tiny_model(self, seed: int = 0, *, frames: int = 16, size: int = 112, layers: int = 6, hidden: int = 48,
                   heads: int = 4, attn: str = "sdpa", num_classes: int = 7, head: bool = True,
                   **config: Any) -> nn.Module:
        """A VideoMAE with the paper's geometry (patch 16, tubelet 2) but tiny width and depth: 16 frames
        of 112² are 8 tubelet-frames x 7x7 tokens, 6 blocks of width 48 (4 heads, MLP 4x), 7 classes.

        ``torch.manual_seed(seed)`` is set first (as a test would), so the weights and what follows
        are reproducible; the patch embedding is scaled 4x, since random init gives near-identical
        tokens. ``head=False``: the bare ``VideoMAEModel``. ``config``: further ``VideoMAEConfig``
        fields (``intermediate_size``, ``use_mean_pooling``, ``hidden_dropout_prob``, ...)."""
        from transformers import VideoMAEConfig, VideoMAEForVideoClassification, VideoMAEModel

        torch.manual_seed(seed)
        fields = dict(image_size=size, num_frames=frames, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=4 * hidden, num_labels=num_classes,
                      attn_implementation=attn)
        model = (VideoMAEForVideoClassification if head else VideoMAEModel)(VideoMAEConfig(**{**fields, **config}))
        with torch.no_grad():  # distinct tokens
            model.base_model.embeddings.patch_embeddings.projection.weight.mul_(4.0)
        return model.eval()

    # loading
    def load_folder(self, folder: Path, name: str) -> LoadedModel:
        """A HF ``VideoMAEForVideoClassification``; ``q_bias``/``v_bias`` names of older
        transformers mapped (see :func:`map_qv_bias`), every tensor verified."""
        from transformers import VideoMAEForVideoClassification

        model = load_hf_pretrained(VideoMAEForVideoClassification, folder, name, fix_state=lambda s: map_qv_bias(s)[0])
        return self.wrap(model, f"hf:{name}", folder)

    def claims_file(self, state: Mapping[str, Tensor]) -> bool:
        return is_videomae_release(state)

    def load_file(self, path: Path, state: Mapping[str, Tensor], **geometry: Any) -> LoadedModel:
        return load_videomae_release(
            path,
            num_frames=geometry.get("frames") or 16,
            image_size=geometry.get("image_size") or 224,
            num_heads=geometry.get("num_heads"),
            state=state,
        )

    # analysis
    def final_features(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The encoder's last hidden state (VideoMAE with a mean-pooling head has no final norm
        there); when pruned, the kept tokens with their original indices."""
        tokens = self.backbone(model)(x).last_hidden_state
        return tokens, final_kept(model)


FAMILY = VideoMAEFamily()


def _entry(name: str, spec: ViTSpec, description: str, paper: tuple[float, ...] | None = None) -> ModelEntry:
    return ModelEntry(
        name,
        FAMILY.name,
        spec,
        levels=PAPER_R[1:],
        paper_gflops=dict(zip(PAPER_R, paper, strict=True)) if paper else None,
        description=description,
    )


REGISTRATION = FamilyModels(
    FAMILY,
    (
        _entry("ViT-S", ViTSpec(384, 12, 6), "VideoMAE ViT-S, 16x224²", (57, 42, 35, 29)),
        _entry("ViT-B", ViTSpec(768, 12, 12), "VideoMAE ViT-B, 16x224²", (180, 136, 116, 96)),
        _entry("ViT-L", ViTSpec(1024, 24, 16), "VideoMAE ViT-L, 16x224²", (597, 446, 376, 308)),
        _entry("ViT-H", ViTSpec(1280, 32, 16), "VideoMAE ViT-H, 16x224²", (1192, 890, 748, 611)),
        _entry("VideoMAEv2-S", ViTSpec(384, 12, 6), "VideoMAE V2 distilled ViT-S, 16x224²"),
        _entry("VideoMAEv2-B", ViTSpec(768, 12, 12), "VideoMAE V2 distilled ViT-B, 16x224²"),
        ModelEntry(
            "VideoMAEv2-g",
            FAMILY.name,
            ViTSpec(1408, 40, 16, mlp_ratio=6144 / 1408, patch=14, num_classes=710),
            levels=scaled_levels(256),
            description="VideoMAE V2 ViT-g/14, 16x224² (8 x 16x16 tokens)",
        ),
    ),
)

__all__ = [
    "FAMILY",
    "REGISTRATION",
    "RELEASE_HEADS",
    "ViTSpec",
    "VideoMAEFamily",
    "convert_videomae_release",
    "is_videomae_release",
    "load_videomae_release",
    "map_qv_bias",
    "patch_videomae",
    "videomae_release_config",
]

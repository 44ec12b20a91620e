"""V-JEPA 2 (Hugging Face ``VJEPA2Model`` / ``VJEPA2ForVideoClassification``): a columnar ViT with 3D
rotary positions and, for classification, an attentive pooler.

Token layout: ``T/2 x (H/16)(W/16)`` tubelet tokens in ``t * N + s`` order, no CLS token. Two
things make pruning it different from VideoMAE:

* **Rotary positions follow the kept tokens.** Every attention computes each token's (frame, row,
  column) from its index in the sequence, or from the ``position_mask`` its layer is given. After
  the first pruning stage every layer is given the kept tokens' original indices
  (``staprune.kept_tokens`` of the last stage so far), so a kept token keeps the rotation of the
  place it came from; the model's own rotary code then runs unchanged.
* **The attentive pooler takes any token count**: its self-attention layers and its cross-attention
  from one query token run on whatever the encoder leaves (they are counted in the FLOPs, and
  shrink with pruning).

**Similarity: keys before the rotation.** The metric is the key projection's output, averaged over
heads, before the rotary rotation is applied. After the rotation, the cosine between two keys is
their content similarity seen through a rotation by their *relative* position (frame, row and
column offsets, on about 30% of the dims each), so the same content at the same place in the next
frame no longer matches itself exactly. STA asks "has this content been seen in the previous
frame?", a content question, and the unrotated keys answer it without an extra rotation pass.
Measured side by side on a V-JEPA 2 classifier fine-tuned on the demo clips
(``benchmarks/vjepa2_key_rotation.py``, README): the two choices keep 80-90% of the same tokens
and reach the same top-1 within 0.2 points at every level; keys before the rotation keep slightly
more of the moving object's tokens (object recall +0.1 to +1.6 points) and match every token of a
static clip to itself in the previous frame (100% vs 99.5%). ``rotated_keys=True`` of
:func:`patch_vjepa2` selects the other choice for experiments.

The predictor of ``VJEPA2Model`` (pre-training's masked prediction) is not pruned: a patched
``VJEPA2Model`` must be called with ``skip_predictor=True`` (the classifier always does).

Registry: ``VJEPA2-L``, ``VJEPA2-H``, ``VJEPA2-g`` at 16 and 64 frames of 256² (``-fpc16`` /
``-fpc64``, the hub's "frames per clip"): 8 or 32 x 16x16 tokens, up to 8192.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters import columnar
from ..adapters.state import Patch, final_kept
from ..core.config import PruningPlan, STAConfig, resolve_plan
from ..core.errors import ConfigError
from ..core.flops import FlopCount, add_parts, final_tokens, tubelet_vit_parts
from ..data.sampling import ViewProtocol
from .base import (
    FamilyModels,
    ModelEntry,
    Spec,
    check_frames,
    scaled_levels,
)
from .hf import HuggingFaceFamily


@dataclass(frozen=True)
class VJEPA2Spec(Spec):
    """A V-JEPA 2 encoder (and its attentive-pooler classifier when ``num_classes`` > 0)."""

    family = "vjepa2"
    hidden: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    frames: int = 16
    size: int = 256
    tubelet: int = 2
    patch: int = 16
    num_classes: int = 400
    in_chans: int = 3
    pooler_layers: int = 3

    @property
    def grid_side(self) -> int:
        return self.size // self.patch

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden * self.mlp_ratio)


def _input_geometry(config, pixels: Tensor) -> tuple[int, int, int]:
    """Tubelet-frames, tokens per frame and grid width of an input ``(B, T, 3, H, W)``; the rotary
    positions decompose indices with the configured ``crop_size`` grid, so the side is fixed."""
    size = config.crop_size
    if pixels.dim() != 5 or tuple(pixels.shape[2:]) != (config.in_chans, size, size):
        raise ConfigError(
            f"this V-JEPA 2 takes clips (B, T, {config.in_chans}, {size}, {size}) (its rotary positions assume a "
            f"{size // config.patch_size}x{size // config.patch_size} grid); got {tuple(pixels.shape)}"
        )
    frames = check_frames(pixels.shape[1], config.tubelet_size, "V-JEPA 2")
    side = size // config.patch_size
    return frames, side * side, side


def patch_vjepa2(model: nn.Module, config: STAConfig, *, rotated_keys: bool = False) -> nn.Module:
    """Patch a V-JEPA 2 in place (see :func:`staprune.patch`).

    Args:
        rotated_keys: take the similarity from keys (or queries) *after* their rotary rotation
            instead of before (the default; see the module docstring).
    """
    backbone = FAMILY.backbone(model)
    hf = backbone.config
    layers = backbone.encoder.layer
    plan = FAMILY.plan(FAMILY.spec_of(model), config)  # validate now, before any forward pass (refuses ToMe too)
    p = Patch(config)

    def build(frames: int, tokens: int) -> PruningPlan:
        return resolve_plan(config, len(layers), frames, tokens, tubelet=hf.tubelet_size)

    def start(module, args, kwargs):
        pixels = args[0] if args else kwargs.get("pixel_values_videos")
        t, n, w = _input_geometry(hf, pixels)
        p.start(p.plan_for(t, n, build), pixels, (n // w, w), pixels.device)

    def no_predictor(module, args, kwargs):
        skip = kwargs.get("skip_predictor", args[3] if len(args) > 3 else False)
        if config.method != "none" and config.r and not skip:
            raise ConfigError(
                "a pruned V-JEPA 2 runs its encoder only: call VJEPA2Model with skip_predictor=True (the "
                "predictor of masked pre-training would see pruned positions)"
            )

    def positions(module, args, kwargs):
        # After a pruning stage, a layer's rotary positions are its tokens' original indices.
        state = p.state
        if state is None or not state.kept:
            return None
        if "position_mask" in kwargs or len(args) < 2:
            return args, {**kwargs, "position_mask": state.source}
        return (args[0], state.source, *args[2:]), kwargs

    p.hook(backbone.encoder, start, pre=True, with_kwargs=True)
    p.hook(backbone, no_predictor, pre=True, with_kwargs=True)
    stage_layers = {s.layer for s in plan.stages}
    for index, layer in enumerate(layers):
        if index > min(stage_layers, default=len(layers)):
            p.hook(layer, positions, pre=True, with_kwargs=True)

    def rotate(index: int, per_head: Tensor, state) -> Tensor:
        attn = layers[index].attention
        return attn.apply_rotary_embeddings(per_head, attn.get_position_ids(per_head, masks=state.source))

    layout = columnar.ColumnarModel(
        layers=layers,
        projections=lambda layer: {"query": layer.attention.query, "key": layer.attention.key,
                                   "value": layer.attention.value},
        heads=hf.num_attention_heads,
        hidden_of=lambda output: output[0],
        with_hidden=lambda output, hidden: (hidden, *output[1:]),
        metric_of=rotate if rotated_keys and config.similarity in ("key", "query") else None,
    )
    columnar.install(p, layout, stage_layers)
    model._staprune = p
    return model


class VJEPA2Family(HuggingFaceFamily):
    name = "vjepa2"
    title = "V-JEPA 2 (transformers)"
    transformers_classes = ("VJEPA2ForVideoClassification", "VJEPA2Model")
    backbone_attribute = "vjepa2"
    clip_owner = "V-JEPA 2"
    any_clip_length = True  # rotary positions: any clip length
    hf_model_types = ("vjepa2",)
    # As V-JEPA's attentive-probe evaluation: 16 frames; K400 8 clips x 3 crops at frame step 4,
    # SSv2 2 x 3 (segments).
    protocols = {
        "k400": ViewProtocol(clips=8, crops=3, frames=16, stride=4, sampling="uniform"),
        "ssv2": ViewProtocol(clips=2, crops=3, frames=16, stride=2, sampling="segment"),
    }

    def patch(self, model: nn.Module, config: STAConfig) -> nn.Module:
        return patch_vjepa2(model, config)

    def spec_of(self, model: nn.Module, frames: int | None = None, size: int | None = None) -> VJEPA2Spec:
        hf = self.backbone(model).config
        pooler = getattr(model, "pooler", None)
        return VJEPA2Spec(
            hidden=hf.hidden_size,
            layers=hf.num_hidden_layers,
            heads=hf.num_attention_heads,
            mlp_ratio=float(hf.mlp_ratio),
            frames=hf.frames_per_clip,
            size=hf.crop_size,
            tubelet=hf.tubelet_size,
            patch=hf.patch_size,
            num_classes=self.num_classes_of(model),
            in_chans=hf.in_chans,
            pooler_layers=len(pooler.self_attention_layers) if pooler is not None else 0,
        ).with_input(frames, size)

    def flops(self, spec: VJEPA2Spec, config: STAConfig) -> FlopCount:
        """Encoder blocks as :func:`staprune.core.flops.columnar_flops` (the rotation is elementwise: not
        counted); tubelet embedding ``L·C·3·2·p²``; the classifier's attentive pooler on the ``L_f``
        tokens the encoder leaves: ``pooler_layers`` transformer blocks (MLP 4C) plus a cross
        attention from one query (``C² + 2·L_f·C² + 2·L_f·C`` and a one-token MLP), then ``C·classes``."""
        plan = self.plan(spec, config)
        c = spec.hidden
        parts, selection = tubelet_vit_parts(spec, plan)
        if spec.num_classes:
            n = final_tokens(plan)
            pooler = spec.pooler_layers * (4 * n * c * c + 2 * n * n * c + 2 * n * c * 4 * c)
            cross = c * c + 2 * n * c * c + 2 * n * c + 2 * c * 4 * c
            add_parts(parts, pooler=pooler + cross, head=c * spec.num_classes)
        return FlopCount(sum(parts.values()), selection, parts)

    def build(self, spec: VJEPA2Spec, attn_implementation: str = "sdpa") -> nn.Module:
        from transformers import VJEPA2Config, VJEPA2ForVideoClassification

        cfg = VJEPA2Config(
            patch_size=spec.patch,
            crop_size=spec.size,
            frames_per_clip=spec.frames,
            tubelet_size=spec.tubelet,
            hidden_size=spec.hidden,
            num_attention_heads=spec.heads,
            num_hidden_layers=spec.layers,
            mlp_ratio=spec.mlp_ratio,
            num_pooler_layers=spec.pooler_layers,
            num_labels=spec.num_classes,
            pred_num_hidden_layers=1,  # the predictor is unused by the classifier
            attn_implementation=attn_implementation,
        )
        return VJEPA2ForVideoClassification(cfg).eval()

    def tiny_model(self, seed: int = 0, *, frames: int = 16, size: int = 112, layers: int = 6, hidden: int = 48,
                   heads: int = 4, attn: str = "sdpa", num_classes: int = 7, **config: Any) -> nn.Module:
        """A V-JEPA 2 classifier (tubelet 2, patch 16, rotary positions, one attentive-pooler layer) at
        tiny size: 16 frames of 112² are 8 x 7x7 tokens, 6 blocks of width 48 (4 heads), 7 classes; a
        one-layer predictor of width 32.

        ``torch.manual_seed(seed)`` is set first; the patch embedding is scaled 4x (random init gives
        near-identical tokens). ``config``: further ``VJEPA2Config`` fields."""
        from transformers import VJEPA2Config, VJEPA2ForVideoClassification

        torch.manual_seed(seed)
        fields = dict(patch_size=16, crop_size=size, frames_per_clip=frames, tubelet_size=2, hidden_size=hidden,
                      num_attention_heads=heads, num_hidden_layers=layers, num_pooler_layers=1,
                      num_labels=num_classes, pred_num_hidden_layers=1, pred_hidden_size=32,
                      pred_num_attention_heads=2, attn_implementation=attn)
        model = VJEPA2ForVideoClassification(VJEPA2Config(**{**fields, **config}))
        with torch.no_grad():  # distinct tokens
            model.vjepa2.encoder.embeddings.patch_embeddings.proj.weight.mul_(4.0)
        return model.eval()

    # analysis
    def final_features(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The last encoder block's tokens (before the final norm); when pruned, the kept ones."""
        def run():
            return model(x) if hasattr(model, "vjepa2") else model(x, skip_predictor=True)

        return self.last_block_output(model, run)[0], final_kept(model)


FAMILY = VJEPA2Family()
_SIZES = {"L": (1024, 24, 16, 4.0), "H": (1280, 32, 16, 4.0), "g": (1408, 40, 22, 48 / 11)}
REGISTRATION = FamilyModels(
    FAMILY,
    tuple(
        ModelEntry(
            f"VJEPA2-{size}-fpc{frames}",
            FAMILY.name,
            VJEPA2Spec(hidden, layers, heads, ratio, frames=frames),
            levels=scaled_levels(256),
            description=f"V-JEPA 2 ViT-{size}/16, {frames}x256² ({frames // 2} x 16x16 tokens), attentive pooler",
        )
        for size, (hidden, layers, heads, ratio) in _SIZES.items()
        for frames in (16, 64)
    ),
)

__all__ = ["FAMILY", "REGISTRATION", "VJEPA2Family", "VJEPA2Spec", "patch_vjepa2"]

"""ViViT (Hugging Face ``VivitModel`` / ``VivitForVideoClassification``): joint space-time attention
over tubelet tokens plus a CLS token.

Token layout: CLS first, then ``T/t x (H/p)(W/p)`` tubelet tokens in ``t * N + s`` order (the Conv3d
tubelet embedding flattened over time, rows, columns), the same order as VideoMAE. The CLS token is
never dropped and takes no part in scoring; :func:`staprune.kept_tokens` reports patch tokens
only. The classifier reads the CLS token, which every kept token still feeds, so pruning needs no
change to the head.

The adapter is the hook-based columnar one (:mod:`staprune.adapters.columnar`): the chosen projection
(``k_proj`` for the default key similarity) records the metric, the block's output is pruned. The
stock attention (eager or SDPA, whatever the config selects) runs unchanged.

Registry: ``ViViT-B`` (32x224², tubelet 2x16x16 -> 16 x 14x14 tokens, 12 layers, 768 wide: the
released ``google/vivit-b-16x2-kinetics400``). Evaluation protocol: 4 clips x 3 crops of 32 frames
at stride 2 (the ViViT paper's Kinetics views).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters import columnar
from ..adapters.state import Patch, final_kept
from ..core.config import STAConfig
from ..core.errors import ConfigError
from ..core.flops import FlopCount, tubelet_vit_parts
from ..data.sampling import ViewProtocol
from ..data.transforms import Preprocessing
from .base import (
    FamilyModels,
    ModelEntry,
    Spec,
    check_fixed_clip,
    scaled_levels,
    side,
)
from .hf import HuggingFaceFamily


@dataclass(frozen=True)
class VivitSpec(Spec):
    """A ViViT: ``frames`` x ``size``² input cut into ``tubelet`` x ``patch``² tubelets, plus a CLS token."""

    family = "vivit"
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    mlp_hidden: int = 3072
    frames: int = 32
    size: int = 224
    tubelet: int = 2
    patch: int = 16
    num_classes: int = 400
    in_chans: int = 3

    @property
    def grid_side(self) -> int:
        return self.size // self.patch


def _mask_for_the_kept_tokens(layer: nn.Module, args: tuple, kwargs: dict):
    """Without a user mask (the only case a patched ViViT runs) every token attends everywhere, but
    while exporting transformers builds that as a full-length all-true mask (eager passes None),
    which no longer fits once tokens are dropped: it becomes None again."""
    if len(args) < 2 or args[1] is None or args[1].shape[-1] == args[0].shape[1]:
        return None
    return (args[0], None, *args[2:]), kwargs


def patch_vivit(model: nn.Module, config: STAConfig) -> nn.Module:
    """Patch a ViViT in place (see :func:`staprune.patch`)."""
    backbone = FAMILY.backbone(model)
    hf = backbone.config
    spec = FAMILY.spec_of(model)
    plan = FAMILY.plan(spec, config)  # validate now, before any forward pass (refuses ToMe too)
    grid_hw = (spec.grid_side, spec.grid_side)
    p = Patch(config)

    def start(module, args, kwargs):
        pixels = args[0] if args else kwargs.get("pixel_values")
        if kwargs.get("attention_mask") is not None:
            raise ConfigError("a pruned ViViT takes no attention_mask: dropped tokens would leave the mask behind")
        if kwargs.get("interpolate_pos_encoding"):
            raise ConfigError("staprune prunes ViViT at its configured input; interpolate_pos_encoding is not supported")
        # The position table fixes the clip, so the plan made at patch time is the plan of every input.
        check_fixed_clip(pixels, spec.frames, spec.in_chans, spec.size, "this ViViT",
                         f"its position table covers exactly {spec.frames} frames at {spec.size}x{spec.size}")
        p.start(plan, pixels, grid_hw, pixels.device)

    p.hook(backbone, start, pre=True, with_kwargs=True)
    for layer in backbone.layers:
        p.hook(layer, _mask_for_the_kept_tokens, pre=True, with_kwargs=True)
    layout = columnar.ColumnarModel(
        layers=backbone.layers,
        projections=lambda layer: {"query": layer.attention.q_proj, "key": layer.attention.k_proj,
                                   "value": layer.attention.v_proj},
        heads=hf.num_attention_heads,
        extra_tokens=1,
    )
    columnar.install(p, layout, {s.layer for s in plan.stages})
    model._staprune = p
    return model


class VivitFamily(HuggingFaceFamily):
    name = "vivit"
    title = "ViViT (transformers)"
    transformers_classes = ("VivitForVideoClassification", "VivitModel")
    backbone_attribute = "vivit"
    clip_owner = "this ViViT"
    extra_tokens = 1  # CLS
    hf_model_types = ("vivit",)
    protocols = {
        "k400": ViewProtocol(clips=4, crops=3, frames=32, stride=2, sampling="uniform"),
        "ssv2": ViewProtocol(clips=2, crops=3, frames=32, stride=2, sampling="segment"),
    }

    def patch(self, model: nn.Module, config: STAConfig) -> nn.Module:
        return patch_vivit(model, config)

    def spec_of(self, model: nn.Module, frames: int | None = None, size: int | None = None) -> VivitSpec:
        hf = self.backbone(model).config
        t_sub, ph, pw = hf.tubelet_size
        if ph != pw:
            raise ConfigError(f"staprune supports square ViViT patches; this one is {ph}x{pw}")
        return VivitSpec(
            hidden=hf.hidden_size,
            layers=hf.num_hidden_layers,
            heads=hf.num_attention_heads,
            mlp_hidden=hf.intermediate_size,
            frames=hf.num_frames,
            size=side(hf.image_size),
            tubelet=t_sub,
            patch=ph,
            num_classes=self.num_classes_of(model),
            in_chans=hf.num_channels,
        ).with_input(frames, size)

    def flops(self, spec: VivitSpec, config: STAConfig) -> FlopCount:
        """Blocks as :func:`staprune.core.flops.columnar_flops` with the CLS token in every block;
        tubelet embedding ``L·C·3·t·p²``; classifier on the CLS token ``C·classes``."""
        parts, selection = tubelet_vit_parts(spec, self.plan(spec, config), extra_tokens=1)
        parts["head"] = spec.hidden * spec.num_classes
        return FlopCount(sum(parts.values()), selection, parts)

    def build(self, spec: VivitSpec, attn_implementation: str = "sdpa") -> nn.Module:
        from transformers import VivitConfig, VivitForVideoClassification

        cfg = VivitConfig(
            image_size=spec.size,
            num_frames=spec.frames,
            tubelet_size=[spec.tubelet, spec.patch, spec.patch],
            hidden_size=spec.hidden,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            intermediate_size=spec.mlp_hidden,
            num_labels=spec.num_classes,
            attn_implementation=attn_implementation,
        )
        return VivitForVideoClassification(cfg).eval()

    def tiny_model(self, seed: int = 0, *, frames: int = 16, size: int = 112, layers: int = 6, hidden: int = 48,
                   heads: int = 4, attn: str = "sdpa", num_classes: int = 7, **config: Any) -> nn.Module:
        """A ViViT with the released tubelet (2x16x16) but tiny width and depth: 16 frames of 112² are
        8 x 7x7 tokens + CLS, 6 blocks of width 48 (4 heads, MLP 4x), 7 classes.

        ``torch.manual_seed(seed)`` is set first; the tubelet embedding is scaled 4x (random init
        gives near-identical tokens). ``config``: further ``VivitConfig`` fields."""
        from transformers import VivitConfig, VivitForVideoClassification

        torch.manual_seed(seed)
        fields = dict(image_size=size, num_frames=frames, tubelet_size=[2, 16, 16], hidden_size=hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden,
                      num_labels=num_classes, attn_implementation=attn)
        model = VivitForVideoClassification(VivitConfig(**{**fields, **config}))
        with torch.no_grad():  # distinct tokens
            model.vivit.embeddings.patch_embeddings.projection.weight.mul_(4.0)
        return model.eval()

    def preprocessing(self, size: int) -> Preprocessing:
        """The released ViViT's processor: pixels to [-1, 1] (x / 127.5 - 1), then mean/std 0.5."""
        return Preprocessing(size=size, mean=(0.75, 0.75, 0.75), std=(0.25, 0.25, 0.25))

    # analysis
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.backbone(model).layers

    def final_features(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The last block's patch tokens (before the final norm, CLS removed); when pruned, the
        kept ones with their original indices."""
        return self.last_block_output(model, lambda: model(x))[:, 1:], final_kept(model)


FAMILY = VivitFamily()
REGISTRATION = FamilyModels(
    FAMILY,
    (
        ModelEntry("ViViT-B", FAMILY.name, VivitSpec(), levels=scaled_levels(196),
                   description="ViViT-B/16x2 (joint space-time), 32x224², CLS token"),
    ),
)

__all__ = ["FAMILY", "REGISTRATION", "VivitFamily", "VivitSpec", "patch_vivit"]

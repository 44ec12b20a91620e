"""The Video Swin family: :class:`SwinSpec` (geometry), analytic FLOPs, loading torchvision
``swin3d_t/s/b`` weights, :class:`Swin3dFamily` and the registry (``VideoSwin-T/S/B``,
``VideoSwin-B-SSV2``: the paper's Table 3).

What a patched model runs lives in :mod:`.pruned_stage` (pruning) and :mod:`.attention` (fused
window attention); the r1 plan lives with every other schedule in
:func:`staprune.core.config.resolve_swin_plan`. This module describes the models: the FLOP counts
follow the stages that plan gives.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...adapters.state import final_kept, kept_stages
from ...core.config import PruningPlan, STAConfig, Stage, resolve_swin_plan
from ...core.errors import CheckpointError, UnknownModelError
from ...core.flops import FlopCount, add_parts, metric_dim, sta_selection_flops
from ...data.sampling import ViewProtocol
from ...data.transforms import Preprocessing
from ...storage.state_dicts import listing, load_verified, read_state_dict
from ..base import (
    FamilyModels,
    LoadedModel,
    ModelEntry,
    Spec,
    StageGrid,
    TokenGeometry,
    capture_output,
    scaled_levels,
)
from ..classifier import VideoClassifierFamily
from .pruned_stage import patch_swin3d
from .windows import ceil_div, stage_modules


def is_swin3d(model: nn.Module) -> bool:
    """Whether ``model`` is a torchvision ``SwinTransformer3d`` (False without torchvision)."""
    try:
        from torchvision.models.video.swin_transformer import SwinTransformer3d
    except ImportError:  # torchvision not installed: cannot be a Video Swin
        return False
    return isinstance(model, SwinTransformer3d)


# --- spec and FLOPs -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SwinSpec(Spec):
    """A torchvision ``SwinTransformer3d``: 4 stages (the demo Swin: 2), channels ``embed * 2**i``."""

    family = "swin3d"
    embed: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    heads: tuple[int, ...] = (3, 6, 12, 24)
    window: tuple[int, int, int] = (8, 7, 7)
    patch: tuple[int, int, int] = (2, 4, 4)
    frames: int = 32
    size: int = 224
    num_classes: int = 400
    mlp_ratio: float = 4.0
    in_chans: int = 3

    @property
    def temporal(self) -> int:
        """Temporal positions after patch embedding (16 for 32 frames)."""
        return ceil_div(self.frames, self.patch[0])

    def grids(self) -> list[tuple[int, int]]:
        """Spatial token grid ``(h, w)`` of each stage (56, 28, 14, 7 at 224²).

        Patch embedding pads to a multiple of the patch; patch merging pads odd grids to even.
        """
        h, w = ceil_div(self.size, self.patch[1]), ceil_div(self.size, self.patch[2])
        out = [(h, w)]
        for _ in self.depths[1:]:
            h, w = ceil_div(h, 2), ceil_div(w, 2)
            out.append((h, w))
        return out


def _window(spec: SwinSpec, t: int, h: int, w: int) -> tuple[tuple[int, int, int], int]:
    """Effective window (torchvision clips it to the grid) and the padded token count it tiles."""
    win = tuple(min(wd, size) for wd, size in zip(spec.window, (t, h, w), strict=True))
    padded = math.prod(math.ceil(size / wd) * wd for wd, size in zip(win, (t, h, w), strict=True))
    return win, padded


def swin_kept_per_stage(spec: SwinSpec, config: STAConfig) -> list[int]:
    """Tokens that qkv/proj/MLP see in each stage (stage 1 is never pruned)."""
    t, grids = spec.temporal, spec.grids()
    full = [t * h * w for h, w in grids]
    if config.method == "none" or config.r == 0:
        return full
    plan = FAMILY.plan(spec, config)
    return [full[0]] + [full[s.layer] - s.units * s.r for s in plan.stages]


def swin_flops(spec: SwinSpec, config: STAConfig) -> FlopCount:
    """Analytic FLOPs of a torchvision Video Swin under ``config``.

    A block with ``N`` tokens, ``w`` tokens per window: qkv 3NC² + proj NC² + MLP 2·ratio·NC² +
    window attention 2·N_pad·w·C. In a pruned stage only qkv, projection and MLP run on the kept
    tokens; window attention and patch merging stay dense (the convention that reproduces Table 3).
    This counts what the patched model runs: where the window does not tile a grid, torchvision's
    stock forward also projects the padding (qkv and proj on ``N_pad`` tokens), the fused attention
    does not (no grid of the paper's models needs padding).
    """
    t, grids = spec.temporal, spec.grids()
    kept = swin_kept_per_stage(spec, config)
    h0, w0 = grids[0]
    parts: dict[str, float] = {"embed": t * h0 * w0 * spec.embed * spec.in_chans * math.prod(spec.patch)}
    linear = 4 + 2 * spec.mlp_ratio  # qkv 3 + proj 1 + MLP 2·ratio, times N·C²
    for i, ((h, w), depth, n_kept) in enumerate(zip(grids, spec.depths, kept, strict=True)):
        c = spec.embed * 2**i
        if i > 0:  # patch merging into this stage: 4·C_prev -> 2·C_prev per output token, dense
            add_parts(parts, merge=t * h * w * 4 * (c // 2) * c)
        win, padded = _window(spec, t, h, w)
        add_parts(parts, attention=depth * 2 * padded * math.prod(win) * c)
        add_parts(parts, qkv=depth * 3 * n_kept * c * c, proj=depth * n_kept * c * c)
        add_parts(parts, mlp=depth * (linear - 4) * n_kept * c * c)
    parts["head"] = spec.embed * 2 ** (len(spec.depths) - 1) * spec.num_classes
    return FlopCount(sum(parts.values()), swin_selection_flops(spec, config), parts)


def swin_selection_flops(spec: SwinSpec, config: STAConfig) -> float:
    """STA's own multiply-adds in a Video Swin (this adapter).

    The metric of a stage is the head-averaged key (or query/value) slice of its first block's qkv,
    computed on every stage-input token: the kept tokens reuse it in that block, so the extra work
    is the slice's projection of the *dropped* tokens (``dropped·C²``), plus the matching and
    transitions on ``c = C / heads`` dims. ``similarity="hidden"`` uses the tokens (``c = C``).
    """
    if config.method != "sta" or config.r == 0:
        return 0.0
    flops = 0.0
    for s in FAMILY.plan(spec, config).stages:
        channels = spec.embed * 2**s.layer
        flops += sta_selection_flops(s, metric_dim(config, channels, spec.heads[s.layer]), config)
        if config.similarity != "hidden":
            flops += s.units * s.r * channels * channels
    return flops


# --- loading ------------------------------------------------------------------------------------
SWIN_NAMES: tuple[str, ...] = ("swin3d_t", "swin3d_s", "swin3d_b")
# (embed dim, blocks in stage 3 = features.4) -> torchvision builder name; how a bare Swin file reveals its size.
_SWIN_BY_SHAPE: dict[tuple[int, int], str] = {(96, 6): "swin3d_t", (96, 18): "swin3d_s", (128, 18): "swin3d_b"}


def swin_name_from_state(state: Mapping[str, Tensor]) -> str:
    """Which of swin3d_t/s/b a torchvision Swin3D state dict belongs to (embed dim, stage-3 depth)."""
    embed = int(state["patch_embed.proj.weight"].shape[0])
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"^features\.4\.(\d+)\.", k))}
    name = _SWIN_BY_SHAPE.get((embed, len(blocks)))
    if name is None:
        raise CheckpointError(f"unknown Swin3D geometry: embed {embed}, {len(blocks)} blocks in stage 3")
    return name


def load_torchvision_swin(name: str | None, weights: str | Path, state: Mapping[str, Tensor] | None = None) -> LoadedModel:
    """torchvision ``swin3d_{t,s,b}`` with weights from a local file, verified.

    ``name=None`` infers the variant from the tensors. The class count comes from ``head.weight``.
    Preprocessing: :meth:`Preprocessing.kinetics_swin` (ImageNet mean/std, 224).
    """
    import torchvision.models.video as tvv

    state = read_state_dict(weights) if state is None else state
    if "patch_embed.proj.weight" not in state or "head.weight" not in state:
        raise CheckpointError(f"{weights}: not a torchvision Swin3D state dict (keys: {listing(state)})")
    name = name or swin_name_from_state(state)
    if name not in SWIN_NAMES:
        raise UnknownModelError(f"unknown Swin3D {name!r}; valid: {', '.join(SWIN_NAMES)}")
    model = getattr(tvv, name)(weights=None, num_classes=int(state["head.weight"].shape[0]))
    load_verified(model, state, f"checkpoint {weights}")
    return FAMILY.wrap(model, f"torchvision:{name}:{weights}")


# --- the family ---------------------------------------------------------------------------------
class Swin3dFamily(VideoClassifierFamily):
    name = "swin3d"
    title = "Video Swin (torchvision SwinTransformer3d)"
    classes = ("torchvision SwinTransformer3d (swin3d_t/s/b)",)
    input_layout = "BCTHW"
    protocols = {
        "k400": ViewProtocol(clips=4, crops=3, frames=32, stride=2, sampling="uniform"),
        "ssv2": ViewProtocol(clips=1, crops=3, frames=32, stride=2, sampling="uniform"),
    }
    r_name = "r1"
    builder_names = SWIN_NAMES
    tome_refusal = "window attention needs a full grid"
    block_locations = False  # prunes at the start of its stages, not after blocks of one stack
    stock_kernels_at_r0 = False  # the patch fuses window attention even when nothing is dropped
    no_weight_decay = ("relative_position",)  # the relative-position bias tables, as Video Swin's recipe

    def recognizes(self, model: nn.Module) -> bool:
        return is_swin3d(model)

    def patch(self, model: nn.Module, config: STAConfig) -> nn.Module:
        return patch_swin3d(model, config, self)

    def spec_of(self, model: nn.Module, frames: int | None = None, size: int | None = None) -> SwinSpec:
        """Read the geometry off a built Swin; the input defaults to 32x224² (the paper's), or to
        the grid of absolute positions installed as ``pos_drop`` (the demo Swin's)."""
        stages = stage_modules(model)
        first = stages[0][0]
        patch = tuple(model.patch_embed.tuple_patch_size)
        table = getattr(model.pos_drop, "table", None)
        default_frames, default_size = (table.shape[1] * patch[0], table.shape[2] * patch[1]) if table is not None else (32, 224)
        return SwinSpec(
            embed=model.patch_embed.proj.out_channels,
            depths=tuple(len(s) for s in stages),
            heads=tuple(s[0].attn.num_heads for s in stages),
            window=tuple(first.attn.window_size),
            patch=patch,
            frames=default_frames,
            size=default_size,
            num_classes=model.head.out_features,
            mlp_ratio=first.mlp[0].out_features / first.mlp[0].in_features,
        ).with_input(frames, size)

    def geometry(self, spec: SwinSpec) -> TokenGeometry:
        grids = tuple(
            StageGrid(f"stage {k + 1}", spec.temporal, h, w, spec.patch[1] * 2**k)
            for k, (h, w) in enumerate(spec.grids())
        )
        return TokenGeometry(spec.frames, spec.size, spec.patch[0], grids)

    def plan(self, spec: SwinSpec, config: STAConfig) -> PruningPlan:
        """The r1 plan (:func:`staprune.core.config.resolve_swin_plan`) for ``spec``'s stage grids,
        after refusing ToMe (window attention needs a full grid)."""
        self.check_method(config)
        return resolve_swin_plan(config, spec.temporal, spec.grids()[1:])

    def levels(self, spec: SwinSpec) -> tuple[int, ...]:
        """The paper's r1 = 192/256/320 of Swin stage 2's 28x28 tokens per frame, scaled to the grid."""
        h, w = spec.grids()[1] if len(spec.depths) > 1 else spec.grids()[0]
        return scaled_levels(h * w, PAPER_R[1:], of=784)

    def flops(self, spec: SwinSpec, config: STAConfig) -> FlopCount:
        return swin_flops(spec, config)

    def build(self, spec: SwinSpec, attn_implementation: str = "sdpa") -> nn.Module:
        from torchvision.models.video.swin_transformer import SwinTransformer3d

        return SwinTransformer3d(
            patch_size=list(spec.patch),
            embed_dim=spec.embed,
            depths=list(spec.depths),
            num_heads=list(spec.heads),
            window_size=list(spec.window),
            stochastic_depth_prob=0.0,
            num_classes=spec.num_classes,
        ).eval()

    def tiny_model(self, seed: int = 0, *, num_classes: int = 10, **kwargs: Any) -> nn.Module:
        """A torchvision ``SwinTransformer3d`` with the paper's patch (2,4,4) but tiny width and depth:
        embedding 24, depths (1, 1, 2, 1), heads (1, 2, 3, 6), windows (2, 7, 7), 10 classes; it
        reads any clip. ``torch.manual_seed(seed)`` is set first.
        ``kwargs``: further ``SwinTransformer3d`` arguments (``depths``, ``num_heads``, ``window_size``,
        ``stochastic_depth_prob`` (torchvision's default 0.1), ...)."""
        from torchvision.models.video.swin_transformer import SwinTransformer3d

        torch.manual_seed(seed)
        fields = dict(patch_size=[2, 4, 4], embed_dim=24, depths=[1, 1, 2, 1], num_heads=[1, 2, 3, 6],
                      window_size=[2, 7, 7], num_classes=num_classes)
        return SwinTransformer3d(**{**fields, **kwargs}).eval()

    def preprocessing(self, size: int) -> Preprocessing:
        return Preprocessing.kinetics_swin(size)

    def wrap(self, model: nn.Module, source: str, folder: Path | None = None) -> LoadedModel:
        return LoadedModel(
            model=model.eval(),
            family=self,
            preprocessing=self.preprocessing(224),
            num_classes=int(model.head.out_features),
            frames=None,
            image_size=None,
            source=source,
        )

    def claims_file(self, state: Mapping[str, Tensor]) -> bool:
        return any(k.startswith("features.") for k in state) and "patch_embed.proj.weight" in state

    def load_file(self, path: Path, state: Mapping[str, Tensor], **geometry: Any) -> LoadedModel:
        return load_torchvision_swin(None, path, state)

    def load_builder(self, name: str, weights: str | Path) -> LoadedModel:
        """``swin3d_t|s|b`` with a local weights file."""
        return load_torchvision_swin(name, weights)

    # analysis
    def blocks(self, model: nn.Module) -> list[tuple[nn.Module, int]]:
        return [(block, k) for k, stage in enumerate(stage_modules(model)) for block in stage]

    def kept_grid_index(self, stage: Stage) -> int:
        return stage.layer  # Swin plans use the Swin stage index as the layer

    def final_features(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The last stage's output before the final norm; when that stage was pruned only its kept
        positions (the refilled ones are copies)."""
        tokens = capture_output(model.features[-1], lambda: model(x)).flatten(1, 3)  # (B, T, h, w, C) -> (B, L, C)
        source = final_kept(model)
        last_stage = len(stage_modules(model)) - 1
        if source is None or kept_stages(model)[-1].layer != last_stage:
            return tokens, None
        return tokens.gather(1, source.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])), source


FAMILY = Swin3dFamily()
PAPER_R = (0, 192, 256, 320)


def _entry(name: str, spec: SwinSpec, paper: tuple[float, ...], description: str) -> ModelEntry:
    # No fixed levels: the family's scale with the clip (PAPER_R[1:] at 224², 48/64/80 at 112², where
    # r1=256 would not fit stage 2's 14x14 tokens per frame).
    return ModelEntry(name, FAMILY.name, spec, paper_gflops=dict(zip(PAPER_R, paper, strict=True)),
                      description=description)


REGISTRATION = FamilyModels(
    FAMILY,
    (
        _entry("VideoSwin-T", SwinSpec(96, (2, 2, 6, 2), (3, 6, 12, 24)), (88, 68, 61, 54), "Video Swin-T, 32x224²"),
        _entry("VideoSwin-S", SwinSpec(96, (2, 2, 18, 2), (3, 6, 12, 24)), (166, 121, 106, 91), "Video Swin-S, 32x224²"),
        _entry("VideoSwin-B", SwinSpec(128, (2, 2, 18, 2), (4, 8, 16, 32)), (282, 202, 176, 149), "Video Swin-B (K400), 32x224²"),
        _entry(
            "VideoSwin-B-SSV2",
            SwinSpec(128, (2, 2, 18, 2), (4, 8, 16, 32), window=(16, 7, 7), num_classes=174),
            (321, 241, 215, 188),
            "Video Swin-B (SSV2, window 16x7x7), 32x224²",
        ),
    ),
)

__all__ = [
    "FAMILY",
    "PAPER_R",
    "REGISTRATION",
    "SWIN_NAMES",
    "Swin3dFamily",
    "SwinSpec",
    "is_swin3d",
    "load_torchvision_swin",
    "swin_flops",
    "swin_kept_per_stage",
    "swin_name_from_state",
    "swin_selection_flops",
]

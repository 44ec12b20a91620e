"""Named models of the paper: geometry specs, random-weight builders and loading.

The registry names are the paper's: ``ViT-S/B/L/H`` (VideoMAE, 16x224², tubelet 2, patch 16)
and ``VideoSwin-T/S/B`` (torchvision ``swin3d_*``, 32x224², window 8x7x7) plus
``VideoSwin-B-SSV2`` (window 16x7x7, 174 classes). Specs are plain data so analytic FLOP
counts never have to build a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# hidden size, layers, heads
VIT_SPECS: dict[str, tuple[int, int, int]] = {
    "ViT-S": (384, 12, 6),
    "ViT-B": (768, 12, 12),
    "ViT-L": (1024, 24, 16),
    "ViT-H": (1280, 32, 16),
}


@dataclass(frozen=True)
class ViTSpec:
    """A VideoMAE ViT: ``frames`` input frames of ``size``² pixels, cut into tubelets."""

    hidden: int
    layers: int
    heads: int
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
    def tokens_per_frame(self) -> int:
        return (self.size // self.patch) ** 2


@dataclass(frozen=True)
class SwinSpec:
    """A torchvision ``SwinTransformer3d``: 4 stages (the demo Swin: 2), channels ``embed * 2**i``."""

    embed: int
    depths: tuple[int, ...]
    heads: tuple[int, ...]
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
        return -(-self.frames // self.patch[0])

    def grids(self) -> list[tuple[int, int]]:
        """Spatial token grid ``(h, w)`` of each stage (56, 28, 14, 7 at 224²).

        Patch embedding pads to a multiple of the patch; patch merging pads odd grids to even.
        """
        h = -(-self.size // self.patch[1])
        w = -(-self.size // self.patch[2])
        out = [(h, w)]
        for _ in self.depths[1:]:
            h, w = -(-h // 2), -(-w // 2)
            out.append((h, w))
        return out


SWIN_SPECS: dict[str, SwinSpec] = {
    "VideoSwin-T": SwinSpec(96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "VideoSwin-S": SwinSpec(96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "VideoSwin-B": SwinSpec(128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "VideoSwin-B-SSV2": SwinSpec(128, (2, 2, 18, 2), (4, 8, 16, 32), window=(16, 7, 7), num_classes=174),
}

MODEL_NAMES: tuple[str, ...] = (*VIT_SPECS, *SWIN_SPECS)

Spec = ViTSpec | SwinSpec


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)} (or a local HF directory)")


def get_spec(name: str, frames: int | None = None, size: int | None = None) -> Spec:
    """The geometry of a registry model, optionally with another input ``frames`` x ``size``²."""
    overrides = {k: v for k, v in (("frames", frames), ("size", size)) if v is not None}
    if name in VIT_SPECS:
        hidden, layers, heads = VIT_SPECS[name]
        return ViTSpec(hidden, layers, heads, **overrides)
    if name in SWIN_SPECS:
        spec = SWIN_SPECS[name]
        return SwinSpec(**{**spec.__dict__, **overrides})
    raise _unknown(name)


def spec_of_model(model: nn.Module, frames: int | None = None, size: int | None = None) -> Spec:
    """Read the geometry off a built model (VideoMAE or torchvision Swin3D).

    ``frames``/``size`` default to the model's configured input (VideoMAE) or 32x224² (Swin).
    """
    hf = getattr(getattr(model, "videomae", model), "config", None)
    if hf is not None and getattr(hf, "model_type", None) == "videomae":
        size_default = hf.image_size if isinstance(hf.image_size, int) else hf.image_size[0]
        return ViTSpec(
            hf.hidden_size,
            hf.num_hidden_layers,
            hf.num_attention_heads,
            mlp_ratio=hf.intermediate_size / hf.hidden_size,
            frames=frames or hf.num_frames,
            size=size or size_default,
            tubelet=hf.tubelet_size,
            patch=hf.patch_size,
            num_classes=getattr(getattr(model, "classifier", None), "out_features", 0) or 0,
            in_chans=hf.num_channels,
        )
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    if isinstance(model, SwinTransformer3d):
        stages = [m for m in model.features if isinstance(m, nn.Sequential)]
        first = stages[0][0]
        patch = tuple(model.patch_embed.tuple_patch_size)
        # Absolute positions (the demo Swin's) fix the input geometry; stock Swins default to 32x224².
        table = getattr(model.pos_drop, "table", None)
        default_frames, default_size = (table.shape[1] * patch[0], table.shape[2] * patch[1]) if table is not None else (32, 224)
        return SwinSpec(
            embed=model.patch_embed.proj.out_channels,
            depths=tuple(len(s) for s in stages),
            heads=tuple(s[0].attn.num_heads for s in stages),
            window=tuple(first.attn.window_size),
            patch=patch,
            frames=frames or default_frames,
            size=size or default_size,
            num_classes=model.head.out_features,
            mlp_ratio=first.mlp[0].out_features / first.mlp[0].in_features,
        )
    raise TypeError(f"no geometry for {type(model).__name__}; expected a VideoMAE or torchvision Swin3D")


def build_model(
    name: str, frames: int | None = None, size: int | None = None, attn_implementation: str = "sdpa"
) -> nn.Module:
    """A registry model with random weights, in eval mode.

    Args:
        name: one of :data:`MODEL_NAMES`.
        frames, size: input clip length and side; ViTs are configured for them (Swin accepts any).
        attn_implementation: transformers attention backend for ViTs (``sdpa`` or ``eager``).
    Input of the returned model: ViT ``(B, frames, 3, size, size)``; Swin ``(B, 3, frames, size, size)``.
    """
    spec = get_spec(name, frames, size)
    if isinstance(spec, ViTSpec):
        from transformers import VideoMAEConfig, VideoMAEForVideoClassification

        cfg = VideoMAEConfig(
            image_size=spec.size,
            patch_size=spec.patch,
            num_frames=spec.frames,
            tubelet_size=spec.tubelet,
            hidden_size=spec.hidden,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            intermediate_size=int(spec.hidden * spec.mlp_ratio),
            qkv_bias=True,
            use_mean_pooling=True,
            num_labels=spec.num_classes,
            attn_implementation=attn_implementation,
        )
        model = VideoMAEForVideoClassification(cfg)
    else:
        from torchvision.models.video.swin_transformer import SwinTransformer3d

        model = SwinTransformer3d(
            patch_size=list(spec.patch),
            embed_dim=spec.embed,
            depths=list(spec.depths),
            num_heads=list(spec.heads),
            window_size=list(spec.window),
            stochastic_depth_prob=0.0,
            num_classes=spec.num_classes,
        )
    return model.eval()


def load_model(name_or_path: str, frames: int | None = None, size: int | None = None) -> nn.Module:
    """A registry name (random weights), a bundled demo model (``demo-vit``/``demo-swin``: its
    trained weights when bundled, else an untrained one; FLOPs and speed do not depend on them), or
    anything :func:`staprune.checkpoints.load` accepts (HF directory, VideoMAE release .pth,
    torchvision Swin3D weights), in eval mode."""
    from .demo import models as demo  # light: torch only until a model is built

    if name_or_path in demo.DEMO_MODELS:
        if (frames or demo.FRAMES, size or demo.SIZE) != (demo.FRAMES, demo.SIZE):
            raise ValueError(f"{name_or_path} takes {demo.FRAMES}x{demo.SIZE}x{demo.SIZE} clips only "
                             f"(got frames={frames}, size={size}); drop --frames/--size")
        if demo.weights_path(name_or_path).exists():
            return demo.load_demo_model(name_or_path)[0]
        return demo.BUILDERS[name_or_path]().eval()
    from .checkpoints import load  # one loader for every command; imported late (it imports us)

    return load(name_or_path, frames=frames, image_size=size).model.eval()


def example_input(spec: Spec, batch_size: int = 1, **tensor_kwargs):
    """Random input for a model of ``spec``: ViT ``(B, T, 3, H, W)``, Swin ``(B, 3, T, H, W)``."""
    import torch

    if isinstance(spec, ViTSpec):
        shape = (batch_size, spec.frames, spec.in_chans, spec.size, spec.size)
    else:
        shape = (batch_size, spec.in_chans, spec.frames, spec.size, spec.size)
    return torch.randn(shape, **tensor_kwargs)


__all__ = [
    "MODEL_NAMES",
    "SWIN_SPECS",
    "VIT_SPECS",
    "SwinSpec",
    "ViTSpec",
    "build_model",
    "example_input",
    "get_spec",
    "load_model",
    "spec_of_model",
]

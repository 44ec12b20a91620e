"""The two bundled demo models: their architectures and loading their trained weights.

``demo-vit``: a small VideoMAE-architecture ViT (Hugging Face ``VideoMAEForVideoClassification``),
16x112² input, tubelet 2, patch 16 -> 8 tubelet-frames x 49 tokens, mean pooling.
``demo-swin``: a small torchvision ``SwinTransformer3d`` on 16x112² input.
Both classify the 12 motion classes of :mod:`staprune.demo.data`. Weights live next to this
file in ``weights/<name>.safetensors`` (fp16), the recipe and held-out accuracy in
``weights/<name>.json``.

:func:`register` adds both to the model registry (:mod:`staprune.families`, through the
``staprune.models`` entry point), so ``--model demo-vit`` works in every command like any other
registry name: their fixed 16x112² geometry, their own pruning levels, their normalisation
(mean 0.5, std 0.5) and their sampling (16 consecutive frames).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..core.errors import ConfigError, NotFoundError, UnknownModelError, UsageError
from ..data.sampling import ViewProtocol
from ..data.transforms import Preprocessing
from ..families import family_of
from ..families.base import LoadedModel, ModelEntry
from ..families.swin3d import SwinSpec
from ..families.videomae import ViTSpec
from .data import NUM_CLASSES

FRAMES = 16
SIZE = 112
WEIGHTS_DIR = Path(__file__).parent / "weights"
DEMO_MODELS = ("demo-vit", "demo-swin")
# Pruning levels per model: ViT r per tubelet-frame of 49 tokens (0.79/0.70/0.61 of dense
# GFLOPs); Swin r1 per frame of the 4x4 grid of its second (last) stage (0.94/0.87/0.80: its
# first stage, 60% of the FLOPs, is never pruned).
LEVELS = {"demo-vit": (8, 12, 16), "demo-swin": (4, 8, 12)}


def build_demo_vit(num_classes: int = NUM_CLASSES) -> nn.Module:
    """Untrained demo ViT: hidden 128, 6 layers, 4 heads; input (B, 16, 3, 112, 112)."""
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    config = VideoMAEConfig(
        image_size=SIZE,
        patch_size=16,
        num_channels=3,
        num_frames=FRAMES,
        tubelet_size=2,
        hidden_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=512,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        use_mean_pooling=True,
        num_labels=num_classes,
    )
    return VideoMAEForVideoClassification(config)


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal absolute positions added to Swin's patch tokens (VideoMAE's table).

    Installed as the model's ``pos_drop`` (torchvision applies it right after the patch
    embedding), so the model stays a torchvision ``SwinTransformer3d`` that staprune patches as
    usual. Input ``(B, T, H, W, C)`` on the fixed token grid it was built for.
    """

    def __init__(self, grid: tuple[int, int, int], dim: int) -> None:
        from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

        super().__init__()
        table = get_sinusoid_encoding_table(grid[0] * grid[1] * grid[2], dim)  # (1, T*H*W, dim)
        self.register_buffer("table", table.view(1, *grid, dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != self.table.shape[1:]:
            raise ConfigError(
                f"demo-swin takes {FRAMES}x{SIZE}x{SIZE} clips (token grid {tuple(self.table.shape[1:4])}); "
                f"got token grid {tuple(x.shape[1:4])}"
            )
        return x + self.table


def build_demo_swin(num_classes: int = NUM_CLASSES) -> nn.Module:
    """Untrained demo Video Swin: patch 2x16x16, embed 128, two stages (depths 4-2, heads 4-8),
    window 8x7x7, fixed sinusoidal absolute positions; input (B, 3, 16, 112, 112).

    Token grids: 8 x 7x7 in stage 1 (one window: global attention), 8 x 4x4 in stage 2 (patch
    merging pads 7 to 8), where STA prunes. Why not Video Swin-T's shape (patch 2x4x4, four
    stages): trained on the demo data every patch-4 and patch-8 Swin we tried stayed at chance
    for thousands of steps (with or without absolute positions, shallow or deep first stage,
    local or global windows), while patch-16 Swins leave chance like the ViT (README, "Why the
    demo Swin is shaped as it is").
    """
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    model = SwinTransformer3d(
        patch_size=[2, 16, 16],
        embed_dim=128,
        depths=[4, 2],
        num_heads=[4, 8],
        window_size=[8, 7, 7],
        stochastic_depth_prob=0.0,
        num_classes=num_classes,
    )
    model.pos_drop = SinusoidalPositions((FRAMES // 2, SIZE // 16, SIZE // 16), 128)
    return model


BUILDERS = {"demo-vit": build_demo_vit, "demo-swin": build_demo_swin}


def _check_name(name: str) -> None:
    if name not in BUILDERS:
        raise UnknownModelError(f"unknown demo model {name!r}; choose from {', '.join(DEMO_MODELS)}")


def weights_path(name: str) -> Path:
    _check_name(name)
    return WEIGHTS_DIR / f"{name}.safetensors"


def model_card(name: str) -> dict:
    """The training recipe and held-out accuracy recorded next to the weights."""
    _check_name(name)
    path = WEIGHTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def load_demo_model(name: str) -> nn.Module:
    """A bundled, trained demo model in eval mode (fp32); its family knows its input layout
    (:func:`staprune.load` gives both).

    Raises:
        ValueError: unknown name. FileNotFoundError: the weights are not bundled.
    """
    _check_name(name)
    path = weights_path(name)
    if not path.exists():
        raise NotFoundError(f"{path} is missing; train it with `python -m staprune.demo.train --model {name} --install`")
    return load_weights(BUILDERS[name](), path).eval()


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load weights written by :func:`save_demo_weights` into ``model`` as fp32, every key required
    (integer buffers are cast back to the model's own dtype by ``load_state_dict``)."""
    from safetensors.torch import load_file

    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    model.load_state_dict(state, strict=True)
    return model


def save_demo_weights(model: nn.Module, name: str, path: Path | None = None) -> Path:
    """Store ``model``'s weights as fp16 safetensors (floating tensors halved, integer ones in the
    narrowest integer type that holds them: Swin's int64 relative-position indices would otherwise
    be most of the file)."""
    from safetensors.torch import save_file

    path = path or weights_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: _compact(v.detach()).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return path


def _compact(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t.half()
    if t.dtype in (torch.int32, torch.int64) and t.numel():
        for narrow in (torch.int16, torch.int32):
            info = torch.iinfo(narrow)
            if info.min <= int(t.min()) and int(t.max()) <= info.max:
                return t.to(narrow)
    return t


def roundtrip_fp16(model: nn.Module) -> nn.Module:
    """Round ``model``'s floating parameters/buffers through fp16 in place (what loading gives)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())
    return model


# --- registry -----------------------------------------------------------------------------------
def preprocessing() -> Preprocessing:
    """The demo models' normalisation: ``(x / 255 - 0.5) / 0.5`` at 112²."""
    return Preprocessing(size=SIZE, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def protocols() -> dict[str, ViewProtocol]:
    """Both datasets' protocol for the demo models: the centre 16 consecutive frames (they were
    trained on 16-frame clips at one frame per step), one centre crop."""
    consecutive = ViewProtocol(clips=1, crops=1, frames=FRAMES, stride=1, sampling="uniform")
    return {"k400": consecutive, "ssv2": consecutive}


def as_loaded(name: str, model: nn.Module, how: str = "") -> LoadedModel:
    """A demo model (trained or not) as a :class:`staprune.families.LoadedModel`: its family, its
    normalisation, input, sampling and pruning levels."""
    source = f"{name} ({how})" if how else name
    return LoadedModel(model, family_of(model), preprocessing(), NUM_CLASSES, FRAMES, SIZE, source,
                       protocols=protocols(), levels=LEVELS[name])


def loaded_demo_model(name: str, weights: str = "auto") -> LoadedModel:
    """The demo model as a :class:`staprune.families.LoadedModel`.

    ``weights``: ``auto`` the bundled trained weights when present, else an untrained model (FLOPs
    and speed do not depend on the weights; the source says which); ``bundled`` the trained weights
    or FileNotFoundError; ``random`` an untrained model drawn from torch's global RNG.
    """
    if weights == "bundled" or (weights == "auto" and weights_path(name).exists()):
        model, how = load_demo_model(name), "bundled weights"
    elif weights in ("auto", "random"):
        model = BUILDERS[name]().eval()
        how = "random init" if weights == "random" else "UNTRAINED: weights not bundled"
    else:
        raise UsageError(f"weights={weights!r}; choose auto, bundled or random")
    return as_loaded(name, model, how)


def register(registry) -> None:
    """Entry point of the ``staprune.models`` group: add both demo models to ``registry``
    (:mod:`staprune.families`)."""
    specs = {
        "demo-vit": ("videomae", ViTSpec(128, 6, 4, frames=FRAMES, size=SIZE, num_classes=NUM_CLASSES)),
        "demo-swin": ("swin3d", SwinSpec(128, (4, 2), (4, 8), patch=(2, 16, 16), frames=FRAMES, size=SIZE,
                                         num_classes=NUM_CLASSES)),
    }
    for name, (family, spec) in specs.items():
        registry.register_model(ModelEntry(
            name, family, spec, levels=LEVELS[name], loader=lambda weights, name=name: loaded_demo_model(name, weights),
            fixed_input=True, protocols=protocols(), preprocessing=preprocessing(),
            description=f"bundled demo model ({FRAMES}x{SIZE}², {NUM_CLASSES} synthetic motion classes)",
        ))

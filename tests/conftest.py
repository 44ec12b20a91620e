"""Shared fixtures: tiny random-weight VideoMAE and Swin models built from configs (no downloads)."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
import torch


def tiny_videomae(
    image_size: int = 112,
    num_frames: int = 16,
    layers: int = 6,
    hidden: int = 48,
    heads: int = 4,
    attn: str = "sdpa",
    seed: int = 0,
    head: bool = True,
    **overrides,
):
    """A VideoMAE with the paper's geometry (patch 16, tubelet 2) but tiny width and depth."""
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification, VideoMAEModel

    torch.manual_seed(seed)
    cfg = VideoMAEConfig(
        image_size=image_size,
        num_frames=num_frames,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 4,
        num_labels=7,
        attn_implementation=attn,
        **overrides,
    )
    model = (VideoMAEForVideoClassification if head else VideoMAEModel)(cfg)
    # Random init gives near-identical tokens; scale the patch embedding so tokens differ clearly.
    with torch.no_grad():
        model.base_model.embeddings.patch_embeddings.projection.weight.mul_(4.0)
    return model.eval()


def tiny_swin(seed: int = 0, num_classes: int = 10, **overrides):
    """A torchvision SwinTransformer3d with the paper's patch (2,4,4) but tiny width and depth."""
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    torch.manual_seed(seed)
    kwargs = dict(
        patch_size=[2, 4, 4],
        embed_dim=24,
        depths=[1, 1, 2, 1],
        num_heads=[1, 2, 3, 6],
        window_size=[2, 7, 7],
        num_classes=num_classes,
    )
    return SwinTransformer3d(**{**kwargs, **overrides}).eval()


def clips(batch: int = 2, frames: int = 16, size: int = 112, seed: int = 1) -> torch.Tensor:
    """Random clips ``(B, T, 3, H, W)`` as VideoMAE expects."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 3, size, size, generator=g)


@pytest.fixture
def model_factory():
    return tiny_videomae


@pytest.fixture
def clip_factory():
    return clips


def _distinct_tokens(projection: torch.nn.Module) -> None:
    """Random init gives near-identical tokens; scale the patch embedding so tokens differ clearly."""
    with torch.no_grad():
        projection.weight.mul_(4.0)


def tiny_vivit(layers: int = 6, hidden: int = 48, heads: int = 4, attn: str = "sdpa", seed: int = 0,
               frames: int = 16, size: int = 112, **overrides):
    """A ViViT with the released tubelet (2x16x16) but tiny width and depth: 8 x 7x7 tokens + CLS."""
    from transformers import VivitConfig, VivitForVideoClassification

    torch.manual_seed(seed)
    cfg = VivitConfig(image_size=size, num_frames=frames, tubelet_size=[2, 16, 16], hidden_size=hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden,
                      num_labels=7, attn_implementation=attn, **overrides)
    model = VivitForVideoClassification(cfg)
    _distinct_tokens(model.vivit.embeddings.patch_embeddings.projection)
    return model.eval()


def tiny_vjepa2(layers: int = 6, hidden: int = 48, heads: int = 4, attn: str = "sdpa", seed: int = 0,
                frames: int = 16, size: int = 112, **overrides):
    """A V-JEPA 2 classifier (tubelet 2, patch 16, rotary positions, attentive pooler) at tiny size."""
    from transformers import VJEPA2Config, VJEPA2ForVideoClassification

    torch.manual_seed(seed)
    cfg = VJEPA2Config(patch_size=16, crop_size=size, frames_per_clip=frames, tubelet_size=2, hidden_size=hidden,
                       num_attention_heads=heads, num_hidden_layers=layers, num_pooler_layers=1, num_labels=7,
                       pred_num_hidden_layers=1, pred_hidden_size=32, pred_num_attention_heads=2,
                       attn_implementation=attn, **overrides)
    model = VJEPA2ForVideoClassification(cfg)
    _distinct_tokens(model.vjepa2.encoder.embeddings.patch_embeddings.proj)
    return model.eval()


def tiny_timesformer(layers: int = 6, hidden: int = 48, heads: int = 4, seed: int = 0, frames: int = 8,
                     size: int = 112, **overrides):
    """A TimeSformer (divided space-time attention, patch 16) at tiny size: 8 frames x 7x7 tokens + CLS."""
    from transformers import TimesformerConfig, TimesformerForVideoClassification

    torch.manual_seed(seed)
    cfg = TimesformerConfig(image_size=size, patch_size=16, num_frames=frames, hidden_size=hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden,
                            num_labels=7, **overrides)
    model = TimesformerForVideoClassification(cfg)
    _distinct_tokens(model.timesformer.embeddings.patch_embeddings.projection)
    return model.eval()


def run_cli(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``staprune ARGV`` in this process: (exit code, stdout, stderr), with ``env`` set meanwhile
    and without ``STAPRUNE_TRACEBACK``, as a user would."""
    from staprune.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.pop("STAPRUNE_TRACEBACK", None)
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(argv))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rc, out.getvalue(), err.getvalue()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes: what "nothing existing changed" compares."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_list_of_videos(root: Path, count: int = 4, size: int = 64, classes: int = 5) -> list[str]:
    """``count`` small H.264 clips (24 frames, ``size`` x 80, each moving its own way) in ``root``
    and ``root/list.txt`` naming them with labels ``i % classes``; returns the list's lines."""
    from staprune.data import write_video

    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(count):
        frames = torch.randint(0, 256, (1, size, 80, 3), generator=g).repeat(24, 1, 1, 1)
        frames = (frames + torch.arange(24).view(-1, 1, 1, 1) * (i + 1)) % 256
        write_video(root / f"v{i}.mp4", frames.to(torch.uint8))
        lines.append(f"v{i}.mp4 {i % classes}")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return lines

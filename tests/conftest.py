"""Shared fixtures: every video-classifier family's tiny random-weight model (its family's
:meth:`~staprune.families.Family.tiny_model`, no downloads), clips, the CLI in-process."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
import torch


def classifier_families() -> list:
    """The registered video-classifier families, the ones every per-family test of the classifiers
    runs on (each builds its tiny test model: :meth:`~staprune.families.Family.tiny_model`). The one
    place this filter lives."""
    from staprune.families import VIDEO_CLASSIFIER, families

    return [f for f in families() if f.kind == VIDEO_CLASSIFIER]


def classifier_family_names() -> list[str]:
    """Names of :func:`classifier_families`, in registry order (parametrize ids)."""
    return [f.name for f in classifier_families()]


def tiny_model(family: str, seed: int = 0, **overrides):
    """Family ``family``'s tiny test model (random weights from ``seed``, eval mode); its config and
    what ``overrides`` it takes are the family's (``tiny_videomae(...)`` and the like: the same)."""
    from staprune.families import family_named

    return family_named(family).tiny_model(seed, **overrides)


def tiny_videomae(seed: int = 0, **overrides):
    return tiny_model("videomae", seed, **overrides)


def tiny_swin(seed: int = 0, **overrides):
    return tiny_model("swin3d", seed, **overrides)


def tiny_vivit(seed: int = 0, **overrides):
    return tiny_model("vivit", seed, **overrides)


def tiny_vjepa2(seed: int = 0, **overrides):
    return tiny_model("vjepa2", seed, **overrides)


def tiny_timesformer(seed: int = 0, **overrides):
    return tiny_model("timesformer", seed, **overrides)


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

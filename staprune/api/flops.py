"""FLOPs of a model by name, path, built model or spec: analytic counts, r for a budget, measured counts."""

from __future__ import annotations

from torch import nn

from ..core.config import STAConfig, as_config
from ..core.errors import ConfigError
from ..core.flops import FlopCount, MeasuredFlops, measure_flops
from ..families import Spec, family_of, family_of_spec, find_model, model_names
from .loading import folder_skeleton, load
from .patching import patch, unpatch


def resolve_spec(model, frames: int | None = None, size: int | None = None):
    """A geometry (:class:`staprune.families.Spec`) from a registry name, a loadable path, a built
    model or a spec, optionally on another input clip."""
    if isinstance(model, Spec):
        return model.with_input(frames, size)
    if isinstance(model, nn.Module):
        return family_of(model).spec_of(model, frames, size)
    entry = find_model(model)
    if entry is not None:
        return entry.spec_for(frames, size)
    # A HF folder: its config on the meta device (no weight read); a checkpoint file names its shapes
    # only through its tensors, so it is loaded.
    net = folder_skeleton(model) or load(model, frames=frames, image_size=size).model
    return family_of(net).spec_of(net, frames, size)


def analytic_flops(
    model,
    r: int | None = None,
    *,
    frames: int | None = None,
    size: int | None = None,
    config: STAConfig | None = None,
    **options: object,
) -> FlopCount:
    """FLOPs per view of ``model`` pruned with ``r`` (and any STAConfig ``options``), analytically.

    Args:
        model: registry name (``ViT-B``, ``VideoSwin-T``, ``ViViT-B``, ...), local model path,
            built model or spec.
        r: the paper's r (ViT) / r1 (Video Swin); None: ``config``'s (default 0, dense).
        frames: input clip length (default: the model's).
        size: input side in pixels (default: the model's).
        config: a full STAConfig; ``r`` and ``options`` override its fields.
    Raises:
        ValueError: r too large or otherwise infeasible for the geometry (message gives the largest r).
    """
    spec = resolve_spec(model, frames, size)
    return family_of_spec(spec).flops(spec, as_config(config, r, **options))


def r_for_budget(
    model_or_name,
    fraction: float,
    *,
    frames: int | None = None,
    size: int | None = None,
    **config_options: object,
) -> int:
    """The smallest r whose (analytic) GFLOPs are at most ``fraction`` of the dense model's.

    Raises:
        ValueError: ``fraction`` not positive, or below what the largest valid r reaches (the
            message states the lowest achievable fraction).
    """
    if not 0 < fraction:
        raise ConfigError(f"fraction={fraction} must be positive (a share of the dense FLOPs, e.g. 0.6)")
    spec = resolve_spec(model_or_name, frames, size)
    dense = analytic_flops(spec, 0, **config_options).backbone
    lowest, r = 1.0, 0
    while True:
        try:
            ratio = analytic_flops(spec, r, **config_options).backbone / dense
        except ValueError:
            break
        if ratio <= fraction:
            return r
        lowest, r = min(lowest, ratio), r + 1
    raise ConfigError(
        f"a budget of {fraction:.3f} x dense FLOPs is unreachable for this model and config: the lowest "
        f"achievable fraction is {lowest:.3f} (r={r - 1})"
    )


def paper_tables() -> dict[str, dict[int, float]]:
    """The published GFLOPs per view of every registry model that has them (paper Tables 2, 3)."""
    return {n: dict(e.paper_gflops) for n in model_names() if (e := find_model(n)).paper_gflops}


def measure_model(
    model: str | nn.Module, r: int = 0, *, frames: int | None = None, size: int | None = None, **options: object
) -> MeasuredFlops:
    """Build (or take) a model, patch it with ``r`` and ``options`` (``r == 0``: staprune's dense
    path, which is the stock model but for Video Swin's fused attention, see its family), and count
    one forward pass on a random clip of batch 1."""
    net = load(model, frames=frames, image_size=size).model if isinstance(model, str) else model
    family = family_of(net)
    spec = family.spec_of(net, frames, size)
    patch(net, r=r, **options)
    try:
        return measure_flops(net, family.example_input(spec))
    finally:
        unpatch(net)


__all__ = ["analytic_flops", "measure_model", "paper_tables", "r_for_budget", "resolve_spec"]

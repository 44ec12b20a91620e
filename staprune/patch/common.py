"""What every backbone adapter shares: per-forward state, the patch bookkeeping, and the
grid-filling rule of the Swin recipe (dropped positions take their nearest kept token)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import Tensor, nn

from ..baselines import random_keep_indices
from ..config import PruningPlan, STAConfig, Stage
from ..errors import ConfigError, UsageError
from ..score import PerSampleRandom, normalize_metric, sample_seeds, sta_keep_indices

PATCH_ATTR = "_staprune"


def _not_picklable() -> UsageError:
    return UsageError(
        "a patched model cannot be pickled (torch.save(model)): its patched forwards belong to this process. "
        "Save model.state_dict() (it equals the stock model's), or call staprune.unpatch(model) before "
        "torch.save and, after loading, staprune.patch(model, config=config) with config = "
        "staprune.get_config(model) taken before unpatching"
    )


class PatchCallable:
    """A forward or hook that staprune installed: a plain call, refusing to be pickled with a message
    (a closure would fail with "Can't pickle local object")."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __reduce__(self):
        raise _not_picklable()


@dataclass
class ForwardState:
    """Everything one forward pass accumulates while tokens are dropped.

    Attributes:
        plan: the resolved stages for this input's geometry.
        source: ``(B, L)`` original (pre-pruning) index of each current token.
        grid_hw: spatial token grid of one frame ``(H, W)``.
        rng: per-clip random streams (only for methods that draw noise).
        size: ``(B, L)`` tokens each current token stands for (ToMe only).
        kept: ``source`` after each stage, for :func:`staprune.kept_tokens`.
        kept_stages: the :class:`Stage` each entry of ``kept`` belongs to.
        metric: the pruning block's similarity tensor, recorded by its attention.
        fill: ``(B, L_grid)`` for adapters that refill a full grid (the Swin recipe): the kept token
            (index into the current sequence) each grid position takes, see :func:`nearest_kept_fill`.
    """

    plan: PruningPlan
    source: Tensor
    grid_hw: tuple[int, int]
    rng: PerSampleRandom | None = None
    size: Tensor | None = None
    kept: list[Tensor] = field(default_factory=list)
    kept_stages: list[Stage] = field(default_factory=list)
    metric: Tensor | None = None
    fill: Tensor | None = None

    def record(self, stage: Stage, kept: Tensor) -> None:
        """Remember the tokens a stage kept (``(B, K)`` original indices) for kept_tokens()."""
        self.kept.append(kept)
        self.kept_stages.append(stage)


class Patch:
    """Undo log and runtime state of one patched model (stored on the model as ``_staprune``)."""

    def __init__(self, config: STAConfig) -> None:
        self.config = config
        self.state: ForwardState | None = None
        self._forwards: list[nn.Module] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._plans: dict[tuple[int, int], PruningPlan] = {}

    def override_forward(self, module: nn.Module, forward) -> None:
        """Shadow ``module.forward`` with an instance attribute; :meth:`undo` deletes it again."""
        module.forward = PatchCallable(forward)
        self._forwards.append(module)

    def hook(self, module: nn.Module, fn, *, pre: bool = False, with_kwargs: bool = False) -> None:
        """Register ``fn`` as a forward (``pre``: forward-pre) hook of ``module`` until :meth:`undo`."""
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self._hooks.append(register(PatchCallable(fn), with_kwargs=with_kwargs))

    def __reduce__(self):
        raise _not_picklable()

    def plan_for(self, frames: int, tokens_per_frame: int, build) -> PruningPlan:
        key = (frames, tokens_per_frame)
        if key not in self._plans:
            self._plans[key] = build(frames, tokens_per_frame)
        return self._plans[key]

    def start(
        self, plan: PruningPlan, pixels: Tensor, grid_hw: tuple[int, int], device: torch.device
    ) -> None:
        """Reset per-forward state at the start of a forward pass on ``pixels`` ``(B, ...)``."""
        bsz = pixels.shape[0]
        length = plan.frames * plan.tokens_per_frame
        cfg = plan.config
        needs_noise = cfg.method == "random" or (cfg.method == "sta" and cfg.first_unit != "bipartite")
        rng = PerSampleRandom(sample_seeds(pixels, cfg.seed), device) if needs_noise else None
        source = torch.arange(length, device=device).expand(bsz, -1)
        size = torch.ones(bsz, length, device=device) if cfg.method == "tome" else None
        self.state = ForwardState(plan, source, grid_hw, rng, size)

    def keep_indices(
        self, stage: Stage, tokens: Tensor, metric: Tensor | None, positions: Tensor, grid_hw: tuple[int, int]
    ) -> Tensor:
        """Indices ``(B, K)`` of the tokens one stage keeps, for STA or the random baseline.

        Args:
            tokens: the stage's hidden states ``(B, L, C)`` (semantic score; the metric when
                ``metric`` is None, i.e. ``similarity="hidden"``).
            metric: normalised similarity features ``(B, L, c)`` or None.
            positions: original flat index of each token ``(B, L)`` (grid first unit).
        """
        cfg = self.config
        if cfg.method == "random":
            return random_keep_indices(self.state.rng, tokens.shape[0], stage.units, stage.tokens_in, stage.r)
        return sta_keep_indices(
            tokens,
            normalize_metric(tokens) if metric is None else metric,
            stage.units,
            stage.r,
            forward=stage.forward,
            first_unit=cfg.first_unit,
            score=cfg.score,
            first_transition=cfg.first_transition,
            rng=self.state.rng,
            positions=positions,
            grid_hw=grid_hw,
        )

    def undo(self) -> None:
        for module in self._forwards:
            module.__dict__.pop("forward", None)
        for handle in self._hooks:
            handle.remove()
        self._forwards.clear()
        self._hooks.clear()
        self.state = None


def current_stage(state: ForwardState, layer: int) -> Stage | None:
    """The stage of this forward's plan that prunes after block (or Swin stage) ``layer``, if any."""
    return next((s for s in state.plan.stages if s.layer == layer), None)


# --- nearest kept fill (the paper's Video Swin recipe, also used for TimeSformer) ----------------
def _grid_distances(h: int, w: int, device: torch.device) -> Tensor:
    """``(h*w, h*w)`` squared Euclidean distances between grid cells (exact in float32)."""
    rows = torch.arange(h * w, device=device) // w
    cols = torch.arange(h * w, device=device) % w
    d = (rows.view(-1, 1) - rows.view(1, -1)) ** 2 + (cols.view(-1, 1) - cols.view(1, -1)) ** 2
    return d.float()


@lru_cache(maxsize=16)
def _cached_distances(h: int, w: int, device: torch.device) -> Tensor:
    with torch.inference_mode(False):  # cached: must be usable outside inference mode
        return _grid_distances(h, w, device)


def _squared_distances(h: int, w: int, device: torch.device) -> Tensor:
    # Under torch.compile the table is part of the graph (a cache lookup cannot be traced).
    return _grid_distances(h, w, device) if torch.compiler.is_compiling() else _cached_distances(h, w, device)


def nearest_kept_fill(keep: Tensor, frames: int, grid_hw: tuple[int, int], chunk: int = 1 << 23) -> Tensor:
    """For every grid position, the kept token whose value it takes.

    Kept positions map to themselves. A dropped position takes its nearest kept token in the
    same frame by Euclidean distance on ``(row, col)``; ties go to the lowest flat index
    (smallest row, then smallest column).

    Args:
        keep: ``(B, K)`` kept flat positions ``t*h*w + row*w + col`` (any order, no repeats).
        frames: ``T``; grid_hw: ``(h, w)``.
        chunk: cap on distance-matrix entries per step (memory bound).
    Returns:
        ``(B, T*h*w)`` long indices into ``keep``'s K tokens.
    Raises:
        ValueError: a frame has no kept token.
    """
    bsz, n_keep = keep.shape
    h, w = grid_hw
    n = h * w
    kept = torch.zeros(bsz, frames * n, dtype=torch.bool, device=keep.device).scatter_(1, keep, True)
    kept = kept.view(bsz * frames, n)
    if not torch.compiler.is_compiling() and not bool(kept.any(-1).all()):
        raise ConfigError("a frame has no kept token; nearest-kept filling needs at least one per frame")
    dist = _squared_distances(h, w, keep.device)
    nearest = torch.empty(bsz * frames, n, dtype=torch.long, device=keep.device)
    step = max(1, chunk // (n * n))
    for i in range(0, bsz * frames, step):
        masked = dist.masked_fill(~kept[i : i + step, None, :], float("inf"))  # (step, n, n)
        nearest[i : i + step] = masked.argmin(-1)  # first minimum = lowest flat index
    offsets = torch.arange(frames, device=keep.device).repeat(bsz).view(-1, 1) * n
    nearest = (nearest + offsets).view(bsz, frames * n)
    slot = torch.full((bsz, frames * n), -1, dtype=torch.long, device=keep.device)
    slot.scatter_(1, keep, torch.arange(n_keep, device=keep.device).expand(bsz, -1))
    return slot.gather(1, nearest)

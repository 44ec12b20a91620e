"""What every backbone adapter shares: the patch bookkeeping stored on a patched model, the state
one forward pass accumulates, and the read-only accessors of both (:func:`kept_tokens`,
:func:`get_config`, ...), which the public API re-exports."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..core.baselines import random_keep_indices
from ..core.config import PruningPlan, STAConfig, Stage
from ..core.errors import UsageError
from ..core.score import PerSampleRandom, normalize_metric, sample_seeds, sta_keep_indices

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
        if hasattr(fn, "__wrapped__"):  # inspect.signature reports the method it stands in for
            self.__wrapped__ = fn.__wrapped__

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


def needs_noise(config: STAConfig) -> bool:
    """Whether the method draws random numbers (the random baseline, STA's random or grid first unit)."""
    return config.method == "random" or (config.method == "sta" and config.first_unit != "bipartite")


_ABSENT = object()  # an attribute a patch set that the module did not have


class Patch:
    """Undo log and runtime state of one patched model (stored on the model as ``_staprune``)."""

    def __init__(self, config: STAConfig) -> None:
        self.config = config
        self.state: ForwardState | None = None
        self._overrides: list[tuple[nn.Module, str]] = []
        self._attributes: list[tuple[nn.Module, str, object]] = []  # (module, name, the value it had)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._plans: dict[tuple[int, int], PruningPlan] = {}

    def override_forward(self, module: nn.Module, forward) -> None:
        """Shadow ``module.forward`` with an instance attribute; :meth:`undo` deletes it again."""
        self.override_method(module, "forward", forward)

    def override_method(self, module: nn.Module, name: str, method) -> None:
        """Shadow method ``name`` of ``module`` with an instance attribute; :meth:`undo` deletes it again."""
        module.__dict__[name] = PatchCallable(method)
        self._overrides.append((module, name))

    def set_attribute(self, module: nn.Module, name: str, value: object) -> None:
        """Set the plain attribute ``module.<name>`` (not a submodule, parameter or buffer) to ``value``
        until :meth:`undo` puts the old value back."""
        self._attributes.append((module, name, module.__dict__.get(name, _ABSENT)))
        module.__dict__[name] = value

    def hook(self, module: nn.Module, fn, *, pre: bool = False, with_kwargs: bool = False,
             always_call: bool = False) -> None:
        """Register ``fn`` as a forward (``pre``: forward-pre) hook of ``module`` until :meth:`undo`;
        ``always_call``: a forward hook that runs even when the forward raised."""
        if pre:
            handle = module.register_forward_pre_hook(PatchCallable(fn), with_kwargs=with_kwargs)
        else:
            handle = module.register_forward_hook(PatchCallable(fn), with_kwargs=with_kwargs, always_call=always_call)
        self._hooks.append(handle)

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
        rng = PerSampleRandom(sample_seeds(pixels, cfg.seed), device) if needs_noise(cfg) else None
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
        for module, name in self._overrides:
            module.__dict__.pop(name, None)
        for handle in self._hooks:
            handle.remove()
        for module, name, value in reversed(self._attributes):
            if value is _ABSENT:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = value
        self._attributes.clear()
        self._overrides.clear()
        self._hooks.clear()
        self.state = None


def current_stage(state: ForwardState, layer: int) -> Stage | None:
    """The stage of this forward's plan that prunes after block (or Swin stage) ``layer``, if any."""
    return next((s for s in state.plan.stages if s.layer == layer), None)


# --- read-only accessors (re-exported by staprune) ----------------------------------------------
def kept_tokens(model: nn.Module) -> list[Tensor]:
    """Original (pre-pruning) indices of the tokens kept after each stage of the last forward.

    Returns one ``(B, kept)`` long tensor per stage; index ``t * N + s`` is tubelet-frame ``t``,
    spatial token ``s``. For ToMe, the index of each merged token's representative.

    A video LLM (last prompt's prefill): rows in batch order, each row's videos in prompt order,
    one ``(K,)`` tensor per video of its kept placeholder indices; a row without a video has one
    empty ``(0,)`` tensor in its place (a beam or returned sequence is a row of its own).
    """
    p = model.__dict__.get(PATCH_ATTR)
    if p is None:
        raise UsageError("model is not patched by staprune; call staprune.patch(model, r=...) first")
    if p.state is None:
        raise UsageError("no forward pass has run since the model was patched")
    return list(p.state.kept)


def kept_stages(model: nn.Module) -> list[Stage]:
    """The :class:`~staprune.core.config.Stage` of each entry of :func:`kept_tokens` (same order):
    ``layer`` is the block index (ViT) or the Swin stage index (1, 2, 3); stages that drop
    nothing record nothing."""
    kept_tokens(model)  # same errors when unpatched or before a forward
    return list(model.__dict__[PATCH_ATTR].state.kept_stages)


def final_kept(model: nn.Module) -> Tensor | None:
    """Original indices ``(B, K)`` kept after the last stage of the last forward; None when the model
    is not patched or nothing was pruned."""
    if get_config(model) is None:
        return None
    kept = kept_tokens(model)
    return kept[-1] if kept else None


def get_config(model: nn.Module) -> STAConfig | None:
    """The config a model was patched with, or None."""
    p = model.__dict__.get(PATCH_ATTR)
    return None if p is None else p.config


def pruning_stage_count(model: nn.Module) -> int | None:
    """Stages that drop tokens per forward of the patched ``model`` (None: not patched / no forward yet)."""
    p = model.__dict__.get(PATCH_ATTR)
    if p is None or p.state is None:
        return None
    return sum(1 for s in p.state.plan.stages if s.r)


def recorded_stage_count(model: nn.Module) -> int:
    """Stages the last forward of the patched ``model`` recorded (a stage re-run records twice)."""
    return len(model.__dict__[PATCH_ATTR].state.kept)

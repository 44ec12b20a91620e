"""Pruning for columnar (joint space-time attention) transformers by forward hooks.

For models whose blocks are modules with separate query / key / value projections (ViViT, V-JEPA 2,
TimeSformer's joint attention), nothing of the stock forward has to be rewritten:

* a forward hook on the chosen projection (``similarity``: key, query or value) of each pruning
  block records its output, the metric;
* a forward hook on each pruning block hands the block's output tokens and that metric to the
  selection (:meth:`Patch.keep_indices`: STA or the random baseline) and returns the block's output
  with only the kept tokens, which every later block then runs on.

Leading extra tokens (a CLS token) are never dropped and take no part in scoring; the reported
indices (:func:`staprune.kept_tokens`) are patch tokens only, ``t * N + s``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.score import gather_tokens, head_mean
from .state import Patch, current_stage

_PROJECTIONS = ("query", "key", "value")


@dataclass(frozen=True)
class ColumnarModel:
    """Where a columnar model keeps what the hooks need.

    Attributes:
        layers: the transformer blocks in depth order.
        projections: ``projections(layer)`` -> ``{"query": m, "key": m, "value": m}``, the linear
            modules whose outputs ``(B, extra + L, heads * d)`` are the attention inputs.
        heads: attention heads (the metric is averaged over them).
        extra_tokens: leading tokens never pruned (1 for a CLS token).
        hidden_of: the block output -> its hidden states ``(B, extra + L, C)``.
        with_hidden: ``(block output, new hidden states)`` -> the block output to return.
        metric_of: optional ``(layer index, projection output (B, heads, L, d), state)`` -> the metric
            per head (e.g. V-JEPA 2's keys after their rotary rotation); None uses the output as is.
    """

    layers: Sequence[nn.Module]
    projections: Callable[[nn.Module], dict[str, nn.Module]]
    heads: int
    extra_tokens: int = 0
    hidden_of: Callable[[object], Tensor] = lambda output: output
    with_hidden: Callable[[object, Tensor], object] = lambda output, hidden: hidden
    metric_of: Callable[[int, Tensor, object], Tensor] | None = None


def install(p: Patch, model: ColumnarModel, stage_layers: set[int]) -> None:
    """Register the metric and pruning hooks on the blocks after which a stage may prune."""
    cfg = p.config
    if cfg.method == "none":
        return
    taps = cfg.method == "sta" and cfg.similarity in _PROJECTIONS
    for index in sorted(stage_layers):
        layer = model.layers[index]
        if taps:
            projection = model.projections(layer)[cfg.similarity]
            p.hook(projection, _metric_hook(p, index))
        p.hook(layer, _prune_hook(p, model, index, taps))


def _metric_hook(p: Patch, index: int):
    def hook(module: nn.Module, args, output: Tensor) -> None:
        if p.state is not None and current_stage(p.state, index) is not None:
            p.state.metric = output

    return hook


def _prune_hook(p: Patch, model: ColumnarModel, index: int, taps: bool):
    def hook(module: nn.Module, args, output):
        state = p.state
        stage = None if state is None else current_stage(state, index)
        if stage is None or stage.r == 0:
            if state is not None:
                state.metric = None
            return output
        hidden = model.hidden_of(output)
        extra = model.extra_tokens
        tokens = hidden[:, extra:]
        metric = None
        if taps:
            raw = state.metric[:, extra:]
            per_head = raw.view(*raw.shape[:2], model.heads, -1).transpose(1, 2)  # (B, heads, L, d)
            if model.metric_of is not None:
                per_head = model.metric_of(index, per_head, state)
            metric = head_mean(per_head)
        state.metric = None  # do not keep the block's keys alive
        keep = p.keep_indices(stage, tokens, metric, state.source, state.grid_hw)
        kept = gather_tokens(tokens, keep)
        state.source = state.source.gather(1, keep)
        state.record(stage, state.source)
        new_hidden = torch.cat([hidden[:, :extra], kept], dim=1) if extra else kept
        return model.with_hidden(output, new_hidden)

    return hook


__all__ = ["ColumnarModel", "install"]

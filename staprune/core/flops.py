"""FLOP counts per view: analytic (the paper's convention) and measured (``FlopCounterMode``).

Convention (docs/algorithm/flops.md, fvcore as used by the paper): one multiply-add = one FLOP; only matrix
products and convolutions are counted, not softmax, GELU, additions or norms (a layer norm would
add a few FLOPs per element, < 0.1% of any figure here, so the choice cannot move a rounded
number); the patch embedding is included and so is the classifier head (< 0.001%). With this
convention every figure of the paper's Tables 2 and 3 is reproduced within 1% (tests/test_flops.py).

Each model family computes its own analytic count (:meth:`staprune.families.Family.flops`) from
the pieces here: a columnar transformer block with ``L`` tokens, ``C`` channels and MLP width
``C_mlp`` costs::

    qkv 3LC²  +  scores L²C  +  attn·V L²C  +  proj LC²  +  MLP 2·L·C·C_mlp

STA's own selection operations (bipartite matching, transition matrices) are reported apart
from the backbone in :attr:`FlopCount.selection`; :attr:`FlopCount.gflops` is the backbone alone
(the paper's figures: with STA's selection added, Video Swin overshoots Table 3 by 1-2%, so the
published numbers do not include it), :attr:`FlopCount.total` is their sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import PruningPlan, STAConfig, Stage
from .selection_hook import wrapping_selection


@dataclass(frozen=True)
class FlopCount:
    """FLOPs (multiply-adds) of one forward pass of one view.

    Attributes:
        backbone: the model's own operations.
        selection: the pruning method's own operations (STA matching/transitions, ToMe matching).
        parts: backbone FLOPs by kind (``embed``, ``qkv``, ``attention``, ``proj``, ``mlp``,
            ``merge``, ``head``, ...), summing to ``backbone``.
    """

    backbone: float
    selection: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.backbone + self.selection

    @property
    def gflops(self) -> float:
        """Backbone GFLOPs: the paper's figures (selection reported apart, see :attr:`selection`)."""
        return self.backbone / 1e9


# --- pieces every family's count is made of -----------------------------------------------------
def add_parts(parts: dict[str, float], **flops: float) -> None:
    """Accumulate FLOPs by kind into ``parts``."""
    for key, value in flops.items():
        parts[key] = parts.get(key, 0.0) + value


def metric_dim(config: STAConfig, channels: int, heads: int) -> int:
    """Width ``c`` of the similarity metric: a head's width (keys etc. averaged over heads) or C."""
    return channels if config.similarity == "hidden" else channels // heads


def _bipartite_flops(n: int, r: int, c: int) -> float:
    """Bipartite matching of ``n`` tokens dropping ``r``: |A|·|B|·c per round (more rounds when r > n/2)."""
    flops = 0.0
    while r > 0:
        step = min(r, n // 2)
        flops += math.ceil(n / 2) * (n // 2) * c
        n, r = n - step, r - step
    return flops


def sta_selection_flops(stage: Stage, c: int, config: STAConfig) -> float:
    """Multiply-adds of STA's selection at one stage (``units`` units of ``n`` tokens, drop ``r``).

    First unit: bipartite matching (≈ (n/2)²·c; random/grid pruners: none). Each later unit: its
    transition ``n × k`` similarity (``n·k·c``) and ``P·A`` (``n·k``), with ``k`` the previous unit's
    tokens (all ``n`` of the first unit under ``first_transition="all"``, else the kept ``n-r``).
    The semantic score (abs-sum, no products) and softmax are not multiply-adds.
    """
    n, r = stage.tokens_in, stage.r
    if r == 0 or config.method != "sta":
        return 0.0
    flops = _bipartite_flops(n, r, c) if config.first_unit == "bipartite" else 0.0
    if config.score == "semantic":
        return flops
    for step in range(1, stage.units):
        k = n if (step == 1 and config.first_transition == "all") else n - r
        flops += n * k * (c + 1)
    return flops


def tokens_per_block(plan: PruningPlan) -> list[int]:
    """Patch tokens entering each block under ``plan`` (all of them when its method never prunes)."""
    if plan.config.method == "none":
        return [plan.frames * plan.tokens_per_frame] * plan.depth
    return plan.tokens_per_block()


def columnar_flops(
    plan: PruningPlan,
    *,
    channels: int,
    heads: int,
    mlp_hidden: int,
    extra_tokens: int = 0,
    parts: dict[str, float] | None = None,
) -> tuple[dict[str, float], float]:
    """FLOPs of the blocks of a columnar (joint space-time attention) transformer under ``plan``.

    Every block attends over its patch tokens plus ``extra_tokens`` (a CLS token, never pruned).
    STA / random prune after a block; ToMe merges between a block's attention and its MLP, so
    the MLP of a merging block already runs on fewer tokens.

    Returns:
        ``(parts, selection)``: backbone FLOPs by kind added to ``parts`` (a new dict if None),
        and the pruning method's own FLOPs.
    """
    parts = {} if parts is None else parts
    config, c = plan.config, channels
    stages = {s.layer: s for s in plan.stages} if config.method != "none" else {}
    selection = 0.0
    for layer, patch_tokens in enumerate(tokens_per_block(plan)):
        length = patch_tokens + extra_tokens
        stage = stages.get(layer)
        mlp_len = length
        if config.method == "tome" and stage is not None:
            mlp_len = stage.units * stage.tokens_out + extra_tokens
            if stage.r:
                # Global bipartite matching over the whole sequence: |A|·|B|·c.
                selection += math.ceil(patch_tokens / 2) * (patch_tokens // 2) * (c // heads)
        elif stage is not None:
            selection += sta_selection_flops(stage, metric_dim(config, c, heads), config)
        add_parts(parts, qkv=3 * length * c * c, attention=2 * length * length * c, proj=length * c * c)
        add_parts(parts, mlp=2 * mlp_len * c * mlp_hidden)
    return parts, selection


def tubelet_vit_parts(spec, plan: PruningPlan, *, extra_tokens: int = 0) -> tuple[dict[str, float], float]:
    """The tubelet embedding ``L·C·in_chans·tubelet·p²`` and every block (:func:`columnar_flops`) of a
    columnar ViT ``spec`` (a family spec with ``hidden``, ``heads``, ``mlp_hidden``, ``in_chans``,
    ``tubelet``, ``patch``) under ``plan``; the family adds its head.

    Returns:
        ``(parts, selection)`` as :func:`columnar_flops`.
    """
    c, length = spec.hidden, plan.frames * plan.tokens_per_frame
    parts: dict[str, float] = {"embed": length * c * spec.in_chans * spec.tubelet * spec.patch**2}
    return columnar_flops(plan, channels=c, heads=spec.heads, mlp_hidden=spec.mlp_hidden,
                          extra_tokens=extra_tokens, parts=parts)


def final_tokens(plan: PruningPlan) -> int:
    """Patch tokens leaving the last block under ``plan``."""
    if plan.config.method == "none" or not plan.stages:
        return plan.frames * plan.tokens_per_frame
    return plan.tokens_after[-1]


# --- measured -----------------------------------------------------------------------------------
def flop_counter(**kwargs) -> torch.utils.flop_counter.FlopCounterMode:
    """A ``FlopCounterMode(**kwargs)`` that also counts CPU fused attention.

    torch's counter has formulas for the CUDA SDPA kernels; some releases (2.14 among them) have
    none for the CPU kernel ``aten._scaled_dot_product_flash_attention_for_cpu``, so attention,
    17.9 of Swin-T's 88 GFLOPs, would silently count as zero. Where it is missing, the CUDA flash
    kernel's formulas (same argument order, same arithmetic) are registered for it.
    """
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    for cpu_op, twin in (
        ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention"),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention_backward"),
    ):
        op, reference = getattr(aten, cpu_op, None), getattr(aten, twin, None)
        if op is not None and reference in fc.flop_registry and op not in fc.flop_registry:
            fc.flop_registry[op] = fc.flop_registry[reference]
    return fc.FlopCounterMode(**kwargs)


@dataclass(frozen=True)
class MeasuredFlops:
    """FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``, in multiply-adds.

    Attributes:
        backbone: everything except the selection functions.
        selection: FLOPs spent inside the pruning method's selection functions.
        by_operator: total multiply-adds per aten operator (selection included).
        by_module: top-level module name -> multiply-adds (selection included).
    """

    backbone: float
    selection: float
    by_operator: dict[str, float]
    by_module: dict[str, float]

    @property
    def total(self) -> float:
        return self.backbone + self.selection

    @property
    def gflops(self) -> float:
        """Backbone GFLOPs, comparable to :attr:`FlopCount.gflops`."""
        return self.backbone / 1e9


def _attributing(counter: torch.utils.flop_counter.FlopCounterMode, spent: list[float]):
    """Context in which FLOPs counted inside selection functions are appended to ``spent`` (by
    diffing the counter's running total; a selection call nested in another is counted once)."""
    depth = [0]

    def wrap(fn: Callable) -> Callable:
        def counted(*args, **kwargs):
            depth[0] += 1
            before = counter.get_total_flops()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    spent.append(counter.get_total_flops() - before)

        return counted

    return wrapping_selection(wrap)


def measure_flops(model: nn.Module, inputs: torch.Tensor | tuple | dict) -> MeasuredFlops:
    """Count the FLOPs of ``model(inputs)`` with ``FlopCounterMode``, in the paper's convention.

    ``FlopCounterMode`` counts 2 FLOPs per multiply-add; the result is halved. It has formulas for
    matmuls, convolutions and the fused attention kernels (the CPU one via :func:`flop_counter`),
    and counts nothing for norms and elementwise operations, like fvcore. FLOPs spent inside the selection
    functions (``sta_keep_indices``, ``tome_merge``) are reported as ``selection``.

    Args:
        model: any module; inputs: a tensor (positional), a tuple of positional args, or kwargs.
    """
    counter = flop_counter(display=False, depth=1)
    spent: list[float] = []
    args, kwargs = ((inputs,), {}) if isinstance(inputs, torch.Tensor) else (
        (tuple(inputs), {}) if isinstance(inputs, tuple | list) else ((), dict(inputs))
    )
    with torch.inference_mode(), counter, _attributing(counter, spent):
        model(*args, **kwargs)
    counts = counter.get_flop_counts()
    by_operator = {str(op): value / 2 for op, value in counts.get("Global", {}).items()}
    by_module = {name: sum(ops.values()) / 2 for name, ops in counts.items() if name != "Global"}
    selection = sum(spent) / 2
    return MeasuredFlops(counter.get_total_flops() / 2 - selection, selection, by_operator, by_module)



"""FLOP counts per view: analytic (the paper's convention) and measured (``FlopCounterMode``).

Convention (DESIGN.md, fvcore as used by the paper): one multiply-add = one FLOP; only matrix
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

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import PruningPlan, STAConfig, Stage, as_config
from .errors import ConfigError


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


# --- public analytic API ------------------------------------------------------------------------
def resolve_spec(model, frames: int | None = None, size: int | None = None):
    """A geometry (:class:`staprune.families.Spec`) from a registry name, a loadable path, a built
    model or a spec, optionally on another input clip."""
    from .families import Spec, family_of, find_model

    if isinstance(model, Spec):
        return model.with_input(frames, size)
    if isinstance(model, nn.Module):
        return family_of(model).spec_of(model, frames, size)
    entry = find_model(model)
    if entry is not None:
        return entry.spec_for(frames, size)
    from .models import load_model  # a path: read its config (loads the weights too)

    net = load_model(model, frames, size)
    return family_of(net).spec_of(net, frames, size)


def analytic_flops(
    model,
    r: int = 0,
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
        r: the paper's r (ViT) / r1 (Video Swin).
        frames, size: input clip length and side (defaults: the model's).
    Raises:
        ValueError: r too large or otherwise infeasible for the geometry (message gives the largest r).
    """
    from .families import family_of_spec

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
    from .families import find_model, model_names

    return {n: dict(e.paper_gflops) for n in model_names() if (e := find_model(n)).paper_gflops}


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


# Names of selection functions whose cost is the pruning method's, not the backbone's.
SELECTION_FUNCTIONS = ("sta_keep_indices", "tome_merge", "random_keep_indices")


@contextlib.contextmanager
def wrapping_selection(wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """Replace every staprune module's reference to a selection function by ``wrap(function)``
    for the duration of the block (used to attribute FLOPs and time to the selection).

    Adapters import the functions by name (``from ..score import sta_keep_indices``), so each module
    attribute that *is* the original function is replaced, and restored on exit.
    """
    from . import baselines, score

    originals = [getattr(score, name, None) or getattr(baselines, name) for name in SELECTION_FUNCTIONS]
    replaced: list[tuple[object, str, Callable]] = []
    for module in [m for name, m in list(sys.modules.items()) if name.startswith("staprune") and m]:
        for fn in originals:
            name = fn.__name__
            if getattr(module, name, None) is fn:
                replaced.append((module, name, fn))
                setattr(module, name, wrap(fn))
    try:
        yield
    finally:
        for module, name, fn in replaced:
            setattr(module, name, fn)


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


def measure_model(
    model: str | nn.Module, r: int = 0, *, frames: int | None = None, size: int | None = None, **options: object
) -> MeasuredFlops:
    """Build (or take) a model, patch it with ``r`` and ``options`` (``r == 0``: staprune's dense
    path, which is the stock model but for Video Swin's fused attention, see its family), and count
    one forward pass on a random clip of batch 1."""
    import staprune

    from .families import family_of
    from .models import load_model

    net = load_model(model, frames, size) if isinstance(model, str) else model
    family = family_of(net)
    spec = family.spec_of(net, frames, size)
    staprune.patch(net, r=r, **options)
    try:
        return measure_flops(net, family.example_input(spec))
    finally:
        staprune.unpatch(net)


# --- CLI ----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``staprune flops``."""
    from .options import add_pruning_arguments

    parser.add_argument("--model", help="registry name (ViT-B, VideoSwin-T, ViViT-B, demo-vit, ...) or a local "
                        "model path; default: every model of the paper's tables")
    parser.add_argument("--r", type=int, nargs="+", help="r (ViT) or r1 (Video Swin); default the model's levels")
    parser.add_argument("--method", default="sta", choices=("sta", "random", "tome"))
    parser.add_argument("--frames", type=int, help="input frames (default: the model's)")
    parser.add_argument("--size", type=int, help="input side in pixels (default: the model's)")
    parser.add_argument("--measured", action="store_true",
                        help="count a forward pass of a random-weight model with FlopCounterMode")
    parser.add_argument("--target", type=float, metavar="FRACTION",
                        help="print the smallest r whose GFLOPs are at most FRACTION x dense")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    add_pruning_arguments(parser)


def default_levels(name: str, spec) -> tuple[int, ...]:
    """r values to tabulate for ``name`` when none are given: 0 and the model's three levels."""
    from .families import levels_of

    return (0, *levels_of(name, spec))


def _options(args: argparse.Namespace) -> dict[str, object]:
    from .options import pruning_options

    return {"method": args.method, **pruning_options(args)}


def _row(args: argparse.Namespace, name: str, spec, net: nn.Module | None, r: int) -> dict:
    """One JSON row; ``net`` is the built model when counting with FlopCounterMode."""
    from .families import find_model
    from .options import pruning_options, recorded

    dense = analytic_flops(spec, 0).gflops
    if net is not None:
        count = measure_model(net, r, frames=args.frames, size=args.size, **_options(args))
    else:
        count = analytic_flops(spec, r, **_options(args))
    row = {
        "model": name,
        "r": r,
        "method": args.method,
        "options": recorded(pruning_options(args)),
        "gflops": round(count.gflops, 3),
        "selection_gflops": round(count.selection / 1e9, 4),
        "fraction_of_dense": round(count.gflops / dense, 4),
        "counted": "measured" if args.measured else "analytic",
    }
    entry = find_model(name)
    paper = (entry.paper_gflops or {}) if entry is not None else {}
    default_input = args.frames is None and args.size is None and args.method == "sta" and not pruning_options(args)
    if default_input and r in paper:
        row["paper_gflops"] = paper[r]
    return row


def _r_label(name: str) -> str:
    from .families import family_named, find_model

    entry = find_model(name)
    return family_named(entry.family).r_name if entry is not None else "r"


def _print_tables(rows: list[dict]) -> None:
    """Rows grouped by pruning levels: one line per model, one ``ours (paper)`` cell per r."""
    by_model: dict[str, list[dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row)
    groups: dict[tuple[tuple[int, ...], str], list[str]] = {}
    for name, model_rows in by_model.items():
        groups.setdefault((tuple(r["r"] for r in model_rows), _r_label(name)), []).append(name)
    for (rs, label), names in groups.items():
        width = max(len(n) for n in names) + 2
        print(f"{'model':<{width}}" + "".join(f"{f'{label}={r}':>20}" for r in rs))
        for name in names:
            cells = []
            for row in by_model[name]:
                cell = f"{row['gflops']:.1f}"
                if "paper_gflops" in row:
                    cell += f" ({row['paper_gflops']:g})"
                cells.append(f"{cell:>20}")
            print(f"{name:<{width}}" + "".join(cells))
        print()
    counted = rows[0]["counted"] if rows else "analytic"
    print(f"GFLOPs per view ({counted}; 1 multiply-add = 1 FLOP); cells: ours (paper). "
          "STA's own selection operations are excluded (see --json selection_gflops).")


def run(args: argparse.Namespace) -> int:
    """``staprune flops``: the paper's tables, one model's GFLOPs for some r, or r for a budget."""
    from .options import check_pruning_options
    check_pruning_options(args)
    names = [args.model] if args.model else list(paper_tables())
    specs = {name: resolve_spec(name, args.frames, args.size) for name in names}
    if args.target is not None:
        return _run_target(args, specs)
    rows = []
    for name, spec in specs.items():
        net = None
        if args.measured:
            from .models import load_model

            net = load_model(name, args.frames, args.size)
        rows += [_row(args, name, spec, net, r) for r in (args.r or default_levels(name, spec))]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_tables(rows)
    return 0


def _run_target(args: argparse.Namespace, specs: dict) -> int:
    rows = []
    for name, spec in specs.items():
        r = r_for_budget(spec, args.target, **_options(args))
        dense = analytic_flops(spec, 0).gflops
        gflops = analytic_flops(spec, r, **_options(args)).gflops
        rows.append({"model": name, "r": r, "method": args.method, "gflops": round(gflops, 3),
                     "fraction_of_dense": round(gflops / dense, 4), "target": args.target})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['model']}: r={row['r']} gives {row['gflops']:.1f} GFLOPs = "
                  f"{row['fraction_of_dense']:.3f} x dense (target <= {args.target})")
    return 0

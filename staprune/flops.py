"""FLOP counts per view: analytic (the paper's convention) and measured (``FlopCounterMode``).

Convention (DESIGN.md, fvcore as used by the paper): one multiply-add = one FLOP; only matrix
products and convolutions are counted, not softmax, GELU, additions or norms (a layer norm would
add a few FLOPs per element, < 0.1% of any figure here, so the choice cannot move a rounded
number); the patch embedding is included and so is the classifier head (< 0.001%). With this
convention every figure of the paper's Tables 2 and 3 is reproduced within 1% (tests/test_flops.py).

ViT block with ``L`` tokens, ``C`` channels, MLP ratio 4::

    qkv 3LC²  +  scores L²C  +  attn·V L²C  +  proj LC²  +  MLP 8LC²

Video Swin block with ``N`` tokens, ``w`` tokens per window::

    qkv 3NC²  +  proj NC²  +  MLP 8NC²  +  window attention 2·N_pad·w·C

In a pruned Swin stage only qkv, projection and MLP run on the kept tokens; window attention
and patch merging stay dense (the convention that reproduces the paper's Table 3).

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

from .config import STAConfig, Stage, as_config, resolve_plan, resolve_swin_plan
from .models import MODEL_NAMES, SwinSpec, ViTSpec, get_spec, spec_of_model

# The paper's Tables 2 and 3 (GFLOPs per view), for the CLI's comparison and the tests.
PAPER_VIT_R = (0, 32, 48, 64)
PAPER_SWIN_R = (0, 192, 256, 320)
PAPER_GFLOPS: dict[str, dict[int, float]] = {
    "ViT-S": dict(zip(PAPER_VIT_R, (57, 42, 35, 29), strict=True)),
    "ViT-B": dict(zip(PAPER_VIT_R, (180, 136, 116, 96), strict=True)),
    "ViT-L": dict(zip(PAPER_VIT_R, (597, 446, 376, 308), strict=True)),
    "ViT-H": dict(zip(PAPER_VIT_R, (1192, 890, 748, 611), strict=True)),
    "VideoSwin-T": dict(zip(PAPER_SWIN_R, (88, 68, 61, 54), strict=True)),
    "VideoSwin-S": dict(zip(PAPER_SWIN_R, (166, 121, 106, 91), strict=True)),
    "VideoSwin-B": dict(zip(PAPER_SWIN_R, (282, 202, 176, 149), strict=True)),
    "VideoSwin-B-SSV2": dict(zip(PAPER_SWIN_R, (321, 241, 215, 188), strict=True)),
}


@dataclass(frozen=True)
class FlopCount:
    """FLOPs (multiply-adds) of one forward pass of one view.

    Attributes:
        backbone: the model's own operations.
        selection: the pruning method's own operations (STA matching/transitions, ToMe matching).
        parts: backbone FLOPs by kind (``embed``, ``qkv``, ``attention``, ``proj``, ``mlp``,
            ``merge``, ``head``), summing to ``backbone``.
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


# --- analytic: ViT ------------------------------------------------------------------------------
def _add(parts: dict[str, float], **flops: float) -> None:
    for key, value in flops.items():
        parts[key] = parts.get(key, 0.0) + value


def _metric_dim(config: STAConfig, channels: int, heads: int) -> int:
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


def vit_flops(spec: ViTSpec, config: STAConfig) -> FlopCount:
    """Analytic FLOPs of a VideoMAE ViT under ``config`` (see the module docstring)."""
    c, t, n = spec.hidden, spec.tubelet_frames, spec.tokens_per_frame
    plan = resolve_plan(config, spec.layers, t, n)
    tokens = plan.tokens_per_block()
    stages = {s.layer: s for s in plan.stages} if config.method != "none" else {}
    mlp = spec.mlp_ratio
    parts: dict[str, float] = {"embed": t * n * c * spec.in_chans * spec.tubelet * spec.patch**2}
    selection = 0.0
    for layer, length in enumerate(tokens):
        stage = stages.get(layer)
        # ToMe merges between attention and MLP: the MLP of its block already runs on fewer tokens.
        mlp_len = length
        if config.method == "tome" and stage is not None:
            mlp_len = stage.units * stage.tokens_out
            if stage.r:
                # Global bipartite matching over the whole sequence: |A|·|B|·c.
                selection += math.ceil(length / 2) * (length // 2) * (c // spec.heads)
        elif stage is not None:
            selection += sta_selection_flops(stage, _metric_dim(config, c, spec.heads), config)
        _add(parts, qkv=3 * length * c * c, attention=2 * length * length * c, proj=length * c * c)
        _add(parts, mlp=2 * mlp * mlp_len * c * c)
    parts["head"] = c * spec.num_classes
    return FlopCount(sum(parts.values()), selection, parts)


# --- analytic: Video Swin -----------------------------------------------------------------------
def _window(spec: SwinSpec, t: int, h: int, w: int) -> tuple[tuple[int, int, int], int]:
    """Effective window (torchvision clips it to the grid) and the padded token count it tiles."""
    win = tuple(min(wd, size) for wd, size in zip(spec.window, (t, h, w), strict=True))
    padded = math.prod(math.ceil(size / wd) * wd for wd, size in zip(win, (t, h, w), strict=True))
    return win, padded


def swin_kept_per_stage(spec: SwinSpec, config: STAConfig) -> list[int]:
    """Tokens that qkv/proj/MLP see in each of the 4 stages (stage 1 is never pruned)."""
    t, grids = spec.temporal, spec.grids()
    full = [t * h * w for h, w in grids]
    if config.method == "none" or config.r == 0:
        return full
    plan = resolve_swin_plan(config, t, grids[1:])
    return [full[0]] + [full[s.layer] - s.units * s.r for s in plan.stages]


def swin_flops(spec: SwinSpec, config: STAConfig) -> FlopCount:
    """Analytic FLOPs of a torchvision Video Swin under ``config`` (see the module docstring)."""
    t, grids = spec.temporal, spec.grids()
    kept = swin_kept_per_stage(spec, config)
    h0, w0 = grids[0]
    parts: dict[str, float] = {"embed": t * h0 * w0 * spec.embed * spec.in_chans * math.prod(spec.patch)}
    linear = 4 + 2 * spec.mlp_ratio  # qkv 3 + proj 1 + MLP 2·ratio, times N·C²
    for i, ((h, w), depth, n_kept) in enumerate(zip(grids, spec.depths, kept, strict=True)):
        c = spec.embed * 2**i
        if i > 0:  # patch merging into this stage: 4·C_prev -> 2·C_prev per output token, dense
            _add(parts, merge=t * h * w * 4 * (c // 2) * c)
        win, padded = _window(spec, t, h, w)
        _add(parts, attention=depth * 2 * padded * math.prod(win) * c)
        _add(parts, qkv=depth * 3 * n_kept * c * c, proj=depth * n_kept * c * c)
        _add(parts, mlp=depth * (linear - 4) * n_kept * c * c)
    parts["head"] = spec.embed * 2 ** (len(spec.depths) - 1) * spec.num_classes
    return FlopCount(sum(parts.values()), swin_selection_flops(spec, config), parts)


def swin_selection_flops(spec: SwinSpec, config: STAConfig) -> float:
    """STA's own multiply-adds in a Video Swin (the :mod:`staprune.patch.swin3d` adapter).

    The metric of a stage is the head-averaged key (or query/value) slice of its first block's qkv,
    computed on every stage-input token: the kept tokens reuse it in that block, so the extra work
    is the slice's projection of the *dropped* tokens (``dropped·C²``), plus the matching and
    transitions on ``c = C / heads`` dims. ``similarity="hidden"`` uses the tokens (``c = C``).
    """
    if config.method != "sta" or config.r == 0:
        return 0.0
    flops = 0.0
    for s in resolve_swin_plan(config, spec.temporal, spec.grids()[1:]).stages:
        channels = spec.embed * 2**s.layer
        flops += sta_selection_flops(s, _metric_dim(config, channels, spec.heads[s.layer]), config)
        if config.similarity != "hidden":
            flops += s.units * s.r * channels * channels
    return flops


# --- public analytic API ------------------------------------------------------------------------
def resolve_spec(model: str | nn.Module | ViTSpec | SwinSpec, frames: int | None = None,
                 size: int | None = None) -> ViTSpec | SwinSpec:
    """A geometry from a registry name, a local HF directory, a built model or a spec."""
    if isinstance(model, ViTSpec | SwinSpec):
        overrides = {k: v for k, v in (("frames", frames), ("size", size)) if v is not None}
        return type(model)(**{**model.__dict__, **overrides})
    if isinstance(model, nn.Module):
        return spec_of_model(model, frames, size)
    if model in MODEL_NAMES:
        return get_spec(model, frames, size)
    from .models import load_model  # a path: read its config (loads the weights too)

    return spec_of_model(load_model(model), frames, size)


def analytic_flops(
    model: str | nn.Module | ViTSpec | SwinSpec,
    r: int = 0,
    *,
    frames: int | None = None,
    size: int | None = None,
    config: STAConfig | None = None,
    **options: object,
) -> FlopCount:
    """FLOPs per view of ``model`` pruned with ``r`` (and any STAConfig ``options``), analytically.

    Args:
        model: registry name (``ViT-B``, ``VideoSwin-T``, ...), local HF directory, built model or spec.
        r: the paper's r (ViT) / r1 (Video Swin).
        frames, size: input clip length and side (defaults: the model's, 16 or 32 frames at 224²).
    Raises:
        ValueError: r too large or otherwise infeasible for the geometry (message gives the largest r).
    """
    spec = resolve_spec(model, frames, size)
    cfg = as_config(config, r, **options)
    if isinstance(spec, ViTSpec):
        return vit_flops(spec, cfg)
    return swin_flops(spec, cfg)


def r_for_budget(
    model_or_name: str | nn.Module | ViTSpec | SwinSpec,
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
        raise ValueError(f"fraction={fraction} must be positive (a share of the dense FLOPs, e.g. 0.6)")
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
    raise ValueError(
        f"a budget of {fraction:.3f} x dense FLOPs is unreachable for this model and config: the lowest "
        f"achievable fraction is {lowest:.3f} (r={r - 1})"
    )


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
    """Build (or take) a model, patch it with ``r`` and ``options`` (dense when ``r == 0`` and the
    method is STA's), and count one forward pass on a random clip of batch 1."""
    import staprune

    from .models import example_input, load_model

    net = load_model(model, frames, size) if isinstance(model, str) else model
    spec = spec_of_model(net, frames, size)
    staprune.unpatch(net)
    if r or options.get("method", "sta") == "tome":
        try:
            staprune.patch(net, r=r, **options)
        except TypeError as err:
            raise NotImplementedError(
                f"measured FLOPs of a pruned {type(net).__name__} need a staprune adapter for it ({err}); "
                "use the analytic count instead (drop --measured)"
            ) from err
    try:
        return measure_flops(net, example_input(spec))
    finally:
        staprune.unpatch(net)


# --- CLI ----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``staprune flops``."""
    parser.add_argument("--model", help=f"registry name ({', '.join(MODEL_NAMES)}) or a local HF directory; "
                        "default: all registry models, the paper's tables")
    parser.add_argument("--r", type=int, nargs="+", help="r (ViT) or r1 (Video Swin); default the paper's")
    parser.add_argument("--method", default="sta", choices=("sta", "random", "tome"))
    parser.add_argument("--tome-mode", default="locations", choices=("locations", "every_block"))
    parser.add_argument("--frames", type=int, help="input frames (default 16 for ViT, 32 for Video Swin)")
    parser.add_argument("--size", type=int, help="input side in pixels (default 224)")
    parser.add_argument("--measured", action="store_true",
                        help="count a forward pass of a random-weight model with FlopCounterMode")
    parser.add_argument("--target", type=float, metavar="FRACTION",
                        help="print the smallest r whose GFLOPs are at most FRACTION x dense")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def _default_rs(name: str) -> tuple[int, ...]:
    from .demo.runner import LEVELS  # the demo models' own pruning levels (they are small)

    if name in LEVELS:
        return (0, *LEVELS[name])
    return PAPER_SWIN_R if name in PAPER_GFLOPS and name.startswith("VideoSwin") else PAPER_VIT_R


def _options(args: argparse.Namespace) -> dict[str, object]:
    return {"method": args.method, **({"tome_mode": args.tome_mode} if args.method == "tome" else {})}


def _row(args: argparse.Namespace, name: str, spec: ViTSpec | SwinSpec, net: nn.Module | None, r: int) -> dict:
    """One JSON row; ``net`` is the built model when counting with FlopCounterMode."""
    dense = analytic_flops(spec, 0).gflops
    if net is not None:
        count = measure_model(net, r, frames=args.frames, size=args.size, **_options(args))
    else:
        count = analytic_flops(spec, r, **_options(args))
    row = {
        "model": name,
        "r": r,
        "method": args.method,
        "gflops": round(count.gflops, 3),
        "selection_gflops": round(count.selection / 1e9, 4),
        "fraction_of_dense": round(count.gflops / dense, 4),
        "counted": "measured" if args.measured else "analytic",
    }
    default_input = args.frames is None and args.size is None and args.method == "sta"
    if default_input and r in PAPER_GFLOPS.get(name, {}):
        row["paper_gflops"] = PAPER_GFLOPS[name][r]
    return row


def _print_tables(rows: list[dict]) -> None:
    """Rows grouped by model family: one line per model, one ``ours (paper)`` cell per r."""
    by_model: dict[str, list[dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row)
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, model_rows in by_model.items():
        groups.setdefault(tuple(r["r"] for r in model_rows), []).append(name)
    for rs, names in groups.items():
        label = "r1" if all(n.startswith("VideoSwin") for n in names) else "r"
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
    names = [args.model] if args.model else list(PAPER_GFLOPS)
    try:
        specs = {name: resolve_spec(name, args.frames, args.size) for name in names}
        if args.target is not None:
            return _run_target(args, specs)
        rows = []
        for name, spec in specs.items():
            net = None
            if args.measured:
                from .models import load_model

                net = load_model(name, args.frames, args.size)
            rows += [_row(args, name, spec, net, r) for r in (args.r or _default_rs(name))]
    except (ValueError, NotImplementedError) as err:
        print(f"staprune flops: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_tables(rows)
    return 0


def _run_target(args: argparse.Namespace, specs: dict[str, ViTSpec | SwinSpec]) -> int:
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

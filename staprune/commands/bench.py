"""Throughput, latency and peak memory: dense vs pruned, measured side by side in one run.

Every configuration runs on the same model object (patched and unpatched between forwards,
outside the timed region), round-robin: one forward of each configuration per round, so
drift in clock speed or background load hits all of them alike. Reported per configuration:
median latency per batch with min/max and quartiles, clips/s at the median, the measured
speedup over dense and, beside it, the analytic FLOPs ratio (dense / pruned).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over one forward. On CPU there is no
allocator statistic; with ``--cpu-memory`` each configuration runs once in a fresh
subprocess that reports the rise of its peak RSS (``VmHWM``) during one forward; otherwise
CPU peak memory is reported as ``None`` ("n/a").
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

import staprune

from ..api.flops import analytic_flops
from ..api.models import example_input, load_model, spec_of_model
from ..core.errors import UsageError
from ..core.flops import wrapping_selection
from ..families import levels_of
from ..runs.arguments import add_pruning_arguments, check_pruning_options, pruning_options, recorded
from ..runs.devices import resolve_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Variant:
    """One configuration to time: dense when ``r == 0`` and ``method == "sta"``."""

    r: int = 0
    method: str = "sta"
    options: tuple[tuple[str, object], ...] = ()  # other STAConfig fields, as (name, value) pairs

    @property
    def dense(self) -> bool:
        return self.r == 0 and self.method != "tome"

    @property
    def label(self) -> str:
        return "dense" if self.dense else f"{self.method} r={self.r}"

    def apply(self, model: nn.Module) -> None:
        staprune.unpatch(model)
        if not self.dense:
            staprune.patch(model, r=self.r, method=self.method, **dict(self.options))


@dataclass
class BenchRow:
    """Measurements of one configuration (times in seconds per batch).

    ``speedup`` compares medians; ``speedup_min`` compares fastest runs, which is the steadier
    estimate on a shared machine (interference only ever adds time).
    """

    model: str
    config: str
    method: str
    r: int
    batch_size: int
    dtype: str
    device: str
    threads: int
    repeats: int
    latency_median_s: float
    latency_min_s: float
    latency_max_s: float
    latency_q1_s: float
    latency_q3_s: float
    throughput_clips_s: float
    speedup: float
    speedup_min: float
    gflops: float
    flops_ratio: float
    selection_median_s: float
    selection_pct: float
    peak_memory_mb: float | None
    options: dict = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_selection(device: torch.device, spent: list[float]) -> Callable[[Callable], Callable]:
    """Wrapper factory that adds the wall time of each selection call to ``spent[0]``."""

    def wrap(fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            _sync(device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(device)
                spent[0] += time.perf_counter() - start

        return timed

    return wrap


def time_variants(
    model: nn.Module,
    inputs: torch.Tensor,
    variants: Sequence[Variant],
    *,
    warmup: int = 1,
    repeats: int = 5,
    time_selection: bool = True,
) -> dict[Variant, dict[str, list[float]]]:
    """Forward ``inputs`` through ``model`` under each variant, round-robin.

    Args:
        inputs: one batch, e.g. ``(B, T, 3, H, W)`` for VideoMAE.
        warmup: untimed rounds first (every variant once per round).
        repeats: timed rounds.
        time_selection: also sum the wall time spent inside the selection functions
            (``sta_keep_indices``, ``tome_merge``, ``random_keep_indices``) of each forward.
    Returns:
        variant -> ``{"latency": [...], "selection": [...]}`` seconds per forward, one per round.
    """
    device = inputs.device
    times = {v: {"latency": [], "selection": []} for v in variants}
    spent = [0.0]
    wrapper = _timed_selection(device, spent) if time_selection else (lambda fn: fn)
    try:
        with torch.inference_mode(), wrapping_selection(wrapper):
            for round_index in range(warmup + repeats):
                for variant in variants:
                    variant.apply(model)
                    _sync(device)
                    spent[0] = 0.0
                    start = time.perf_counter()
                    model(inputs)
                    _sync(device)
                    elapsed = time.perf_counter() - start
                    if round_index >= warmup:
                        times[variant]["latency"].append(elapsed)
                        times[variant]["selection"].append(spent[0])
    finally:
        staprune.unpatch(model)
    return times


def cuda_peak_memory_mb(model: nn.Module, inputs: torch.Tensor, variant: Variant) -> float:
    """Peak allocated CUDA memory (MiB) during one forward, weights included."""
    variant.apply(model)
    try:
        torch.cuda.synchronize(inputs.device)
        torch.cuda.reset_peak_memory_stats(inputs.device)
        with torch.inference_mode():
            model(inputs)
        torch.cuda.synchronize(inputs.device)
        return torch.cuda.max_memory_allocated(inputs.device) / 2**20
    finally:
        staprune.unpatch(model)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_probe(spec_json: str) -> None:
    """Subprocess entry: build the model, run one forward, print the peak RSS rise in MiB."""
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    model = load_model(spec["model"], spec["frames"], spec["size"]).to(DTYPES[spec["dtype"]])
    inputs = example_input(spec_of_model(model, spec["frames"], spec["size"]), spec["batch_size"],
                           dtype=DTYPES[spec["dtype"]])
    Variant(spec["r"], spec["method"], tuple(spec.get("options", {}).items())).apply(model)
    gc.collect()
    try:  # reset VmHWM to the current RSS (Linux >= 4.0) so building the model does not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    baseline = max(_status_kb("VmRSS"), _status_kb("VmHWM"))
    with torch.inference_mode():
        model(inputs)
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - baseline) / 1024}))


def cpu_peak_memory_mb(model: str, variant: Variant, *, frames: int | None, size: int | None,
                       batch_size: int, dtype: str, threads: int) -> float | None:
    """Rise of peak RSS (MiB) during one forward in a fresh process (``None`` if it fails)."""
    spec = {"model": model, "frames": frames, "size": size, "batch_size": batch_size, "dtype": dtype,
            "threads": threads, "r": variant.r, "method": variant.method, "options": recorded(dict(variant.options))}
    code = f"from staprune.commands.bench import _memory_probe; _memory_probe({json.dumps(json.dumps(spec))})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    try:
        return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"])
    except (IndexError, ValueError, KeyError):
        return None


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def summarize(
    name: str,
    model: nn.Module,
    times: dict[Variant, dict[str, list[float]]],
    *,
    batch_size: int,
    dtype: str,
    device: str,
    frames: int | None = None,
    size: int | None = None,
    memory: dict[Variant, float | None] | None = None,
) -> list[BenchRow]:
    """One :class:`BenchRow` per variant; speedup and FLOPs ratio relative to the first dense one."""
    spec = spec_of_model(model, frames, size)
    reference = next((v for v in times if v.dense), next(iter(times)))
    ref_latency = statistics.median(times[reference]["latency"])
    ref_min = min(times[reference]["latency"])
    ref_gflops = analytic_flops(spec, reference.r, method=reference.method, **dict(reference.options)).gflops
    rows = []
    for variant, t in times.items():
        latency = statistics.median(t["latency"])
        q1, q3 = _quartiles(t["latency"])
        gflops = analytic_flops(spec, variant.r, method=variant.method, **dict(variant.options)).gflops
        selection = statistics.median(t["selection"])
        rows.append(BenchRow(
            model=name, config=variant.label, method=variant.method, r=variant.r, batch_size=batch_size,
            dtype=dtype, device=device, threads=torch.get_num_threads(), repeats=len(t["latency"]),
            latency_median_s=latency, latency_min_s=min(t["latency"]), latency_max_s=max(t["latency"]),
            latency_q1_s=q1, latency_q3_s=q3, throughput_clips_s=batch_size / latency,
            speedup=ref_latency / latency, speedup_min=ref_min / min(t["latency"]), gflops=gflops, flops_ratio=ref_gflops / gflops,
            selection_median_s=selection, selection_pct=100 * selection / latency,
            peak_memory_mb=(memory or {}).get(variant), options=recorded(dict(variant.options)),
        ))
    return rows


def format_table(rows: Sequence[BenchRow]) -> str:
    """Fixed-width table of the fields a reader compares."""
    width = max([len("model"), *(len(r.model) for r in rows)]) + 2
    header = (f"{'model':<{width}}{'config':<16}{'batch':>5}{'median s':>10}{'min-max s':>16}{'clips/s':>9}"
              f"{'speedup':>9}{'FLOPs ratio':>12}{'GFLOPs':>9}{'select %':>9}{'peak MiB':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        memory = "n/a" if r.peak_memory_mb is None else f"{r.peak_memory_mb:.0f}"
        lines.append(
            f"{r.model:<{width}}{r.config:<16}{r.batch_size:>5}{r.latency_median_s:>10.3f}"
            f"{f'{r.latency_min_s:.3f}-{r.latency_max_s:.3f}':>16}{r.throughput_clips_s:>9.2f}"
            f"{r.speedup:>9.2f}{r.flops_ratio:>12.2f}{r.gflops:>9.1f}{r.selection_pct:>9.2f}{memory:>10}"
        )
    return "\n".join(lines)


# --- CLI ----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``staprune bench``."""
    parser.add_argument("--model", default="ViT-S", help="registry name (e.g. ViT-S, ViT-B) or local HF directory")
    parser.add_argument("--r", type=int, nargs="+", help="pruned configurations to time against dense (default: "
                        "the model's three levels)")
    parser.add_argument("--method", default="sta", choices=("sta", "random", "tome"))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (every config once per round)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--frames", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--cpu-memory", action="store_true",
                        help="on CPU, measure peak RSS rise per config in a fresh subprocess (slower)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of every field instead of a table")
    add_pruning_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """``staprune bench``: dense vs each ``--r`` of ``--method``, round-robin in one run."""
    check_pruning_options(args)
    for name in ("batch_size", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    model = load_model(args.model, args.frames, args.size).to(device=device, dtype=dtype)
    spec = spec_of_model(model, args.frames, args.size)
    options = tuple(pruning_options(args).items())
    rs = args.r or levels_of(args.model, spec)
    variants = [Variant()] + [Variant(r, args.method, options) for r in rs if r or args.method == "tome"]
    for variant in variants:  # validate every config before timing anything
        variant.apply(model)
    staprune.unpatch(model)
    inputs = example_input(spec, args.batch_size, dtype=dtype, device=device)
    times = time_variants(model, inputs, variants, warmup=args.warmup, repeats=args.repeats)
    memory: dict[Variant, float | None] = {}
    for variant in variants:
        if device.type == "cuda":
            memory[variant] = cuda_peak_memory_mb(model, inputs, variant)
        elif args.cpu_memory:
            memory[variant] = cpu_peak_memory_mb(args.model, variant, frames=args.frames, size=args.size,
                                                 batch_size=args.batch_size, dtype=args.dtype,
                                                 threads=torch.get_num_threads())
    rows = summarize(args.model, model, times, batch_size=args.batch_size, dtype=args.dtype,
                     device=str(device), frames=args.frames, size=args.size, memory=memory)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(format_table(rows))
        print("speedup = dense median latency / config median latency; FLOPs ratio = dense / config "
              "GFLOPs (analytic). Peak memory: " + (
                  "CUDA max allocated." if device.type == "cuda" else
                  "peak RSS rise during one forward in a fresh process." if args.cpu_memory else
                  "n/a on CPU (use --cpu-memory)."))
    return 0

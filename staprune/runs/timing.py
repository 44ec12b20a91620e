"""Timing configurations of one model side by side: latency, throughput and peak memory.

Every configuration runs on the same model object (patched and unpatched between forwards, outside
the timed region), round-robin: one forward of each configuration per round, so drift in clock
speed or background load hits all of them alike. A configuration is a :class:`~staprune.api.settings.Setting`
(dense included), or :data:`STOCK`, the unpatched model, which ``staprune bench`` times beside dense
for families whose patch changes kernels (Video Swin's fused window attention). Reported per
configuration: median latency per batch with min/max and quartiles, clips/s at the median, the
measured speed-up over dense and, beside it, the analytic FLOPs ratio (dense / pruned).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over one forward. On CPU there is no
allocator statistic: :func:`cpu_peak_memory_mb` runs one forward in a fresh subprocess that reports
the rise of its peak RSS (``VmHWM``).
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..api.flops import analytic_flops
from ..api.loading import load
from ..api.models import example_input, spec_of_model
from ..api.patching import unpatch
from ..api.settings import Setting
from ..core.selection_hook import wrapping_selection
from .devices import DTYPES

STOCK = None  # the unpatched model, as a configuration to time


def label(variant: Setting | None) -> str:
    """``stock``, ``dense`` or ``<method> r=<r>``."""
    return "stock" if variant is None else variant.label


def apply(model: nn.Module, variant: Setting | None) -> None:
    """Run ``model`` as ``variant`` from its next forward (:data:`STOCK`: unpatched)."""
    if variant is None:
        unpatch(model)
    else:
        variant.apply(model)


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


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_selection(device: torch.device, spent: list[float]) -> Callable[[Callable], Callable]:
    """Wrapper factory that adds the wall time of each selection call to ``spent[0]`` (a selection call
    nested in another, e.g. STA's core inside a video's selection, is counted once)."""
    depth = [0]

    def wrap(fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            if depth[0]:
                return fn(*args, **kwargs)
            sync_device(device)
            start = time.perf_counter()
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                sync_device(device)
                spent[0] += time.perf_counter() - start

        return timed

    return wrap


def time_variants(
    model: nn.Module,
    inputs: torch.Tensor,
    variants: Sequence[Setting | None],
    *,
    warmup: int = 1,
    repeats: int = 5,
    time_selection: bool = True,
) -> dict[Setting | None, dict[str, list[float]]]:
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
    wrapper = timed_selection(device, spent) if time_selection else (lambda fn: fn)
    try:
        with torch.inference_mode(), wrapping_selection(wrapper):
            for round_index in range(warmup + repeats):
                for variant in variants:
                    apply(model, variant)
                    sync_device(device)
                    spent[0] = 0.0
                    start = time.perf_counter()
                    model(inputs)
                    sync_device(device)
                    elapsed = time.perf_counter() - start
                    if round_index >= warmup:
                        times[variant]["latency"].append(elapsed)
                        times[variant]["selection"].append(spent[0])
    finally:
        unpatch(model)
    return times


def cuda_peak_memory_mb(model: nn.Module, inputs: torch.Tensor, variant: Setting | None) -> float:
    """Peak allocated CUDA memory (MiB) during one forward, weights included."""
    apply(model, variant)
    try:
        torch.cuda.synchronize(inputs.device)
        torch.cuda.reset_peak_memory_stats(inputs.device)
        with torch.inference_mode():
            model(inputs)
        torch.cuda.synchronize(inputs.device)
        return torch.cuda.max_memory_allocated(inputs.device) / 2**20
    finally:
        unpatch(model)


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
    model = load(spec["model"], frames=spec["frames"], image_size=spec["size"]).model.to(DTYPES[spec["dtype"]])
    inputs = example_input(spec_of_model(model, spec["frames"], spec["size"]), spec["batch_size"],
                           dtype=DTYPES[spec["dtype"]])
    apply(model, None if spec["stock"] else Setting.of(spec["method"], spec["r"], spec["options"]))
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


def cpu_peak_memory_mb(model: str, variant: Setting | None, *, frames: int | None, size: int | None,
                       batch_size: int, dtype: str, threads: int) -> float | None:
    """Rise of peak RSS (MiB) during one forward in a fresh process (``None`` if it fails)."""
    setting = variant or Setting()
    spec = {"model": model, "frames": frames, "size": size, "batch_size": batch_size, "dtype": dtype,
            "threads": threads, "stock": variant is None, "r": setting.r, "method": setting.method,
            "options": setting.recorded_options}
    code = f"from staprune.runs.timing import _memory_probe; _memory_probe({json.dumps(json.dumps(spec))})"
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
    times: dict[Setting | None, dict[str, list[float]]],
    *,
    batch_size: int,
    dtype: str,
    device: str,
    frames: int | None = None,
    size: int | None = None,
    memory: dict[Setting | None, float | None] | None = None,
) -> list[BenchRow]:
    """One :class:`BenchRow` per configuration; speed-up and FLOPs ratio relative to the first dense
    one (the stock model counts the dense FLOPs)."""
    spec = spec_of_model(model, frames, size)
    reference = next((v for v in times if v is not None and v.is_dense), next(iter(times)))
    ref_latency = statistics.median(times[reference]["latency"])
    ref_min = min(times[reference]["latency"])

    def gflops_of(variant: Setting | None) -> float:
        return analytic_flops(spec, config=(variant or Setting()).config()).gflops

    ref_gflops = gflops_of(reference)
    rows = []
    for variant, t in times.items():
        latency = statistics.median(t["latency"])
        q1, q3 = _quartiles(t["latency"])
        gflops = gflops_of(variant)
        selection = statistics.median(t["selection"])
        setting = variant or Setting()
        rows.append(BenchRow(
            model=name, config=label(variant), method=setting.method, r=setting.r, batch_size=batch_size,
            dtype=dtype, device=device, threads=torch.get_num_threads(), repeats=len(t["latency"]),
            latency_median_s=latency, latency_min_s=min(t["latency"]), latency_max_s=max(t["latency"]),
            latency_q1_s=q1, latency_q3_s=q3, throughput_clips_s=batch_size / latency,
            speedup=ref_latency / latency, speedup_min=ref_min / min(t["latency"]), gflops=gflops, flops_ratio=ref_gflops / gflops,
            selection_median_s=selection, selection_pct=100 * selection / latency,
            peak_memory_mb=(memory or {}).get(variant), options=setting.recorded_options,
        ))
    return rows


NOISY_SPREAD = 0.5  # (slowest - fastest round) / median above which a configuration's rounds disagree


def noisy(rows: Sequence[BenchRow], limit: float = NOISY_SPREAD) -> list[BenchRow]:
    """Configurations whose timed rounds spread by more than ``limit`` of their median: the machine
    was busy (other processes, frequency changes), and speed-ups from those rounds mean little."""
    return [r for r in rows if r.repeats > 1 and (r.latency_max_s - r.latency_min_s) > limit * r.latency_median_s]


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


__all__ = ["NOISY_SPREAD", "STOCK", "BenchRow", "apply", "noisy", "cpu_peak_memory_mb", "cuda_peak_memory_mb", "format_table", "label",
           "summarize", "time_variants"]

"""Video Swin-T latency: stock torchvision vs staprune (fused attention, STA pruning).

One process, one input, every config timed in alternating rounds (stock, r1=0, r1=192, ...)
after a warm-up, reporting the median (speedups are ratios of medians), so slow drifts of a
shared machine hit all configs alike; the minimum is printed too, as the least disturbed sample.
FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (``staprune.flops.flop_counter``:
with the CPU fused SDPA kernel counted) with the paper's convention: one multiply-add = one FLOP.

    python benchmarks/bench_swin.py                      # 32x224², r1 in {0, 192, 256, 320}
    python benchmarks/bench_swin.py --frames 8 --size 112 --repeats 2 --r1 0 64
    python benchmarks/bench_swin.py --smoke              # CI: 8x64², seconds; not a result

The model is the registry's ``VideoSwin-T`` (torchvision ``swin3d_t``'s architecture) with random
weights drawn after ``torch.manual_seed(--seed)``, loaded through :func:`staprune.load`.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable

import torch

import staprune
from staprune.api.settings import Setting
from staprune.core.flops import flop_counter

# --smoke: the same code path at a tiny setting (CI runs it so the script cannot rot); explicit
# options still override these. r1 16 / 26: the lowest and highest of VideoSwin-T's levels at 8x64².
SMOKE = {"frames": 8, "size": 64, "repeats": 3, "threads": 1, "r1": [0, 16, 26]}
SMOKE_NOTE = "SMOKE RUN (--smoke): a tiny setting that checks the script runs; its numbers are not a result"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=32, help="input frames (default 32)")
    parser.add_argument("--size", type=int, default=224, help="input height = width (default 224)")
    parser.add_argument("--batch", type=int, default=1, help="clips per forward (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed rounds (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--r1", type=int, nargs="+", default=[0, 192, 256, 320], help="r1 values (include 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="CI check: 8x64², r1 0 16 26, 3 rounds, 1 thread (seconds); not a result")
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    return args


def build_configs(r1_values: list[int], seed: int, frames: int, size: int) -> dict[str, torch.nn.Module]:
    """``{name: model}``: stock swin3d_t and one patched copy per r1 (r1=0: staprune's dense model,
    fused attention dropping nothing), all with the same weights."""
    torch.manual_seed(seed)
    stock = staprune.load("VideoSwin-T", frames=frames, image_size=size).model
    models = {"stock torchvision": stock}
    for r1 in r1_values:
        models[f"staprune r1={r1}"] = Setting.of("sta", r1).apply(copy.deepcopy(stock))
    return models


def gflops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Multiply-adds of one forward, in billions (FlopCounterMode counts 2 per multiply-add)."""
    with flop_counter(display=False) as counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops() / 2e9


def time_alternating(models: dict[str, Callable], x: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Seconds per forward: one warm-up each, then ``repeats`` rounds over all configs in turn."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(x)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    return times


def report(times: dict[str, list[float]], flops: dict[str, float], base: str) -> str:
    """The results table (markdown)."""
    stock = statistics.median(times["stock torchvision"])
    ours0 = statistics.median(times[base]) if base in times else float("nan")
    lines = [
        "| config | median s | min-max s | GFLOPs | speedup vs stock | speedup vs our r1=0 | FLOPs ratio "
        "| speedup / FLOPs ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, samples in times.items():
        med = statistics.median(samples)
        ratio = flops[base] / flops[name] if base in flops else float("nan")
        vs0 = ours0 / med
        lines.append(
            f"| {name} | {med:.3f} | {min(samples):.3f}-{max(samples):.3f} | {flops[name]:.1f} | {stock / med:.2f}x | {vs0:.2f}x | {ratio:.2f} | "
            f"{vs0 / ratio:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.frames, args.size, args.size, generator=torch.Generator().manual_seed(1))
    models = build_configs(args.r1, args.seed, args.frames, args.size)
    if args.smoke:
        print(SMOKE_NOTE)
    print(
        f"swin3d_t, input {args.batch}x3x{args.frames}x{args.size}x{args.size}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.repeats} rounds; load average before: {os.getloadavg()[0]:.2f}"
    )
    flops = {name: gflops(model, x) for name, model in models.items()}
    times = time_alternating(models, x, args.repeats)
    print(report(times, flops, base=f"staprune r1={min(args.r1)}"))
    print("per-round seconds:", {name: [round(t, 3) for t in ts] for name, ts in times.items()})
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

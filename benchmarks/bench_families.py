"""Dense vs STA on the families beyond the paper's, random weights, side by side in one run.

Part 1: ViViT-B (32x224², 3137 tokens), V-JEPA 2 ViT-L (16x256², 2048 tokens) and TimeSformer-B
(8x224², divided attention, pruned the Swin way) at each model's three levels: median latency of
dense and every r alternating (one forward of each per round), the measured speedup next to the
analytic FLOPs ratio (dense / pruned GFLOPs per view). Target: speedup >= 0.9 x FLOPs ratio.

Part 2: how the saving grows with clip length: one ViT-S-sized model (VideoMAE ViT-S at 224²) at
16, 32 and 64 frames with the same r per temporal unit: more frames, more tokens, and the
quadratic attention that pruning shrinks takes a larger share of the FLOPs.

    python benchmarks/bench_families.py --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict

import torch

from staprune.api.flops import analytic_flops
from staprune.api.models import build_model, example_input, get_spec
from staprune.commands.bench import BenchRow, Variant, summarize, time_variants
from staprune.families import find_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ViViT-B", "VJEPA2-L-fpc16", "TimeSformer-B"])
    parser.add_argument("--scaling-model", default="ViT-S", help="the model of part 2")
    parser.add_argument("--scaling-frames", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--scaling-r", type=int, default=64, help="r per temporal unit in part 2")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--json", action="store_true", help="also print every row as JSON")
    return parser.parse_args(argv)


def bench(name: str, rs: list[int], args: argparse.Namespace, frames: int | None = None) -> list[BenchRow]:
    """Dense and STA at each r of ``rs`` on a random-weight ``name``, alternating, batch 1."""
    torch.manual_seed(0)
    spec = get_spec(name, frames)
    model = build_model(name, frames)
    variants = [Variant()] + [Variant(r, "sta") for r in rs]
    start = time.perf_counter()
    times = time_variants(model, example_input(spec, 1), variants, warmup=args.warmup, repeats=args.repeats)
    label = name if frames is None else f"{name} {frames}f"
    print(f"# {label}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return summarize(label, model, times, batch_size=1, dtype="fp32", device="cpu", frames=frames)


def print_rows(rows: list[BenchRow]) -> None:
    header = (f"{'model':<18}{'config':>10}{'GFLOPs':>9}{'median s':>10}{'min-max s':>14}{'speedup':>9}"
              f"{'FLOPs ratio':>12}{'speedup/ratio':>14}{'min-based':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = r.speedup / r.flops_ratio
        mark = "" if r.r == 0 else ("  ok" if ratio >= 0.9 else "  below 0.9")
        print(f"{r.model:<18}{r.config.replace('sta ', ''):>10}{r.gflops:>9.1f}{r.latency_median_s:>10.3f}"
              f"{f'{r.latency_min_s:.2f}-{r.latency_max_s:.2f}':>14}{r.speedup:>9.2f}{r.flops_ratio:>12.2f}"
              f"{ratio:>14.2f}{r.speedup_min / r.flops_ratio:>10.2f}{mark}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads, fp32, batch 1, inference mode; {args.warmup} warm-up + {args.repeats} timed rounds, dense "
          "and every r alternating")
    rows: list[BenchRow] = []
    for name in args.models:
        rows += bench(name, list(find_model(name).levels), args)
    print("\n## Part 1: each model at its three levels")
    print_rows(rows)
    scaling: list[BenchRow] = []
    if not args.skip_scaling:
        for frames in args.scaling_frames:
            scaling += bench(args.scaling_model, [args.scaling_r], args, frames)
        print(f"\n## Part 2: {args.scaling_model} at {', '.join(map(str, args.scaling_frames))} frames, "
              f"r={args.scaling_r} per unit")
        print_rows(scaling)
        for frames in args.scaling_frames:
            dense = analytic_flops(args.scaling_model, 0, frames=frames)
            share = dense.parts["attention"] / dense.backbone
            print(f"  {frames} frames: {frames // 2 * 196} tokens, attention {100 * share:.0f}% of dense FLOPs")
    print("speedup = dense median / STA median (same run); FLOPs ratio = analytic dense / STA GFLOPs per view; "
          "min-based = (dense min / STA min) / FLOPs ratio, robust to load from other processes. Target: "
          "speedup/ratio >= 0.9.")
    if args.json:
        print(json.dumps([asdict(r) for r in rows + scaling], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

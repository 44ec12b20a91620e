"""Dense vs STA on random-weight VideoMAE ViT-S / ViT-B (16x224², inference mode), side by side.

For every model and batch size, dense and STA at each r run round-robin in one process (one
forward of each per round, after warm-up rounds); the table shows median latencies, the
measured speedup next to the analytic FLOPs ratio, and the share of the pruned forward spent
inside STA's selection (``sta_keep_indices``, timed by wrapping it during the timed forwards).

Targets (issue #2): speedup >= 0.9 x FLOPs ratio at r=64; selection <= 2% of the forward.

    python benchmarks/bench_vit.py --models ViT-S ViT-B --batch-sizes 1 4 --repeats 3 --threads 2
    python benchmarks/bench_vit.py --smoke   # CI: the same code, ViT-S at 8x112², seconds; not a result
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict

import torch

import staprune
from staprune.api.models import example_input, spec_of_model
from staprune.api.settings import Setting
from staprune.runs.timing import BenchRow, summarize, time_variants

# --smoke: the same code path at a tiny setting (CI runs it so the script cannot rot); explicit
# options still override these. r 8 / 16 are the paper's 32 / 64 scaled to 49 tokens per frame.
SMOKE = {"models": ["ViT-S"], "batch_sizes": [1], "r": [8, 16], "repeats": 3, "warmup": 1, "frames": 8,
         "size": 112, "threads": 1}
SMOKE_NOTE = "SMOKE RUN (--smoke): a tiny setting that checks the script runs; its numbers are not a result"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ViT-S", "ViT-B"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--r", type=int, nargs="+", default=[32, 48, 64])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per model and batch size")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--json", action="store_true", help="also print every row as JSON")
    parser.add_argument("--smoke", action="store_true",
                        help="CI check: ViT-S at 8x112², batch 1, r 8 16, 3 rounds, 1 thread (seconds); not a result")
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    return args


def bench_model(name: str, batch_sizes: list[int], rs: list[int], args: argparse.Namespace) -> list[BenchRow]:
    torch.manual_seed(0)  # random weights: what is timed does not depend on them
    model = staprune.load(name, frames=args.frames, image_size=args.size).model
    spec = spec_of_model(model, args.frames, args.size)
    variants = [Setting()] + [Setting.of("sta", r) for r in rs]
    rows: list[BenchRow] = []
    for batch_size in batch_sizes:
        inputs = example_input(spec, batch_size)
        start = time.perf_counter()
        times = time_variants(model, inputs, variants, warmup=args.warmup, repeats=args.repeats)
        print(f"# {name} batch {batch_size}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        rows += summarize(name, model, times, batch_size=batch_size, dtype="fp32", device="cpu",
                          frames=args.frames, size=args.size)
    return rows


def print_table(rows: list[BenchRow], target_r: int) -> None:
    header = (f"{'model':<7}{'batch':>6}{'config':>10}{'median s':>10}{'min-max s':>15}{'speedup':>9}"
              f"{'FLOPs ratio':>12}{'speedup/ratio':>14}{'min-based':>10}{'selection %':>12}")
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = r.speedup / r.flops_ratio
        mark = ""
        if r.r == target_r:
            mark = "  " + ("ok" if ratio >= 0.9 else "MISS speed") + (
                "" if r.selection_pct <= 2.0 else " MISS selection")
        print(f"{r.model:<7}{r.batch_size:>6}{r.config.replace('sta ', ''):>10}{r.latency_median_s:>10.3f}"
              f"{f'{r.latency_min_s:.2f}-{r.latency_max_s:.2f}':>15}{r.speedup:>9.2f}{r.flops_ratio:>12.2f}"
              f"{ratio:>14.2f}{r.speedup_min / r.flops_ratio:>10.2f}{r.selection_pct:>12.2f}{mark}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        print(SMOKE_NOTE)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {args.frames}x{args.size}², fp32, inference mode; "
          f"{args.warmup} warm-up + {args.repeats} timed rounds, dense and every r alternating")
    rows: list[BenchRow] = []
    for name in args.models:
        rows += bench_model(name, args.batch_sizes, args.r, args)
    print_table(rows, target_r=max(args.r))
    print("speedup = dense median / STA median (same run); FLOPs ratio = analytic dense / STA GFLOPs; "
          "min-based = (dense min / STA min) / FLOPs ratio, robust to load from other processes; "
          "selection % = median time inside sta_keep_indices / median pruned forward. "
          f"Targets at r={max(args.r)}: speedup/ratio >= 0.9, selection <= 2%.")
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

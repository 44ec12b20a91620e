"""Dense vs STA on the families beyond the paper's, random weights, side by side in one run.

Part 1: ViViT-B (32x224², 3137 tokens), V-JEPA 2 ViT-L (16x256², 2048 tokens) and TimeSformer-B
(8x224², divided attention, pruned the Swin way) at each model's three levels: median latency of
dense and every r alternating (one forward of each per round), the measured speedup next to the
analytic FLOPs ratio (dense / pruned GFLOPs per view). Target: speedup >= 0.9 x FLOPs ratio.

Part 2: how the saving grows with clip length: one ViT-S-sized model (VideoMAE ViT-S at 224²) at
16, 32 and 64 frames with the same r per temporal unit: more frames, more tokens, and the
quadratic attention that pruning shrinks takes a larger share of the FLOPs.

    python benchmarks/bench_families.py --threads 2 --repeats 3
    python benchmarks/bench_families.py --smoke   # CI: the same code on tiny configs, seconds; not a result

``--smoke`` keeps each family's layers and pruning but shrinks every model to 2 blocks of width 64
(``--tiny``; the random init of V-JEPA 2 ViT-L alone takes half a minute here), part 1 at 8x112²,
part 2 at 8 / 16 frames of 112².
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, replace
from dataclasses import fields as dataclass_fields

import torch

import staprune
from staprune.api.flops import analytic_flops
from staprune.api.models import example_input, get_spec, spec_of_model
from staprune.api.settings import Setting
from staprune.families import family_of_spec
from staprune.runs.timing import BenchRow, summarize, time_variants

# --smoke: the same code path at a tiny setting (CI runs it so the script cannot rot); explicit
# options still override these.
SMOKE = {"tiny": True, "frames": 8, "size": 112, "scaling_frames": [8, 16], "scaling_size": 112, "scaling_r": 16,
         "repeats": 3, "warmup": 1, "threads": 1}
SMOKE_NOTE = "SMOKE RUN (--smoke): tiny configs that check the script runs; its numbers are not a result"
# What --tiny changes in a spec (the fields a family's spec has): 2 blocks of width 64.
TINY = {"hidden": 64, "layers": 2, "heads": 2, "mlp_hidden": 128, "pooler_layers": 1}


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
    parser.add_argument("--frames", type=int, help="part 1 input frames (default: each model's)")
    parser.add_argument("--size", type=int, help="part 1 input side (default: each model's)")
    parser.add_argument("--scaling-size", type=int, default=224, help="input side of part 2")
    parser.add_argument("--tiny", action="store_true",
                        help="2-block, width-64 versions of the models (checks, not results)")
    parser.add_argument("--json", action="store_true", help="also print every row as JSON")
    parser.add_argument("--smoke", action="store_true",
                        help="CI check: tiny configs at 8x112², part 2 at 8/16 frames, 3 rounds, 1 thread "
                        "(seconds); not a result")
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    return args


def spec_for(name: str, frames: int | None, size: int | None, tiny: bool):
    """The geometry of registry model ``name`` on ``frames`` x ``size``² (None: its own), or of its
    tiny version (``--tiny``)."""
    spec = get_spec(name, frames, size)
    if not tiny:
        return spec
    return replace(spec, **{k: v for k, v in TINY.items() if k in {f.name for f in dataclass_fields(spec)}})


def build(name: str, frames: int | None, size: int | None, tiny: bool) -> torch.nn.Module:
    """Registry model ``name`` with random weights (seeded), or its tiny version (``--tiny``)."""
    torch.manual_seed(0)  # random weights: what is timed does not depend on them
    if not tiny:
        return staprune.load(name, frames=frames, image_size=size).model
    spec = spec_for(name, frames, size, tiny)
    return family_of_spec(spec).build(spec)


def bench(name: str, rs: list[int] | None, args: argparse.Namespace, frames: int | None = None,
          size: int | None = None, tiny: bool = False) -> list[BenchRow]:
    """Dense and STA at each r of ``rs`` (None: the model's three levels for this input) on a
    random-weight ``name``, alternating, batch 1."""
    model = build(name, frames, size, tiny)
    spec = spec_of_model(model, frames, size)
    rs = list(family_of_spec(spec).levels(spec)) if rs is None else rs
    variants = [Setting()] + [Setting.of("sta", r) for r in rs]
    start = time.perf_counter()
    times = time_variants(model, example_input(spec, 1), variants, warmup=args.warmup, repeats=args.repeats)
    label = name + ("" if frames is None else f" {frames}f") + (" tiny" if tiny else "")
    print(f"# {label}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return summarize(label, model, times, batch_size=1, dtype="fp32", device="cpu", frames=frames, size=size)


def print_rows(rows: list[BenchRow]) -> None:
    width = max(18, *(len(r.model) + 1 for r in rows))
    header = (f"{'model':<{width}}{'config':>10}{'GFLOPs':>9}{'median s':>10}{'min-max s':>14}{'speedup':>9}"
              f"{'FLOPs ratio':>12}{'speedup/ratio':>14}{'min-based':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = r.speedup / r.flops_ratio
        mark = "" if r.r == 0 else ("  ok" if ratio >= 0.9 else "  below 0.9")
        gflops = f"{r.gflops:.1f}" if r.gflops >= 1 else f"{r.gflops:.3f}"  # tiny configs: below 1
        print(f"{r.model:<{width}}{r.config.replace('sta ', ''):>10}{gflops:>9}{r.latency_median_s:>10.3f}"
              f"{f'{r.latency_min_s:.2f}-{r.latency_max_s:.2f}':>14}{r.speedup:>9.2f}{r.flops_ratio:>12.2f}"
              f"{ratio:>14.2f}{r.speedup_min / r.flops_ratio:>10.2f}{mark}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        print(SMOKE_NOTE)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads, fp32, batch 1, inference mode; {args.warmup} warm-up + {args.repeats} timed rounds, dense "
          "and every r alternating")
    rows: list[BenchRow] = []
    for name in args.models:
        rows += bench(name, None, args, args.frames, args.size, tiny=args.tiny)
    print("\n## Part 1: each model at its three levels")
    print_rows(rows)
    scaling: list[BenchRow] = []
    if not args.skip_scaling:
        for frames in args.scaling_frames:
            scaling += bench(args.scaling_model, [args.scaling_r], args, frames, args.scaling_size, args.tiny)
        print(f"\n## Part 2: {args.scaling_model} at {', '.join(map(str, args.scaling_frames))} frames, "
              f"{args.scaling_size}², r={args.scaling_r} per unit")
        print_rows(scaling)
        for frames in args.scaling_frames:
            spec = spec_for(args.scaling_model, frames, args.scaling_size, args.tiny)
            dense = analytic_flops(spec, 0)
            share = dense.parts["attention"] / dense.backbone
            tokens = family_of_spec(spec).geometry(spec).grids[0].tokens
            print(f"  {frames} frames: {tokens} tokens, attention {100 * share:.0f}% of dense FLOPs")
    print("speedup = dense median / STA median (same run); FLOPs ratio = analytic dense / STA GFLOPs per view; "
          "min-based = (dense min / STA min) / FLOPs ratio, robust to load from other processes. Target: "
          "speedup/ratio >= 0.9.")
    if args.json:
        print(json.dumps([asdict(r) for r in rows + scaling], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

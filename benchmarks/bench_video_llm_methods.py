"""Every video-token method at the same budgets, side by side in one run: the selection's share of
the pruned prefill (target under 2% for every method), the language model's prefill speed-up beside
its FLOPs ratio, and the KV-cache bytes (random weights, published configs).

Models: a Qwen2.5-VL (its published vision tower) with a 0.5B-class language model (Qwen2.5-0.5B's
shape) and LLaVA-OneVision-0.5B; ``--smoke``: each family's tiny test model. Per model: the stock
model, then every registered method at each keep ratio, rounds alternating over all of them
(staprune.runs.video_llm_timing). A method's published defaults throughout (the tiny models'
two-layer language model: FastV after its first layer).

    python benchmarks/bench_video_llm_methods.py --frames 16 --repeats 3 --threads 2
    python benchmarks/bench_video_llm_methods.py --device cuda --dtype bf16 --frames 32   # a GPU user
    python benchmarks/bench_video_llm_methods.py --smoke   # CI: tiny configs, seconds; not a result
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import asdict

import torch
import transformers
from bench_video_llm import model_and_inputs, qwen25_vl_05b

from staprune.core.config import STAConfig
from staprune.core.video_methods import video_method_names
from staprune.families import model_entry
from staprune.runs.video_llm_timing import format_video_llm_table, summarize_video_llm, time_video_llm

SMOKE_NOTE = "SMOKE RUN (--smoke): tiny configs that check the script runs; its numbers are not a result"
SELECTION_TARGET_PCT = 2.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

MODELS = {
    "Qwen2.5-VL (0.5B LM)": ("qwen2_5_vl", qwen25_vl_05b),
    "LLaVA-OneVision-0.5B": ("llava_onevision", lambda: model_entry("LLaVA-OneVision-0.5B").spec),
}
TINY_OPTIONS = {"fastv": {"fastv_layer": 1}}  # the tiny language models have two decoder layers


def settings_for(methods: list[str], keeps: list[float], tiny: bool) -> list[STAConfig | None]:
    """The stock model, then each method at each keep ratio (its published options)."""
    settings: list[STAConfig | None] = [None]
    for method in methods:
        options = TINY_OPTIONS.get(method, {}) if tiny else {}
        settings += [STAConfig(keep_ratio=k, method=method).with_options(**options) for k in keeps]
    return settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=16, help="input frames per video")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.25, 0.15, 0.10], help="keep ratios")
    parser.add_argument("--methods", nargs="+", choices=video_method_names(), default=video_method_names(),
                        help="methods to time (default: every registered one)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="weights and activations")
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS), help="models to time")
    parser.add_argument("--json", help="also write every row to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="CI check: tiny configs, 4 frames, 1 round (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.frames, args.repeats, args.keep = 4, 1, [0.25]
        print(SMOKE_NOTE)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"{args.device} {args.dtype}, batch 1, {args.frames} frames, {args.repeats} rounds (medians), random weights")
    rows = []
    for name in args.models:
        family, spec, model, inputs = model_and_inputs(MODELS[name], args.frames, args.smoke, args.device, dtype)
        settings = settings_for(args.methods, args.keep, args.smoke)
        results = time_video_llm(model, inputs, settings, warmup=1, repeats=args.repeats)
        rows += summarize_video_llm(name, family, spec, settings, results, device=args.device, dtype=args.dtype)
        print(f"{name}: {spec.frames} frames at {spec.size}², {family.layout(spec).tokens} video tokens", flush=True)
    print(format_video_llm_table(rows))
    print("ratio = speed-up / FLOPs ratio of the language model's prefill; selection % = the method's own "
          "time as a share of the pruned prefill")
    worst: dict[str, float] = defaultdict(float)
    for row in rows:
        if row.setting != "dense":
            method = row.setting.split()[2] if len(row.setting.split()) > 2 else "sta"
            worst[method] = max(worst[method], row.selection_pct)
    for method, pct in worst.items():
        verdict = "meets" if pct < SELECTION_TARGET_PCT else "MISSES"
        print(f"selection share, {method}: at most {pct:.2f}% of the pruned prefill ({verdict} the "
              f"{SELECTION_TARGET_PCT:g}% target)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)
    if args.smoke:
        print(SMOKE_NOTE)


if __name__ == "__main__":
    sys.exit(main())

"""``staprune bench``: throughput, latency and peak memory, dense vs pruned, measured side by side in
one run (the timing is :mod:`staprune.runs.timing`'s: round-robin rounds, medians with their spread).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over one forward; on CPU, with
``--cpu-memory``, the rise of peak RSS in a fresh subprocess per configuration; otherwise "n/a".
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch

from ..api.deploy import quantize_loaded
from ..api.loading import load
from ..api.models import example_input, spec_of_model
from ..api.patching import unpatch
from ..api.settings import Setting, check_plans
from ..core.errors import UsageError
from ..families import VIDEO_LLM, family_of_spec, find_model, levels_of
from ..runs.arguments import (
    add_device_arguments,
    add_keep_argument,
    add_method_argument,
    add_model_arguments,
    add_pruning_arguments,
    add_quantize_argument,
    apply_threads,
    check_pruning_options,
    check_quantize,
    default_levels,
    pruning_options,
    refuse_keep,
    video_llm_settings,
)
from ..runs.devices import DTYPES, resolve_device
from ..runs.timing import (
    STOCK,
    apply,
    cpu_peak_memory_mb,
    cuda_peak_memory_mb,
    format_table,
    noisy,
    summarize,
    time_variants,
)
from ..runs.video_llm_timing import format_video_llm_table, summarize_video_llm, time_video_llm


# --- CLI ----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``staprune bench``."""
    add_model_arguments(parser, default="ViT-S")
    parser.add_argument("--r", type=int, nargs="+", help="pruned configurations to time against dense (default: "
                        "the model's three levels)")
    add_method_argument(parser)
    add_keep_argument(parser)
    add_quantize_argument(parser)
    parser.add_argument("--batch-size", type=int, default=1, help="clips per forward")
    add_device_arguments(parser, device_default="cpu", threads=False)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (every config once per round)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--frames", type=int, help="input frames (default: the model's)")
    parser.add_argument("--size", type=int, help="input side in pixels (default: the model's)")
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
    apply_threads(args)
    device = resolve_device(args.device)
    check_quantize(args, device)
    dtype = DTYPES[args.dtype]
    _check_registry_settings(args)
    loaded = quantize_loaded(load(args.model, args.weights, frames=args.frames, image_size=args.size, dtype=dtype),
                             args.quantize)
    if loaded.family.kind == VIDEO_LLM:
        return _run_video_llm(args, loaded, device, dtype)
    refuse_keep(args, loaded.family.title)
    model = loaded.model.to(device=device, dtype=dtype)
    spec = spec_of_model(model, args.frames, args.size)
    options = pruning_options(args)
    rs = args.r or default_levels(options, levels_of(args.model, spec))
    pruned = [Setting.of(args.method, r, options) for r in rs]
    # Dense is the patched model dropping nothing; where the patch changes kernels (Video Swin's fused
    # window attention) the unpatched stock model is timed beside it.
    # (torchvision's stock Swin reads its qkv weight as a tensor: quantized, only the fused patch runs)
    stock = [] if loaded.family.stock_kernels_at_r0 or args.quantize else [STOCK]
    variants = [*stock, Setting(), *(s for s in pruned if not s.is_dense)]
    for variant in variants:  # validate every config before timing anything
        apply(model, variant)
    unpatch(model)
    inputs = example_input(spec, args.batch_size, dtype=dtype, device=device)
    times = time_variants(model, inputs, variants, warmup=args.warmup, repeats=args.repeats)
    memory: dict[Setting | None, float | None] = {}
    for variant in variants:
        if device.type == "cuda":
            memory[variant] = cuda_peak_memory_mb(model, inputs, variant)
        elif args.cpu_memory:
            memory[variant] = cpu_peak_memory_mb(args.model, variant, frames=args.frames, size=args.size,
                                                 batch_size=args.batch_size, dtype=args.dtype,
                                                 threads=torch.get_num_threads())
    name = f"{args.model} int8" if args.quantize else args.model
    rows = summarize(name, model, times, batch_size=args.batch_size, dtype=args.dtype,
                     device=str(device), frames=args.frames, size=args.size, memory=memory)
    busy = noisy(rows)
    if busy:
        worst = max(busy, key=lambda r: (r.latency_max_s - r.latency_min_s) / r.latency_median_s)
        spread = (worst.latency_max_s - worst.latency_min_s) / worst.latency_median_s
        print(f"staprune bench: warning: the rounds disagree ({worst.config}: {worst.latency_min_s:.3f}-"
              f"{worst.latency_max_s:.3f} s, {100 * spread:.0f}% of its median); the machine was busy and these "
              "ratios mean little: rerun on a quiet machine, with more --repeats", file=sys.stderr)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(format_table(rows))
        print("speedup = dense median latency / config median latency; FLOPs ratio = dense / config "
              "GFLOPs (analytic). dense = staprune's model dropping nothing" + (
                  "; stock = the unpatched model (its own attention kernels)" if stock else "") + ". Peak memory: " + (
                  "CUDA max allocated." if device.type == "cuda" else
                  "peak RSS rise during one forward in a fresh process." if args.cpu_memory else
                  "n/a on CPU (use --cpu-memory)."))
    return 0


def _check_registry_settings(args: argparse.Namespace) -> None:
    """A registry model's budgets checked on its geometry before it is built (a 7B model takes minutes
    to build; a model loaded from files is checked once loaded, below)."""
    entry = find_model(args.model)
    if entry is None or entry.loader is not None:
        return
    spec = entry.spec_for(args.frames, args.size)
    family = family_of_spec(spec)
    options = pruning_options(args)
    if family.kind == VIDEO_LLM:
        for config in video_llm_settings(args.keep, args.r, args.methods, options, family.default_keep)[1:]:
            family.kept_video_tokens(spec, config)
        return
    refuse_keep(args, family.title)
    check_plans(family, spec, [Setting.of(args.method, r, options) for r in args.r or []])


def _run_video_llm(args: argparse.Namespace, loaded, device: torch.device, dtype: torch.dtype) -> int:
    """A video LLM: language-model prefill, time to first token and KV cache, stock vs each budget,
    on one video of random frames in an example prompt."""
    family = loaded.family
    model = loaded.model.to(device=device, dtype=dtype)
    spec = family.spec_of(model, args.frames, args.size)
    settings = video_llm_settings(args.keep, args.r, args.methods, pruning_options(args), family.default_keep)
    for config in settings[1:]:  # every budget fits this video before anything is timed
        family.kept_video_tokens(spec, config)
    frames = torch.rand(spec.frames, 3, spec.size, spec.size, generator=torch.Generator().manual_seed(0))
    inputs = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
              for k, v in family.video_inputs(model, frames, spec, loaded.preprocessing).items()}
    results = time_video_llm(model, inputs, settings, warmup=args.warmup, repeats=args.repeats)
    rows = summarize_video_llm(args.model, family, spec, settings, results, device=str(device), dtype=args.dtype)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    print(f"{args.model}: one video of {spec.frames} frames at {spec.size}² in a prompt of {spec.prompt_tokens} "
          f"text tokens, batch 1, {args.dtype}, {torch.get_num_threads()} threads, {args.repeats} rounds")
    print(format_video_llm_table(rows))
    print("prefill = the language model's forward after the vision encoder (selection included); speed-up beside "
          "its analytic FLOPs ratio, ratio = speed-up / FLOPs ratio; TTFT = the first forward from pixels, vision "
          "encoder included (pruning does not shrink it); KV MB = the cache the prompt leaves")
    return 0

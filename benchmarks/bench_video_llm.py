"""Video LLMs: language-model prefill, time to first token and KV-cache bytes, dense vs STA on the
video tokens, side by side in one run (random weights, published configs).

Models: a Qwen2.5-VL (its published vision tower) with a 0.5B-class language model (Qwen2.5-0.5B's
shape), LLaVA-OneVision-0.5B (SigLIP so400m + Qwen2-0.5B) and InternVL3-1B (InternViT-300M +
Qwen2.5-0.5B), the registry's; ``--smoke``: each family's tiny test model. Per setting (dense =
the stock model, then STA at each keep ratio), rounds alternating (staprune.runs.video_llm_timing):

* prefill s: the forward after the vision encoder (its features precomputed, as ``generate`` does),
  STA's selection included; speed-up next to the analytic FLOPs ratio of the language model's
  prefill (target: speed-up >= 0.9 x FLOPs ratio);
* TTFT s: the whole first forward from pixels (vision encoder + selection + prefill);
* KV MB: the cache after the prompt; selection %: STA's selection as a share of the pruned prefill.

    python benchmarks/bench_video_llm.py --frames 16 --repeats 3 --threads 2
    python benchmarks/bench_video_llm.py --smoke   # CI: tiny configs, seconds; not a result
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch
import transformers

from staprune.core.config import STAConfig
from staprune.families import family_named, model_entry
from staprune.families.video_llms.qwen2_5_vl import Qwen25VLSpec, qwen25_config
from staprune.runs.video_llm_timing import format_video_llm_table, summarize_video_llm, time_video_llm

SMOKE_NOTE = "SMOKE RUN (--smoke): tiny configs that check the script runs; its numbers are not a result"


def qwen25_vl_05b() -> Qwen25VLSpec:
    """Qwen2.5-VL's vision tower before Qwen2.5-0.5B (896 wide, 24 layers, 14 heads of 64, 2 KV heads)."""
    config = qwen25_config(896, 4864, 24, 14, 2, 151936, True)
    head = config["text_config"]["hidden_size"] // config["text_config"]["num_attention_heads"]
    # M-RoPE splits half of each head (time, row, column) 2:3:3, as 16/24/24 of 128.
    config["text_config"]["rope_parameters"] = dict(config["text_config"]["rope_parameters"],
                                                    mrope_section=[head // 8, 3 * head // 16, 3 * head // 16])
    return Qwen25VLSpec(config=config)


# name -> (family, the full-size spec); --smoke builds each family's tiny test model instead.
MODELS = {
    "Qwen2.5-VL (0.5B LM)": ("qwen2_5_vl", qwen25_vl_05b),
    "LLaVA-OneVision-0.5B": ("llava_onevision", lambda: model_entry("LLaVA-OneVision-0.5B").spec),
    "InternVL3-1B": ("internvl", lambda: model_entry("InternVL3-1B").spec),
}


def model_and_inputs(entry, frames: int, smoke: bool, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(family, spec, model, example inputs) of a ``MODELS`` entry: the published shape with random
    weights, or (``smoke``) the family's tiny test model; seeded, on ``device`` in ``dtype``."""
    family = family_named(entry[0])
    torch.manual_seed(0)
    if smoke:
        model = family.tiny_model()
        spec = family.spec_of(model, frames, None if family.fixed_size else 112)
    else:
        spec = entry[1]().with_input(frames)
        model = family.build(spec)
    model = model.to(device, dtype)
    pixels = torch.rand(spec.frames, 3, spec.size, spec.size, generator=torch.Generator().manual_seed(0))
    inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
              for k, v in family.video_inputs(model, pixels, spec).items()}
    return family, spec, model, inputs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=16, help="input frames per video")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.3, 0.15], help="keep ratios")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS), help="models to time")
    parser.add_argument("--json", help="also write every row to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="CI check: tiny configs, 4 frames, 1 round (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.frames, args.repeats = 4, 1
        print(SMOKE_NOTE)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"fp32, batch 1, {args.frames} frames, {args.repeats} rounds (medians), random weights")
    rows = []
    for name in args.models:
        family, spec, model, inputs = model_and_inputs(MODELS[name], args.frames, args.smoke)
        settings = [None] + [STAConfig(keep_ratio=k) for k in args.keep]
        results = time_video_llm(model, inputs, settings, warmup=1, repeats=args.repeats)
        rows += summarize_video_llm(name, family, spec, settings, results, device="cpu", dtype="fp32")
        print(f"{name}: {spec.frames} frames at {spec.size}², {family.layout(spec).tokens} video tokens", flush=True)
    print(format_video_llm_table(rows))
    print("ratio = speed-up / FLOPs ratio of the language model's prefill (target >= 0.9); TTFT includes the "
          "vision encoder, which pruning does not shrink")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)
    if args.smoke:
        print(SMOKE_NOTE)


if __name__ == "__main__":
    sys.exit(main())

"""Video LLMs: language-model prefill, time to first token and KV-cache bytes, dense vs STA on the
video tokens, side by side in one run (random weights, published configs).

Models: a Qwen2.5-VL (its published vision tower) with a 0.5B-class language model (Qwen2.5-0.5B's
shape), and LLaVA-OneVision-0.5B (SigLIP so400m + Qwen2-0.5B). Per setting (dense = the stock model,
then STA at each keep ratio), rounds alternating:

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
import statistics
import sys
import time

import torch
import transformers

import staprune
from staprune.core.flops import wrapping_selection

SMOKE_NOTE = "SMOKE RUN (--smoke): tiny configs that check the script runs; its numbers are not a result"
VIDEO_TOKEN, VISION_START, VISION_END = 151656, 151652, 151653

# Published shapes: Qwen2.5-0.5B / Qwen2-0.5B language models (896 wide, 24 layers, 14 heads, 2 KV heads).
LM_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2)
LM_TINY = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)


def qwen25_vl(tiny: bool) -> transformers.Qwen2_5_VLForConditionalGeneration:
    lm = LM_TINY if tiny else LM_05B
    head_dim = lm["hidden_size"] // lm["num_attention_heads"]
    unit = head_dim // 16  # M-RoPE sections (time, row, column) split half the head 2:3:3, as 16/24/24 of 128
    text = dict(lm, rope_parameters={"rope_type": "default", "mrope_section": [2 * unit, 3 * unit, 3 * unit],
                                     "rope_theta": 1e6})
    vision = (dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1])
              if tiny else dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                fullatt_block_indexes=[7, 15, 23, 31]))
    vision["out_hidden_size"] = lm["hidden_size"]
    cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, video_token_id=VIDEO_TOKEN,
                                        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()


def llava_onevision(tiny: bool) -> transformers.LlavaOnevisionForConditionalGeneration:
    vision = (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=112, patch_size=14)
              if tiny else dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                num_attention_heads=16, image_size=384, patch_size=14))
    cfg = transformers.LlavaOnevisionConfig(
        text_config=dict(LM_TINY if tiny else LM_05B, model_type="qwen2"),
        vision_config=dict(vision, model_type="siglip_vision_model"), video_token_index=VIDEO_TOKEN)
    return transformers.LlavaOnevisionForConditionalGeneration(cfg).eval()


def qwen_prompt(model, frames: int, size: int) -> dict:
    patch, merge = model.config.vision_config.patch_size, model.config.vision_config.spatial_merge_size
    t, side = frames // 2, size // patch
    video = [VISION_START] + [VIDEO_TOKEN] * (t * side * side // merge**2) + [VISION_END]
    ids = torch.tensor([[1000 + i for i in range(16)] + video + [2000 + i for i in range(24)]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == VIDEO_TOKEN).long() * 2,
            "pixel_values_videos": torch.randn(t * side * side, 3 * 2 * patch * patch),
            "video_grid_thw": torch.tensor([[t, side, side]])}


def llava_prompt(model, frames: int, size: int) -> dict:
    vision = model.config.vision_config
    per_frame = ((vision.image_size // vision.patch_size + 1) // 2) ** 2
    video = [VIDEO_TOKEN] * (frames * per_frame + 1)
    ids = torch.tensor([[1000 + i for i in range(16)] + video + [2000 + i for i in range(24)]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values_videos": torch.randn(1, frames, 3, vision.image_size, vision.image_size)}


MODELS = {"Qwen2.5-VL (0.5B LM)": (qwen25_vl, qwen_prompt, 448), "LLaVA-OneVision-0.5B": (llava_onevision, llava_prompt, 384)}


def prefill_flops(model, length: int) -> float:
    """Multiply-adds of the language model on a prompt of ``length`` tokens (projections, MLP,
    attention ``2 L² C``; the docs' FLOPs convention)."""
    c = model.config.text_config
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_token = 2 * c.hidden_size**2 + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * (length * per_token + 2 * length**2 * c.hidden_size)


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=16, help="input frames per video")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.3, 0.15], help="keep ratios")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="CI check: tiny configs, 4 frames, 1 round (seconds)")
    args = parser.parse_args(argv)
    tiny = args.smoke
    if args.smoke:
        args.frames, args.repeats = 4, 1
        print(SMOKE_NOTE)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"fp32, batch 1, {args.frames} frames, {args.repeats} rounds (medians), random weights")
    spent = [0.0]

    def timed(fn):  # adds the wall time of each selection call to spent[0]
        def run(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - start

        return run

    header = (f"{'model':24} {'setting':>9} {'tokens':>7} {'prefill s':>10} {'speed-up':>8} {'FLOPs ratio':>11} "
              f"{'ratio':>6} {'TTFT s':>8} {'KV MB':>7} {'selection %':>11}")
    print(header)
    print("-" * len(header))
    for name, (build, prompt, size) in MODELS.items():
        torch.manual_seed(0)
        model = build(tiny)
        inputs = prompt(model, args.frames, 112 if tiny else size)
        settings = [None] + [{"keep_ratio": k} for k in args.keep]
        times = {i: {"prefill": [], "ttft": [], "selection": []} for i in range(len(settings))}
        facts = {}
        with torch.inference_mode(), wrapping_selection(timed):
            for _ in range(args.repeats + 1):  # the first round warms up
                for i, setting in enumerate(settings):
                    staprune.unpatch(model) if setting is None else staprune.patch(model, **setting)
                    encoded = {"video": model.model.get_video_features(
                        **{k: inputs[k] for k in ("pixel_values_videos", "video_grid_thw") if k in inputs},
                        return_dict=True)}
                    text_only = {k: v for k, v in inputs.items() if k not in ("pixel_values_videos", "video_grid_thw")}
                    spent[0] = 0.0
                    start = time.perf_counter()
                    out = model(**text_only, mm_encoder_outputs=encoded, use_cache=True, logits_to_keep=1)
                    times[i]["prefill"].append(time.perf_counter() - start)
                    times[i]["selection"].append(spent[0])
                    start = time.perf_counter()
                    model(**inputs, use_cache=True, logits_to_keep=1)
                    times[i]["ttft"].append(time.perf_counter() - start)
                    facts[i] = (out.cache.get_seq_length(), cache_bytes(out.cache))
        staprune.unpatch(model)
        dense_prefill = statistics.median(times[0]["prefill"][1:])
        dense_flops = prefill_flops(model, facts[0][0])
        for i, setting in enumerate(settings):
            prefill = statistics.median(times[i]["prefill"][1:])
            speedup, ratio = dense_prefill / prefill, dense_flops / prefill_flops(model, facts[i][0])
            share = 100 * statistics.median(times[i]["selection"][1:]) / prefill
            label = "dense" if setting is None else f"keep {setting['keep_ratio']}"
            print(f"{name if i == 0 else '':24} {label:>9} {facts[i][0]:>7} {prefill:>10.3f} {speedup:>8.2f} "
                  f"{ratio:>11.2f} {speedup / ratio:>6.2f} {statistics.median(times[i]['ttft'][1:]):>8.3f} "
                  f"{facts[i][1] / 2**20:>7.1f} {share:>11.1f}")
    print("ratio = speed-up / FLOPs ratio of the language model's prefill (target >= 0.9); TTFT includes the "
          "vision encoder, which pruning does not shrink")
    if args.smoke:
        print(SMOKE_NOTE)


if __name__ == "__main__":
    sys.exit(main())

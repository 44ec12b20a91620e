"""Timing a video LLM dense and pruned side by side: language-model prefill, time to first token and
KV-cache bytes (``staprune bench`` on a video LLM, ``benchmarks/bench_video_llm.py``).

Every setting runs on the same model object, round-robin (one of each per round), as
:mod:`staprune.runs.timing` does for the classifiers. Per setting and round:

* **encode**: the vision encoder and projector on the video (the method the family declares,
  ``get_video_features`` or InternVL's ``get_image_features``, which ``generate`` calls before its
  first forward; pruning does not change it). It runs once per round
  for the stock model and once for each different vision-side need of the pruned settings (what
  their methods read off the tower: keys, attention, pixels): settings that read the same share it;
* **prefill**: the forward after it, on the encoded features, STA's selection included: what
  pruning shrinks;
* **TTFT** = encode + prefill of the same round: the time to first token of ``generate`` but for
  sampling;
* **selection**: wall time inside the selection functions: during the prefill, and during the
  encode for a method that reads the vision tower there (the attention its tokens received);

and once: the KV cache the prompt leaves (bytes) and its length.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..api.patching import patch, unpatch
from ..core.config import STAConfig
from ..core.selection_hook import wrapping_selection
from ..core.video_methods import vision_needs_of
from ..families import family_of
from ..families.base import Family
from ..families.video_llms.base import VideoLLMSpec, prefill_flops
from .timing import sync_device, timed_selection


@dataclass
class VideoLLMBenchRow:
    """One setting's measurements (seconds; medians with the fastest and slowest round)."""

    model: str
    setting: str
    prompt_tokens: int
    prefill_median_s: float
    prefill_min_s: float
    prefill_max_s: float
    prefill_speedup: float
    prefill_flops_ratio: float
    ttft_median_s: float
    ttft_min_s: float
    ttft_max_s: float
    ttft_speedup: float
    kv_cache_mb: float
    selection_pct: float
    repeats: int
    threads: int
    device: str
    dtype: str


def setting_label(config: STAConfig | None) -> str:
    """``dense`` for the stock model, else the budget and method, and the method's options given
    (``keep 0.3``, ``r=8 random``, ``keep 0.25 fastv fastv_layer=3``)."""
    if config is None:
        return "dense"
    label = config.budget if config.method == "sta" else f"{config.budget} {config.method}"
    return " ".join([label, *(f"{name}={value}" for name, value in config.method_options)])


def cache_bytes(cache) -> int:
    """Bytes of a transformers cache's keys and values."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def time_video_llm(model: nn.Module, inputs: dict[str, Tensor], settings: Sequence[STAConfig | None], *,
                   warmup: int = 1, repeats: int = 3) -> list[dict]:
    """Prefill, TTFT and selection times of ``inputs`` under each setting (None: the stock model).

    Returns:
        per setting ``{"encode", "prefill", "ttft", "selection": [seconds per round], "length": L,
        "kv_bytes": B}``.
    """
    device = inputs["input_ids"].device
    described = family_of(model).describe(model)
    # The encoder's own arguments, as generate() picks them: the rest is the prompt.
    accepted = set(inspect.signature(getattr(described.inner, described.encoder)).parameters) - {"kwargs"}
    video = {k: v for k, v in inputs.items() if k in accepted}
    text_only = {k: v for k, v in inputs.items() if k not in accepted}
    results = [{"encode": [], "prefill": [], "ttft": [], "selection": []} for _ in settings]
    spent = [0.0]
    try:
        with torch.inference_mode(), wrapping_selection(timed_selection(device, spent)):
            for round_index in range(warmup + repeats):
                # vision-side need -> (features, seconds); the features carry what the patched
                # get_video_features recorded of each video (its layout, keys), as generate() hands them over
                shared: dict = {}
                for config, result in zip(settings, results, strict=True):
                    unpatch(model)
                    if config is not None:
                        patch(model, config=config)
                    need = None if config is None else vision_needs_of(config)
                    if need in shared:
                        encoded, encode, encode_selection = shared[need]
                    else:
                        spent[0] = 0.0
                        sync_device(device)
                        start = time.perf_counter()
                        # through the patched entry point, as generate() calls it: it records each video's layout
                        encoder = getattr(described.inner, described.encoder)  # the patched one: it records each video
                        encoded = {described.modality: encoder(**video, return_dict=True)}
                        sync_device(device)
                        encode, encode_selection = time.perf_counter() - start, spent[0]
                        shared[need] = (encoded, encode, encode_selection)
                    spent[0] = 0.0
                    start = time.perf_counter()
                    out = model(**text_only, use_cache=True, logits_to_keep=1, mm_encoder_outputs=encoded)
                    sync_device(device)
                    # what the method read in the vision tower (VisionZip's attention) is its cost too
                    prefill, selection = time.perf_counter() - start, spent[0] + encode_selection
                    result["length"], result["kv_bytes"] = out.cache.get_seq_length(), cache_bytes(out.cache)
                    if round_index >= warmup:
                        for key, value in (("encode", encode), ("prefill", prefill), ("selection", selection),
                                           ("ttft", encode + prefill)):
                            result[key].append(value)
    finally:
        unpatch(model)
    return results


def summarize_video_llm(name: str, family: Family, spec: VideoLLMSpec, settings: Sequence[STAConfig | None],
                        results: list[dict], *, device: str, dtype: str) -> list[VideoLLMBenchRow]:
    """Rows relative to the first setting (dense); FLOPs ratio of the language model's prefill, analytic."""
    dense = results[0]
    dense_flops = prefill_flops(family.flops(spec, STAConfig(method="none")))
    rows = []
    for config, result in zip(settings, results, strict=True):
        count = family.flops(spec, config or STAConfig(method="none"))
        prefill, ttft = statistics.median(result["prefill"]), statistics.median(result["ttft"])
        rows.append(VideoLLMBenchRow(
            model=name, setting=setting_label(config), prompt_tokens=result["length"],
            prefill_median_s=prefill, prefill_min_s=min(result["prefill"]), prefill_max_s=max(result["prefill"]),
            prefill_speedup=statistics.median(dense["prefill"]) / prefill,
            prefill_flops_ratio=dense_flops / prefill_flops(count),
            ttft_median_s=ttft, ttft_min_s=min(result["ttft"]), ttft_max_s=max(result["ttft"]),
            ttft_speedup=statistics.median(dense["ttft"]) / ttft,
            kv_cache_mb=result["kv_bytes"] / 2**20,
            selection_pct=100 * statistics.median(result["selection"]) / prefill,
            repeats=len(result["prefill"]), threads=torch.get_num_threads(), device=device, dtype=dtype))
    return rows


def format_video_llm_table(rows: Sequence[VideoLLMBenchRow]) -> str:
    """A text table: one line per setting, each ratio beside its FLOPs ratio."""
    header = (f"{'model':22} {'setting':>12} {'tokens':>7} {'prefill s (min-max)':>22} {'speed-up':>8} "
              f"{'FLOPs ratio':>11} {'ratio':>6} {'TTFT s':>8} {'TTFT x':>7} {'KV MB':>8} {'selection %':>11}")
    lines = [header, "-" * len(header)]
    for i, row in enumerate(rows):
        spread = f"{row.prefill_median_s:.3f} ({row.prefill_min_s:.3f}-{row.prefill_max_s:.3f})"
        lines.append(f"{row.model if i == 0 or rows[i - 1].model != row.model else '':22} {row.setting:>12} "
                     f"{row.prompt_tokens:>7} {spread:>22} {row.prefill_speedup:>8.2f} {row.prefill_flops_ratio:>11.2f} "
                     f"{row.prefill_speedup / row.prefill_flops_ratio:>6.2f} {row.ttft_median_s:>8.3f} "
                     f"{row.ttft_speedup:>7.2f} {row.kv_cache_mb:>8.1f} {row.selection_pct:>11.1f}")
    return "\n".join(lines)


__all__ = ["VideoLLMBenchRow", "cache_bytes", "format_video_llm_table", "setting_label", "summarize_video_llm",
           "time_video_llm"]

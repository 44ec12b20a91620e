"""Video LLMs: which tokens should STA's similarity compare, the vision tower's last keys
(``similarity="key"``, the default) or the projected tokens the language model receives
(``similarity="hidden"``)? Measured on a checkpoint, against the dense model, in one run.

For each video and keep ratio, both similarities prune the same prompt; reported per setting:

* KL: KL(dense || pruned) of the next-token distribution after the prompt (nats, mean over videos):
  how far pruning moves what the model is about to say (lower is closer to dense);
* top-1: how often the pruned model's next token is the dense model's;
* overlap: Jaccard overlap of the kept sets the two similarities choose.

Accuracy on labelled questions is the loop in docs/families/video-llms.md; this script needs no
labels. With a checkpoint folder that has its processor, the prompt is the chat template with
``--question``; without one (``--smoke``'s tiny random models), the family's example prompt.

    python benchmarks/video_llm_similarity.py --model /models/Qwen2.5-VL-7B-Instruct --videos clips/ \\
        --frames 32 --device cuda --dtype bf16
    python benchmarks/video_llm_similarity.py --smoke   # CI: tiny random models; not a result
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import staprune
from staprune.analysis.video_llm import sample_video
from staprune.runs.devices import DTYPES, resolve_device

SMOKE_NOTE = "SMOKE RUN (--smoke): tiny random models and synthetic videos; its numbers are not a result"
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")


def prompt(loaded, folder: Path | None, video_path: Path, frames: int, size: int | None, question: str) -> dict:
    """The model's inputs for one video: the checkpoint's processor when it has one, else the example prompt."""
    processor = None
    if folder is not None and folder.is_dir():
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(str(folder))
        except (OSError, ValueError):
            processor = None
    if processor is not None:
        messages = [{"role": "user", "content": [{"type": "video", "path": str(video_path)},
                                                 {"type": "text", "text": question}]}]
        return dict(processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                  return_dict=True, return_tensors="pt", num_frames=frames))
    spec = loaded.family.spec_of(loaded.model, frames, size)
    video = sample_video(video_path, spec.frames, spec.size)
    return loaded.family.video_inputs(loaded.model, video.frames, spec, loaded.preprocessing)


def next_token_log_probs(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, logits_to_keep=1).logits[0, -1].float().log_softmax(-1)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = set(a.tolist()), set(b.tolist())
    return len(a & b) / max(1, len(a | b))


def smoke_models(root: Path) -> tuple[list[Path], list[Path]]:
    """Every video-LLM family's tiny test model as a checkpoint, and three synthetic videos."""
    from staprune.data import write_video
    from staprune.families import VIDEO_LLM, families

    folders = []
    for family in families():
        if family.kind == VIDEO_LLM:
            family.tiny_model().save_pretrained(root / family.name)
            folders.append(root / family.name)
    rng = np.random.default_rng(0)
    videos = []
    for k in range(3):
        frames = np.zeros((16, 112, 112, 3), np.uint8)
        for t in range(16):
            frames[t] = rng.integers(0, 60, 3)
            y, x = 10 + 3 * k, (5 * t + 20 * k) % 80
            frames[t, y : y + 30, x : x + 30] = (200, 160, 40)
        write_video(root / f"clip{k}.mp4", frames, fps=8)
        videos.append(root / f"clip{k}.mp4")
    return folders, videos


def measure(model_name: str, videos: list[Path], keeps: list[float], frames: int, size: int | None, question: str,
            device: torch.device, dtype: torch.dtype) -> list[str]:
    loaded = staprune.load(model_name)
    model = loaded.model.to(device=device, dtype=dtype)
    folder = Path(model_name).expanduser()
    stats: dict[tuple[float, str], dict[str, list[float]]] = {}
    for path in videos:
        inputs = {k: v.to(device) if torch.is_tensor(v) else v
                  for k, v in prompt(loaded, folder, path, frames, size, question).items()}
        inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
        staprune.unpatch(model)
        dense = next_token_log_probs(model, inputs)
        for keep in keeps:
            kept = {}
            for similarity in ("key", "hidden"):
                staprune.patch(model, keep_ratio=keep, similarity=similarity)
                pruned = next_token_log_probs(model, inputs)
                kept[similarity] = torch.cat(staprune.kept_tokens(model))
                row = stats.setdefault((keep, similarity), {"kl": [], "top1": [], "overlap": []})
                row["kl"].append(float((dense.exp() * (dense - pruned)).sum()))
                row["top1"].append(float(dense.argmax() == pruned.argmax()))
            overlap = jaccard(kept["key"], kept["hidden"])
            for similarity in ("key", "hidden"):
                stats[(keep, similarity)]["overlap"].append(overlap)
        staprune.unpatch(model)
    lines = []
    for (keep, similarity), row in stats.items():
        lines.append(f"{Path(model_name).name[:28]:28} {keep:>5g} {similarity:>7} {statistics.mean(row['kl']):>10.4f} "
                     f"{100 * statistics.mean(row['top1']):>6.0f}% {statistics.mean(row['overlap']):>8.2f}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", help="video-LLM checkpoint folders (or registry names)")
    parser.add_argument("--videos", help="a folder of videos (or one video)")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.3, 0.15], help="keep ratios")
    parser.add_argument("--frames", type=int, default=16, help="frames per video")
    parser.add_argument("--size", type=int, help="frame side for prompts without a processor (default: the model's)")
    parser.add_argument("--question", default="Describe what happens in this video.", help="the prompt's question")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="number format")
    parser.add_argument("--smoke", action="store_true", help="CI check: tiny random models, 3 synthetic videos")
    args = parser.parse_args(argv)
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as scratch:
        if args.smoke:
            print(SMOKE_NOTE)
            folders, videos = smoke_models(Path(scratch))
            models, args.frames, args.size = [str(f) for f in folders], 4, None
        else:
            if not args.model or not args.videos:
                parser.error("give --model and --videos (or --smoke)")
            models = args.model
            source = Path(args.videos)
            videos = sorted(p for p in source.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES) if source.is_dir() else [source]
            if not videos:
                parser.error(f"--videos {source}: no video files ({', '.join(VIDEO_SUFFIXES)})")
        print(f"{len(videos)} videos, {args.frames} frames each; KL(dense || pruned) of the next token after the prompt")
        print(f"{'model':28} {'keep':>5} {'sim':>7} {'KL nats':>10} {'top-1':>7} {'overlap':>8}")
        for name in models:
            for line in measure(name, videos, args.keep, args.frames, args.size, args.question, device, dtype):
                print(line, flush=True)
    print("top-1: next token equal to dense; overlap: Jaccard of the kept sets key vs hidden choose")
    if args.smoke:
        print(SMOKE_NOTE)


if __name__ == "__main__":
    sys.exit(main())

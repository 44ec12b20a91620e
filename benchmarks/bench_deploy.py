"""Deployment: STA and int8, in PyTorch and in ONNX Runtime, measured side by side in one run.

Part 1, speed: a ViT-S-sized VideoMAE (16x224², random weights), batch 1, at 1 and 2 threads; eight
configurations in rounds (one forward of each per round): PyTorch dense / STA r=64 / dynamic int8 /
STA + int8, and ONNX Runtime dense / STA / int8 / STA + int8 (the graphs of ``staprune export``,
ORT's dynamic int8). Median latency with the fastest and slowest round, speed-up over PyTorch dense.

Part 2, accuracy: the bundled demo models' top-1 on the demo's held-out clips under the same eight
configurations (at the model's middle level).

    python benchmarks/bench_deploy.py --repeats 5
    python benchmarks/bench_deploy.py --smoke   # CI: tiny model, few clips, 1 round; not a result
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import staprune
from staprune.api.deploy import export_onnx, onnx_session, quantize_int8, quantize_onnx_int8, run_onnx
from staprune.demo.data import generate

SMOKE_NOTE = "SMOKE RUN (--smoke): a tiny model, few clips and one round; its numbers are not a result"
CONFIGS = ("PyTorch dense", "PyTorch STA", "PyTorch int8", "PyTorch STA+int8",
           "ORT dense", "ORT STA", "ORT int8", "ORT STA+int8")


def runners(model_name: str, r: int, frames: int | None, size: int | None, scratch: Path, threads: int):
    """The eight configurations of one model as ``name -> (run(x) -> logits)``, and the model loaded."""
    scratch.mkdir(parents=True, exist_ok=True)
    built = {}
    for pruned, tag in ((False, "dense"), (True, "STA")):
        for quantized in (False, True):
            loaded = staprune.load(model_name, frames=frames, image_size=size)
            staprune.patch(loaded.model, r=r if pruned else 0, method="sta" if pruned else "none")
            family, model = loaded.family, loaded.model.eval()
            if quantized:
                quantize_int8(model)
                built[f"PyTorch {'STA+int8' if pruned else 'int8'}"] = lambda x, m=model, f=family: f.logits(m(x))
                continue
            built[f"PyTorch {tag}"] = lambda x, m=model, f=family: f.logits(m(x))
            spec = family.spec_of(model, frames, size)
            path, int8 = scratch / f"{tag}.onnx", scratch / f"{tag}.int8.onnx"
            if not path.is_file():  # exported once, whatever the thread count
                export_onnx(model, family.example_input(spec, 2), path)
                quantize_onnx_int8(path, int8)
            fp32_session, int8_session = onnx_session(path, threads), onnx_session(int8, threads)
            built[f"ORT {tag}"] = lambda x, s=fp32_session: run_onnx(s, x)
            built[f"ORT {'STA+int8' if pruned else 'int8'}"] = lambda x, s=int8_session: run_onnx(s, x)
    return {name: built[name] for name in CONFIGS}, loaded


def time_configs(configs: dict, x: torch.Tensor, warmup: int, repeats: int) -> dict[str, list[float]]:
    times = {name: [] for name in configs}
    with torch.inference_mode():
        for round_index in range(warmup + repeats):
            for name, run in configs.items():
                start = time.perf_counter()
                run(x)
                if round_index >= warmup:
                    times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--clips", type=int, default=300, help="held-out demo clips for top-1")
    parser.add_argument("--smoke", action="store_true", help="CI check: tiny sizes, seconds")
    args = parser.parse_args(argv)
    model, r, frames, size = "ViT-S", 64, 16, 224
    if args.smoke:
        print(SMOKE_NOTE)
        model, r, size, args.repeats, args.clips = "demo-vit", 12, 112, 1, 12
    print(f"torch {torch.__version__}; Part 1: {model} {frames}x{size}², batch 1, STA r={r}, random weights; "
          f"{args.repeats} rounds (medians, min-max)")
    with tempfile.TemporaryDirectory() as scratch:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            configs, loaded = runners(model, r, frames, size, Path(scratch) / model, threads)
            spec = loaded.family.spec_of(loaded.model, frames, size)
            x = loaded.family.example_input(spec, 1, generator=torch.Generator().manual_seed(0))
            times = time_configs(configs, x, warmup=1, repeats=args.repeats)
            base = statistics.median(times["PyTorch dense"])
            print(f"\n{threads} thread(s)\n{'configuration':18} {'median ms':>10} {'min-max ms':>14} {'speed-up':>9}")
            for name, values in times.items():
                median = statistics.median(values)
                print(f"{name:18} {1000 * median:>10.1f} {1000 * min(values):>6.1f}-{1000 * max(values):<7.1f} "
                      f"{base / median:>8.2f}x")
        torch.set_num_threads(2)
        print(f"\nPart 2: top-1 on {args.clips} held-out demo clips (seed 7, the demo's), each model at its middle level")
        clips, labels = generate(args.clips, 7)
        print(f"{'model':10} " + " ".join(f"{name:>16}" for name in CONFIGS))
        for name in ("demo-vit",) if args.smoke else ("demo-vit", "demo-swin"):
            level = staprune.load(name).default_r()
            configs, loaded = runners(name, level, None, None, Path(scratch) / name, 2)
            right = dict.fromkeys(configs, 0)
            with torch.inference_mode():
                for start in range(0, len(labels), 8):
                    x = loaded.to_input(loaded.preprocessing.normalize_pixels(clips[start : start + 8]))
                    for config, run in configs.items():
                        right[config] += int((run(x).argmax(-1) == labels[start : start + 8]).sum())
            print(f"{name + f' r={level}':10} " + " ".join(f"{100 * right[c] / len(labels):>15.1f}%" for c in CONFIGS))
    print("\nspeed-up: PyTorch dense fp32 median / the configuration's median; ORT: ONNX Runtime CPU, the model "
          "`staprune export` writes (int8: ORT dynamic int8); PyTorch int8: dynamic int8 linear layers")
    if args.smoke:
        print(SMOKE_NOTE)


if __name__ == "__main__":
    sys.exit(main())

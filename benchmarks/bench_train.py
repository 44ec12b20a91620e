"""Training with STA vs dense on the demo ViT: step speed side by side, then fine-tuning accuracy.

Part 1 (always): two copies of the model from the same weights, one dense and one patched with
STA at ``--r`` (each as ``staprune finetune`` trains it), take training steps (forward, backward,
AdamW update) on the same generated batches, alternating dense / STA step by step so that any
slowdown of the shared machine hits both; after ``--warmup`` untimed rounds, the median step time
of each gives clips/s and the speed ratio (dense median / STA median), with the spread of the
rounds (min-max step times, and of the per-round ratio). ``--compile`` repeats this with
``torch.compile``d models (the first, compiling, step is reported separately).

Part 2 (``--finetune``): two ``staprune finetune --demo`` runs with the same initial weights
(the bundled demo-vit weights if present, else the same seeded random init), the same data,
seed and recipe, one dense and one with STA; each trained model is evaluated on the held-out
clips dense and with STA, giving the three-way table (dense-trained/dense, dense-trained/STA
off the shelf, STA-trained/STA) with training times. Runs resume if ``--out`` already holds them.

    python benchmarks/bench_train.py --threads 2 --dtype bf16 --finetune --epochs 3
    python benchmarks/bench_train.py --threads 1 --steps 8 --finetune --epochs 2
    python benchmarks/bench_train.py --smoke   # CI: both parts at batch 4, a few steps, seconds; not a result
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import staprune
from staprune import training
from staprune.api.settings import Setting
from staprune.commands import finetune as ft
from staprune.data.clips import ClipTensorSet
from staprune.families import LoadedModel

# --smoke: the same code path at a tiny setting (CI runs it so the script cannot rot); explicit
# options still override these. out=None: the fine-tuning runs go to a temporary folder.
SMOKE = {"batch_size": 4, "steps": 3, "warmup": 1, "threads": 1, "finetune": True, "epochs": 1,
         "train_clips": 8, "val_clips": 8, "out": None}
SMOKE_NOTE = "SMOKE RUN (--smoke): a tiny setting that checks the script runs; its numbers are not a result"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="demo-vit")
    parser.add_argument("--r", type=int, default=12, help="STA r (demo ViT: 49 tokens per tubelet-frame)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model (part 1)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="where both parts train (default cpu)")
    parser.add_argument("--dtype", default="fp32", choices=tuple(training.AUTOCAST))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd steps")
    parser.add_argument("--finetune", action="store_true", help="part 2: fine-tune dense and STA, evaluate")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-clips", type=int, default=2048)
    parser.add_argument("--val-clips", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lr", type=float, help="peak lr of the fine-tuning runs (default: 1e-3 x batch / 256)"
    )
    parser.add_argument("--out", default="bench-train-out", help="fine-tuning runs (part 2)")
    parser.add_argument("--smoke", action="store_true",
                        help="CI check: batch 4, 1+3 steps, --finetune 1 epoch on 8 clips into a temporary "
                        "folder, 1 thread (seconds); not a result")
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    return args


# --- part 1: alternating steps ------------------------------------------------------------------
def load_initial(args: argparse.Namespace) -> LoadedModel:
    """The model both fine-tuning runs start from, as ``staprune finetune`` loads it (a random init
    follows ``--seed``), in train mode."""
    torch.manual_seed(args.seed)
    loaded = staprune.load(args.model, init=args.init)
    loaded.model.train()
    return loaded


def _models(args: argparse.Namespace) -> tuple[LoadedModel, LoadedModel]:
    """Dense and STA copies of the same initial weights, patched as ``staprune finetune`` trains them
    (``--method none``: staprune's dense model, dropping nothing)."""
    dense, sta = load_initial(args), load_initial(args)
    sta.model.load_state_dict(dense.model.state_dict())
    training.apply_pruning(dense.model, "none", None)
    training.apply_pruning(sta.model, "sta", args.r)
    device = torch.device(args.device)
    for loaded in (dense, sta):
        loaded.model.to(device).train()
    return dense, sta


def _batches(
    args: argparse.Namespace, loaded: LoadedModel, count: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from staprune.demo.data import generate

    clips, labels = generate(count * args.batch_size, seed=4242, frames=loaded.frames, size=loaded.image_size)
    data = ClipTensorSet(clips, labels, loaded.preprocessing)
    device = torch.device(args.device)
    return [tuple(t.to(device) for t in data.batch(torch.arange(i, i + args.batch_size)))
            for i in range(0, len(labels), args.batch_size)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(args: argparse.Namespace, compile_models: bool = False) -> dict[str, object]:
    """Median training-step seconds of dense and STA, stepping alternately on the same batches."""
    dense, sta = _models(args)
    device = torch.device(args.device)
    cfg = training.StepConfig(dense.family, training.AUTOCAST[args.dtype], 0.1, 0.0, device)
    lr = training.scaled_lr(1e-3, args.batch_size)
    runners: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    first_step: dict[str, float] = {}
    for name, loaded in (("dense", dense), ("sta", sta)):
        runners[name] = (
            torch.compile(loaded.model) if compile_models else loaded.model,
            training.build_optimizer(loaded.model, lr, 0.05, loaded.family.no_weight_decay),
        )
    times: dict[str, list[float]] = {"dense": [], "sta": []}
    for i, (x, y) in enumerate(_batches(args, dense, args.warmup + args.steps)):
        for name, (model, opt) in runners.items():
            _sync(device)
            start = time.perf_counter()
            training.train_step(model, opt, x, y, lr, cfg)
            _sync(device)
            seconds = time.perf_counter() - start
            if i == 0:
                first_step[name] = seconds
            if i >= args.warmup:
                times[name].append(seconds)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "median_s": med,
        "clips_per_s": {n: args.batch_size / s for n, s in med.items()},
        "ratio": med["dense"] / med["sta"],
        "round_ratios": [d / s for d, s in zip(times["dense"], times["sta"], strict=True)],
        "first_step_s": first_step,
        "times": times,
    }


def print_speed(label: str, res: dict) -> None:
    med, cps, times, rounds = res["median_s"], res["clips_per_s"], res["times"], res["round_ratios"]
    print(
        f"{label}: dense {med['dense']:.3f} s/step ({cps['dense']:.1f} clips/s), STA {med['sta']:.3f} s/step "
        f"({cps['sta']:.1f} clips/s) -> STA trains {res['ratio']:.2f}x faster "
        f"(first step: dense {res['first_step_s']['dense']:.1f} s, STA {res['first_step_s']['sta']:.1f} s)"
    )
    print(
        f"  spread over {len(rounds)} rounds: dense {min(times['dense']):.3f}-{max(times['dense']):.3f} s/step, "
        f"STA {min(times['sta']):.3f}-{max(times['sta']):.3f} s/step; per-round speed ratio "
        f"{min(rounds):.2f}-{max(rounds):.2f}x"
    )


# --- part 2: fine-tuning ------------------------------------------------------------------------
def _finetune(args: argparse.Namespace, method: str, out: Path) -> dict:
    """One ``staprune finetune --demo`` run (resumed if ``out`` holds one); its summary."""
    parser = argparse.ArgumentParser()
    ft.add_arguments(parser)
    argv = [
        "--demo",
        "--model",
        args.model,
        "--epochs",
        str(args.epochs),
        "--train-clips",
        str(args.train_clips),
        "--val-clips",
        str(args.val_clips),
        "--batch-size",
        str(args.batch_size),
        "--seed",
        str(args.seed),
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        "--workers",
        "0",
        "--out",
        str(out),
        "--resume",
        "--method",
        method,
        "--eval-r",
        "0",
        str(args.r),
    ]
    argv += ["--r", str(args.r)] if method != "none" else []  # dense training takes no --r
    argv += ["--init", args.init] + (["--threads", str(args.threads)] if args.threads else [])
    argv += ["--lr", str(args.lr)] if args.lr else []
    argv += ["--quiet"] if args.smoke else []
    if ft.run(parser.parse_args(argv)) != 0:
        raise RuntimeError(f"fine-tuning {method} failed")
    return json.loads((out / "summary.json").read_text())


def _top1(summary: dict, r: int) -> float:
    return next(row["top1"] for row in summary["eval"] if row["r"] == r)


def _train_rate(summary: dict) -> float:
    rec = summary["recipe"]
    return rec["epochs"] * rec["steps_per_epoch"] * rec["global_batch"] / summary["train_seconds"]


def initial_top1(args: argparse.Namespace) -> tuple[float, float]:
    """Held-out top-1 of the initial weights, dense and with STA (no fine-tuning)."""
    from staprune.demo.data import HELD_OUT_SEED, generate

    loaded = load_initial(args)
    loaded.model.to(torch.device(args.device))
    clips, labels = generate(args.val_clips, HELD_OUT_SEED, loaded.frames, loaded.image_size)
    dense, sta = Setting(), Setting.of("sta", args.r)
    scores = staprune.score_clips(loaded, clips, labels, (dense, sta), batch_size=32,
                                  autocast=training.AUTOCAST[args.dtype])
    return scores[dense].top1, scores[sta].top1


def print_table(args: argparse.Namespace, dense: dict, sta: dict, initial: tuple[float, float]) -> None:
    r = args.r
    rows = [
        ("dense", "dense", _top1(dense, 0), dense),
        ("dense", f"STA r={r} (off the shelf)", _top1(dense, r), dense),
        (f"STA r={r}", f"STA r={r}", _top1(sta, r), sta),
    ]
    print("| trained | evaluated | top-1 (%) | training time (s) | training clips/s |")
    print("|---|---|---|---|---|")
    for trained, evaluated, top1, summary in rows:
        seconds, rate = summary["train_seconds"], _train_rate(summary)
        shown = f"{seconds:.0f}" if seconds >= 10 else f"{seconds:.1f}"
        print(f"| {trained} | {evaluated} | {top1:.2f} | {shown} | {rate:.1f} |")
    print(
        f"\nalso: STA-trained evaluated dense {_top1(sta, 0):.2f}%; before fine-tuning ({dense['source']}): "
        f"dense {initial[0]:.2f}%, STA r={r} {initial[1]:.2f}%"
    )
    if args.init == "random":
        print(
            "NOTE: no bundled demo weights: both runs started from a random init, so these top-1 figures "
            "only show what a short run from scratch reaches; rerun once the bundled weights exist."
        )
    print(
        f"training time ratio dense/STA: {dense['train_seconds'] / sta['train_seconds']:.2f}x "
        f"(sequential runs; the alternating measurement above is the fairer speed figure)"
    )


def demo_weights_exist(name: str) -> bool:
    from staprune.demo.models import DEMO_MODELS, weights_path

    return name in DEMO_MODELS and weights_path(name).exists()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Fixed once, so that both runs start from the same weights even if bundled ones appear meanwhile.
    args.init = "bundled" if demo_weights_exist(args.model) else "random"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        print(SMOKE_NOTE)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads, {args.model} ({args.init} init), batch {args.batch_size}, {args.dtype}, {args.device}; "
        f"STA r={args.r}"
    )
    res = time_alternating(args)
    print_speed(f"eager, median of {args.steps} alternating steps", res)
    if args.compile:
        try:
            print_speed("torch.compile", time_alternating(args, compile_models=True))
        except Exception as e:  # noqa: BLE001 - report, do not lose the eager numbers
            print(f"torch.compile: failed ({type(e).__name__}: {str(e).splitlines()[0][:300]})")
    sys.stdout.flush()
    if args.finetune:
        initial = initial_top1(args)
        with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
            out = Path(args.out if args.out is not None else scratch)
            dense = _finetune(args, "none", out / "dense")
            sta = _finetune(args, "sta", out / f"sta_r{args.r}")
        print_table(args, dense, sta, initial)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

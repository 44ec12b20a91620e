"""``staprune demo``: accuracy vs FLOPs vs measured speed of STA and its baselines, on the bundled models.

For ``demo-vit`` and ``demo-swin`` it evaluates dense, STA, random drop (and ToMe for the ViT) at
three pruning levels on held-out synthetic clips (:mod:`staprune.demo.data`, ``--seed``). Every
batch goes through every configuration in turn (same inputs, alternating), so the clips/s
figures are measured side by side under the same machine load. FLOPs: ``FlopCounterMode`` on one
clip, one multiply-add = one FLOP, STA's own selection work excluded as in the paper (reported
apart in ``results.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..api.evaluation import paired_difference, score_clips
from ..api.loading import load
from ..api.patching import unpatch
from ..api.settings import Setting, recorded
from ..core.errors import UsageError
from ..core.flops import measure_flops
from ..demo.data import generate
from ..demo.models import DEMO_MODELS, model_card, weights_path
from ..families.base import LoadedModel
from ..runs.arguments import (
    add_pruning_arguments,
    apply_threads,
    check_pruning_options,
    default_levels,
    pruning_options,
)
from ..storage.outputs import writable_dir
from ..storage.runfolder import RunLock, atomic_write, atomic_write_json, claim_folder

MIN_Y_SPAN = 5.0  # top-1 points the plot's y axis spans at least
DEFAULT_SEED = 7  # neither the training seed (0) nor the model cards' held-out seed


@dataclass
class Row:
    model: str
    method: str
    r: int
    top1: float
    gflops: float
    clips_per_s: float
    selection_gflops: float = 0.0
    top1_se: float = 0.0  # standard error of top1 (binomial), as a fraction like top1


def settings_for(loaded: LoadedModel, options: dict | None = None) -> list[Setting]:
    """Dense, then every method at each of the model's three levels (ToMe where its family runs it)."""
    methods = ("sta", "random", "tome") if loaded.family.supports_tome else ("sta", "random")
    levels = default_levels(options or {}, loaded.default_levels())
    return [Setting(0, "none")] + [Setting.of(m, r, options) for m in methods for r in levels]


def evaluate_model(name: str, clips: torch.Tensor, labels: torch.Tensor, batch: int, log,
                   options: dict | None = None) -> tuple[list[Row], list[str]]:
    """Run every setting of ``name`` over the clips (N, T, 3, H, W) uint8: one Row per setting
    (``options``: STAConfig fields applied to every pruned setting), and one verdict per level:
    STA against random drop at the same FLOPs, paired on the same clips, with its noise."""
    loaded = load(name, init="bundled")
    settings = settings_for(loaded, options)
    one_clip = loaded.to_input(loaded.preprocessing.normalize_pixels(clips[:1]))
    flops = {}
    for s in settings:
        s.apply(loaded.model)
        m = measure_flops(loaded.model, one_clip)
        flops[s] = (m.backbone / 1e9, m.selection / 1e9)
    scores = score_clips(loaded, clips, labels, settings, batch_size=batch, warmup=True,
                         on_batch=lambda done: log(f"  {name}: {done}/{len(labels)} clips"))
    unpatch(loaded.model)
    n = len(labels)
    rows = [Row(name, "dense" if s.is_dense else s.method, s.r, scores[s].correct1 / n, flops[s][0],
                n / scores[s].forward_s, flops[s][1], scores[s].top1_se / 100) for s in settings]
    return rows, verdicts(name, settings, scores)


def verdicts(name: str, settings: list[Setting], scores: dict) -> list[str]:
    """STA vs random drop at each level, on the same clips: ahead or behind when the paired
    difference is more than twice its standard error, else a tie within noise."""
    lines = []
    for sta in (s for s in settings if s.method == "sta"):
        rand = next((s for s in settings if s.method == "random" and s.r == sta.r), None)
        if rand is None:
            continue
        diff, se = paired_difference(scores[sta], scores[rand])
        if diff == 0 and se == 0:
            verdict = "STA and random get the same clips right"
        elif abs(diff) > 2 * se:
            verdict = f"STA {'ahead of' if diff > 0 else 'behind'} random by {abs(diff):.1f} ± {se:.1f} points"
        else:
            verdict = f"STA and random tie within noise ({diff:+.1f} ± {se:.1f} points)"
        lines.append(f"{name} r={sta.r}: {verdict} (paired, same clips; ± one standard error)")
    return lines


def format_table(rows: list[Row]) -> str:
    lines = [f"{'model':<10} {'method':<7} {'r':>3} {'top-1 ± s.e.':>13} {'GFLOPs':>7} {'rel':>5} {'clips/s':>8} "
             f"{'speed-up':>8}"]
    dense = {r.model: r for r in rows if r.method == "dense"}
    for r in rows:
        d = dense[r.model]
        top1 = f"{100 * r.top1:.1f} ± {100 * r.top1_se:.1f}"
        lines.append(
            f"{r.model:<10} {r.method:<7} {r.r:>3} {top1:>13} {r.gflops:>7.3f} "
            f"{r.gflops / d.gflops:>5.2f} {r.clips_per_s:>8.1f} {r.clips_per_s / d.clips_per_s:>7.2f}x"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    """Top-1 vs GFLOPs, one panel per model, one line per method (each starting at dense)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    # One y scale for every panel, at least MIN_Y_SPAN points tall: auto-scaling a panel whose
    # methods differ by a few tenths of a point would draw noise as a trend.
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False, sharey=True)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r.model == model]
        dense = next(r for r in mine if r.method == "dense")
        for method in dict.fromkeys(r.method for r in mine if r.method != "dense"):
            pts = [dense] + sorted((r for r in mine if r.method == method), key=lambda r: r.r)
            ax.plot([p.gflops for p in pts], [100 * p.top1 for p in pts], marker="o", label=method)
        ax.plot([dense.gflops], [100 * dense.top1], marker="*", markersize=14, color="k", ls="", label="dense")
        ax.set_title(model)
        ax.set_xlabel("GFLOPs per clip (1 multiply-add = 1 FLOP)")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("top-1 (%)")
    low, high = axes[0][0].get_ylim()
    if high - low < MIN_Y_SPAN:
        middle = (low + high) / 2
        axes[0][0].set_ylim(middle - MIN_Y_SPAN / 2, middle + MIN_Y_SPAN / 2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="staprune-demo", help="output directory (default: ./staprune-demo)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the generated evaluation clips")
    parser.add_argument("--clips", type=int, default=240, help="number of evaluation clips (default 240)")
    parser.add_argument("--batch", type=int, default=16, help="batch size of the timed forward passes")
    parser.add_argument("--models", nargs="+", choices=DEMO_MODELS, default=None,
                        help="which bundled models (default: every one whose weights are installed)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON on stdout (the rest to stderr)")
    add_pruning_arguments(parser, seed_flag=False)  # --seed is the clips' seed here


def run(args: argparse.Namespace) -> int:
    report = sys.stderr if args.json else sys.stdout

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    check_pruning_options(args)
    if args.clips < 1:
        raise UsageError(f"--clips must be >= 1, got {args.clips}")
    out = writable_dir(args.out)  # before the work, not after it
    claim_folder(out, "demo")
    names = args.models or list(DEMO_MODELS)
    missing = [name for name in names if not weights_path(name).exists()]
    hint = "train them with `python -m staprune.demo.train --model NAME --install`"
    if missing and (args.models or len(missing) == len(names)):
        log(f"bundled weights missing for {', '.join(missing)}: {hint}")
        return 2
    if missing:  # the default set: run what is installed, say plainly what is not
        log(f"note: skipping {', '.join(missing)} (its weights are not bundled yet: {hint})")
    names = [name for name in names if name not in missing]
    apply_threads(args)
    with RunLock(out, command="demo"):  # one run writes an --out at a time
        start = time.time()
        log(f"generating {args.clips} held-out clips (seed {args.seed}) ...")
        clips, labels = generate(args.clips, args.seed)
        rows: list[Row] = []
        found: list[str] = []
        for name in names:
            log(f"evaluating {name} ...")
            model_rows, model_verdicts = evaluate_model(name, clips, labels, args.batch, log, pruning_options(args))
            rows += model_rows
            found += model_verdicts
        runtime = time.time() - start

        results = {
            "seed": args.seed,
            "clips": args.clips,
            "batch": args.batch,
            "threads": torch.get_num_threads(),
            "runtime_s": round(runtime, 1),
            "flops_convention": "FlopCounterMode / 2 (1 multiply-add = 1 FLOP), one clip; selection excluded",
            "options": recorded(pruning_options(args)),
            "models": {name: model_card(name) for name in names},
            "skipped": missing,
            "rows": [asdict(r) for r in rows],
            "verdicts": found,
        }
        # The table first: a full disk must not cost the numbers of the run.
        print(format_table(rows), file=report)
        print("\n".join(found), file=report)
        print(f"{args.clips} clips, seed {args.seed}, {torch.get_num_threads()} threads, {runtime:.0f} s",
              file=report)
        json_path, png_path = out / "results.json", out / "accuracy_vs_gflops.png"
        atomic_write_json(json_path, results)
        plot(rows, png_path)
    print(f"wrote {json_path}\nwrote {png_path}", file=report)
    if args.json:
        keys = ("model", "method", "r", "top1", "gflops", "clips_per_s")
        print(json.dumps([{k: asdict(r)[k] for k in keys} for r in rows], indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="staprune demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

"""``staprune eval``: multi-view video classification accuracy, dense or pruned, resumable, on one
process or many (``torchrun --nproc-per-node N -m staprune eval ...``).

The protocol and scoring are :mod:`staprune.api.evaluation`'s (docs/algorithm/evaluation.md); the run folders, resuming and torchrun sharding are
:mod:`staprune.runs.list_evaluation`'s. This module reads the command line, runs one setting per r of
the sweep (the model's three levels without ``--r``), merges the rows into ``OUT/results.json`` and
draws ``OUT/accuracy_vs_gflops.png``.

Multi-process: ``torchrun --nproc-per-node N -m staprune eval ... --rs 64`` (torchrun's argument
parser rejects ``--r`` as ambiguous, so use the ``--rs`` spelling there); rank 0 alone prints and
writes the results.

Testing hook: ``STAPRUNE_EVAL_SLEEP=<seconds>`` sleeps after each finished video (used by the
kill-and-resume test to make a run slow enough to interrupt); never set it otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..api.deploy import quantize_loaded
from ..api.evaluation import check_compatible, resolve_protocol
from ..api.loading import load, require_model_kind
from ..api.settings import Setting, check_settings_fit
from ..core.errors import UsageError
from ..data.lists import load_items
from ..families import VIDEO_CLASSIFIER, require_kind
from ..runs import distributed as dist_utils
from ..runs.arguments import (
    add_device_arguments,
    add_model_arguments,
    add_pruning_arguments,
    add_quantize_argument,
    check_pruning_options,
    check_quantize,
    default_levels,
    pruning_options,
)
from ..runs.devices import DTYPES, resolve_device
from ..runs.list_evaluation import ListEvaluation, holds_records, model_dirname
from ..storage.outputs import writable_dir, write_error
from ..storage.runfolder import atomic_write, atomic_write_json, claim_folder

METHODS = ("sta", "random", "tome", "none")
INSTEAD = "measure a video LLM with staprune bench, flops or visualize --keep"


# --- CLI ----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``staprune eval`` (see the module docstring for the protocol)."""
    add_model_arguments(parser, note=". Without --model and --data: runs `staprune demo`")
    parser.add_argument("--data", help="list file ('path label' lines) or folder per class")
    parser.add_argument("--root", help="base directory of relative paths in the list (default: its folder)")
    parser.add_argument("--dataset", default="k400", choices=("k400", "ssv2"), help="selects the view protocol")
    parser.add_argument("--method", default="sta", choices=METHODS, help="pruning method (none = dense)")
    # --rs: under torchrun, torchrun's own parser rejects "--r" as an ambiguous abbreviation of its
    # --rdzv-*/--role/--run-path options before our CLI ever sees it.
    parser.add_argument("--r", "--rs", dest="r", type=int, nargs="+", metavar="R",
                        help="tokens dropped per unit (ViT) / r1 (Swin); several values = a sweep (spell it --rs "
                        "under torchrun); default: the model's three levels")
    parser.add_argument("--views", help="CLIPSxCROPS (default: the protocol's, e.g. 5x3 for ViT on K400)")
    parser.add_argument("--frames", type=int, help="frames per clip (default: the protocol's)")
    parser.add_argument("--stride", type=int, help="temporal stride of uniform clips (default: the protocol's)")
    parser.add_argument("--image-size", type=int,
                        help="input side for VideoMAE release .pth and registry models (default 224)")
    parser.add_argument("--batch-size", type=int, default=16, help="views per forward pass (across videos)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes decoding videos")
    add_device_arguments(parser, threads=False)
    add_quantize_argument(parser)
    parser.add_argument("--out", default="eval-results", help="directory for per-video records and results")
    parser.add_argument("--resume", action="store_true", help="skip videos already recorded in --out")
    parser.add_argument("--json", action="store_true", help="print results as JSON to stdout (logs to stderr)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_pruning_arguments(parser)


def settings_from_args(method: str, rs: Sequence[int] | None, levels: Sequence[int] = (),
                       options: dict[str, Any] | None = None) -> list[Setting]:
    """The sweep: one setting per r (method ``none`` runs once, as r=0). Without ``rs``: the dense
    model, then the model's ``levels`` (an explicit schedule in ``options`` gives every stage's r, so
    then dense and that schedule). ``options`` (other STAConfig fields) apply to every pruned setting."""
    options = options or {}
    if method == "none":
        if options:
            raise UsageError(f"--method none evaluates the dense model; pruning options {sorted(options)} do not apply")
        if rs and any(rs):
            raise UsageError(f"--method none evaluates the dense model and takes no --r (got {list(rs)}); drop --r, "
                             "or give a pruning method (--method sta)")
        return [Setting(0, "none")]
    if rs and any(r < 0 for r in rs):
        raise UsageError(f"--r values must be >= 0, got {list(rs)}")
    if rs:
        return [Setting.of(method, r, options) for r in dict.fromkeys(rs)]
    if not levels:
        raise UsageError(f"--r is required for --method {method} (e.g. --r 64, or several for a sweep)")
    return [Setting(0, "none"), *(Setting.of(method, r, options) for r in default_levels(options, levels))]


# --- reporting ----------------------------------------------------------------------------------
def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def top1_se(row: dict[str, Any]) -> float | None:
    """Standard error of a row's top-1 (binomial over its scored videos), in percentage points."""
    if row.get("top1") is None or not row.get("videos"):
        return None
    p = row["top1"] / 100
    return 100 * (p * (1 - p) / row["videos"]) ** 0.5


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of result rows (top-1 with its standard error)."""
    lines = [f"{'method':<8}{'r':>6}{'top1':>9}{'± s.e.':>8}{'top5':>9}{'GFLOPs':>10}{'clips/s':>10}{'videos':>8}"
             f"{'failed':>8}"]
    for row in rows:
        method = "dense" if row.get("dense") else row["method"]
        if row.get("error"):
            lines.append(f"{method:<8}{row['r']:>6}  ERROR: {row['error']}")
            continue
        lines.append(
            f"{method:<8}{row['r']:>6}{_fmt(row['top1'], '.2f'):>9}{_fmt(top1_se(row), '.2f'):>8}"
            f"{_fmt(row['top5'], '.2f'):>9}"
            f"{_fmt(row['gflops'], '.4g'):>10}{_fmt(row['clips_per_s'], '.1f'):>10}{row['videos']:>8}"
            f"{len(row['failed']):>8}"
        )
    return "\n".join(lines)


ROW_KEY = ("model", "method", "r", "options", "views", "frames", "stride", "sampling")


def row_key(row: dict[str, Any]) -> tuple:
    """What identifies a result: the model and its full evaluation config."""
    return tuple(json.dumps(row.get(k), sort_keys=True) for k in ROW_KEY)


def complete(row: dict[str, Any]) -> bool:
    """A row that scored videos without an error (a failed run's row is not)."""
    return row.get("error") is None and bool(row.get("videos"))


def merge_results(path: Path, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of an existing ``results.json`` updated with ``rows``: a row replaces the one with the same
    model and config (:func:`row_key`), unless it failed and the stored one is complete; rows of
    other models and configs are kept."""
    old: list[dict[str, Any]] = []
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            print(f"staprune: {path} is damaged; writing a new one", file=sys.stderr)
            old = []
    by_key = {row_key(r): r for r in old if isinstance(r, dict) and "method" in r}
    for r in rows:
        previous = by_key.get(row_key(r))
        if previous is not None and complete(previous) and not complete(r):
            print(f"staprune: kept the earlier complete row for {r['method']} r={r['r']} in {path.name} "
                  "(this run's failed)", file=sys.stderr)
            continue
        by_key[row_key(r)] = r
    return sorted(by_key.values(), key=lambda r: (str(r.get("model")), r["method"], r["r"]))


def plot_accuracy_vs_gflops(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """Top-1 against GFLOPs per view, one line per method, points labelled with r. False if < 2 points."""
    points = [r for r in rows if r.get("top1") is not None and r.get("gflops") is not None]
    if len(points) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    models = sorted({str(r.get("model")) for r in points})
    for model, method in sorted({(str(r.get("model")), r["method"]) for r in points}):
        pts = sorted((r for r in points if (str(r.get("model")), r["method"]) == (model, method)),
                     key=lambda r: r["gflops"])
        label = method if len(models) == 1 else f"{model_dirname(model)[:-9]}: {method}"
        ax.plot([r["gflops"] for r in pts], [r["top1"] for r in pts], marker="o", label=label)
        for r in pts:
            ax.annotate(f"r={r['r']}", (r["gflops"], r["top1"]), textcoords="offset points", xytext=(3, 3),
                        fontsize=7)
    ax.set_xlabel("GFLOPs per view")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return True


def report(run: ListEvaluation, rows: list[dict[str, Any]], as_json: bool) -> None:
    """Merge ``rows`` into ``OUT/results.json``, redraw the plot, print the table (and JSON)."""
    try:
        run.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(run.out, err) from err
    # The table first: a full disk must not cost the numbers of the run (they are in the records too).
    print(format_table(rows), file=sys.stderr if as_json else sys.stdout)
    for row in rows:
        for path, reason in row["failed_reasons"].items():
            print(f"staprune: failed ({row['method']} r={row['r']}): {path}: {reason}", file=sys.stderr)
    merged = merge_results(run.out / "results.json", rows)
    atomic_write_json(run.out / "results.json", merged)
    plotted = plot_accuracy_vs_gflops(merged, run.out / "accuracy_vs_gflops.png")
    run.log(f"results in {run.out / 'results.json'}" + (", plot accuracy_vs_gflops.png" if plotted else ""))
    if as_json:
        print(json.dumps(rows, indent=2))


# --- entry point --------------------------------------------------------------------------------
def setup(args: argparse.Namespace, info: dist_utils.DistInfo) -> ListEvaluation:
    """The model, the list and the protocol, checked against each other before any video is read."""
    if args.batch_size < 1 or args.workers < 0:
        raise UsageError("--batch-size must be >= 1 and --workers >= 0")
    device = resolve_device(args.device, info.local_rank if info.distributed else None)
    check_quantize(args, device)
    if info.is_main:
        claim_folder(writable_dir(args.out), "eval")  # before any model is loaded or video decoded
    loaded = quantize_loaded(load(args.model, args.weights, frames=args.frames, image_size=args.image_size,
                                  dtype=DTYPES[args.dtype]), args.quantize)
    require_kind(loaded.family, VIDEO_CLASSIFIER, "staprune eval", INSTEAD)  # a hub id or file: known once loaded
    proto = resolve_protocol(loaded.protocol(args.dataset), args.views, args.frames, args.stride)
    items, _ = load_items(args.data, args.root)
    check_compatible(loaded, proto, items)
    dtype = DTYPES[args.dtype]
    loaded.model.to(device=device, dtype=dtype)
    return ListEvaluation(loaded, items, proto, Path(args.out), str(args.data), device, dtype, args.dtype,
                          args.batch_size, args.workers, args.resume, args.quiet, info)


def summary(row: dict[str, Any], listed: int) -> str:
    """One line per result: how many videos were scored, failed, and repeated frames."""
    line = f"{row['method']} r={row['r']}: {row['videos']} of {listed} videos scored"
    if row["failed"]:
        first = next(iter(row["failed_reasons"].items()))
        line += f", {len(row['failed'])} failed (first: {first[0]}: {first[1]})"
    if row.get("short_videos"):
        line += (f"; {row['short_videos']} shorter than one clip ({row['frames']} frames at stride {row['stride']}) "
                 "repeated their last frame")
    return line


def interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves behind (printed by the CLI): resuming is offered only when something was."""
    if not holds_records(Path(args.out)):
        return "no video had finished; nothing was written"
    return (f"every finished video is recorded under {args.out}; run the same command with --resume to "
            "evaluate only the rest")


def run(args: argparse.Namespace) -> int:
    """``staprune eval``: returns 0; 1 if a setting could not be evaluated or scored no video."""
    if args.model is None or args.data is None:
        raise UsageError("give both --model and --data (or neither, to run the bundled demo)")
    check_pruning_options(args)
    require_model_kind(args.model, VIDEO_CLASSIFIER, "staprune eval", INSTEAD)
    options = pruning_options(args)
    settings_from_args(args.method, args.r, levels=(1,), options=options)  # option errors before anything is loaded
    info = dist_utils.init(resolve_device(args.device).type)
    try:
        error: BaseException | None = None
        try:
            evaluation = setup(args, info)
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = e
        dist_utils.raise_if_any(info, error)
        loaded, p = evaluation.loaded, evaluation.protocol
        # Without --r: the model's own levels (a sweep over its three pruning levels).
        settings = settings_from_args(args.method, args.r, loaded.default_levels(p.frames, loaded.image_size), options)
        # Every setting must fit the model and its input before any video is read.
        check_settings_fit(loaded.family, loaded.model, settings, p.frames, loaded.preprocessing.size)
        evaluation.log(f"{loaded.source}: {len(evaluation.items)} videos, {p.clips}x{p.crops} views of {p.frames} "
                       f"frames ({p.sampling}, stride {p.stride}), {loaded.preprocessing.size}px, "
                       f"{info.world_size} process(es), device {evaluation.device}")
        with dist_utils.locked_on_main(info, evaluation.out, command="eval"):
            rows = [evaluation.evaluate(setting) for setting in settings]
            for row in rows:
                if row["error"]:
                    evaluation.log(f"ERROR {row['method']} r={row['r']}: {row['error']}")
            if info.is_main:
                report(evaluation, rows, args.json)
                for row in rows:
                    if not row["error"]:
                        evaluation.log(summary(row, len(evaluation.items)))
            dist_utils.barrier(info)
        # (Only rank 0 holds the merged metrics.)
        unscored = [row for row in rows if not row["error"] and not row["videos"]] if info.is_main else []
        if unscored:
            evaluation.log(f"ERROR: no video could be scored ({len(unscored[0]['failed'])} failed); check --data and "
                           "--root (the first failure above says why)")
        return 1 if any(row["error"] for row in rows) or unscored else 0
    finally:
        dist_utils.shutdown(info)

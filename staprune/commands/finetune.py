"""``staprune finetune``: a plain fine-tuning loop for dense or pruned (STA / random) video models.

The command's arguments and orchestration. The recipe (docs/usage/finetune.md), training step,
checkpoints and resuming, sharding over torchrun processes and gradient-checkpointing guards are
:mod:`staprune.training`'s; the clip sets :mod:`staprune.data.clips`'s: one random clip per video of
``--data``, or a fixed set of generated clips with ``--demo``. Under torchrun spell ``--r`` as
``--rs`` (torchrun rejects ``--r`` as ambiguous).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import training
from ..api.loading import load, require_model_kind
from ..api.settings import Setting, check_settings_fit, recorded
from ..core.errors import UsageError
from ..data.clips import ClipTensorSet, ListClipSet, readable_items
from ..data.lists import load_items
from ..demo.data import HELD_OUT_SEED, NUM_CLASSES, generate
from ..families import VIDEO_CLASSIFIER, LoadedModel, require_kind
from ..runs import arguments as cli_args
from ..runs import distributed as dist_utils
from ..runs.devices import resolve_device
from ..runs.progress import format_duration, progress
from ..storage.outputs import writable_dir
from ..storage.runfolder import atomic_write_json, claim_folder, latest_epoch

METHODS = ("sta", "random", "none")
INSTEAD = "train a video LLM with your loop or transformers' Trainer on the patched model (docs/families/video-llms.md#generation-batches-training)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``staprune finetune`` (the recipe is in the module docstring)."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="training list file ('path label' lines) or folder per class")
    src.add_argument("--demo", action="store_true", help="train on generated demo clips (staprune.demo.data)")
    cli_args.add_model_arguments(parser, note=" (default with --demo: demo-vit)")
    parser.add_argument("--init", default="auto", choices=("auto", "bundled", "random"),
                        help="demo models: bundled weights (auto: if present) or a random init from --seed")
    parser.add_argument("--root", help="base directory of relative paths in the lists")
    parser.add_argument("--val", help="validation list, evaluated at the end through `staprune eval`'s loop")
    parser.add_argument("--dataset", default="k400", choices=("k400", "ssv2"), help="validation view protocol")
    parser.add_argument("--val-views", help="CLIPSxCROPS for validation (default: the protocol's)")
    parser.add_argument("--frames", type=int, help="frames per training clip (default: the protocol's)")
    parser.add_argument("--stride", type=int, help="temporal stride of training clips (default: the protocol's)")
    parser.add_argument("--image-size", type=int, help="input side for release .pth / registry models")
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flip")
    parser.add_argument("--train-clips", type=int, default=2048, help="--demo: size of the fixed training set")
    parser.add_argument("--val-clips", type=int, default=600, help="--demo: held-out clips for the final top-1")
    parser.add_argument("--data-seed", type=int, default=1,
                        help="--demo: seed of the training clips (the demo models were trained on seed 0)")
    parser.add_argument("--method", default="sta", choices=METHODS, help="pruning while training (none = dense)")
    parser.add_argument("--r", "--rs", dest="r", type=int, metavar="R",
                        help="tokens dropped per unit at the first stage (spell it --rs under torchrun); default: "
                        "the middle of the model's three levels")
    parser.add_argument("--eval-r", type=int, nargs="+", metavar="R",
                        help="r values for the final evaluation, 0 = dense (default: the training r)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=16, help="clips per step per process")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: --base-lr x global batch / 256)")
    parser.add_argument("--base-lr", type=float, default=1e-3, help="learning rate per 256 clips of global batch")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay of weight matrices")
    parser.add_argument("--warmup-epochs", type=float, help="linear warm-up length (default: 5%% of --epochs)")
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    parser.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm (0: no clipping)")
    parser.add_argument("--dtype", default="fp32", choices=tuple(training.AUTOCAST), help="bf16 = autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (eager fallback)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (e.g. aot_eager)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="HF VideoMAE only")
    parser.add_argument("--seed", type=int, default=0, help="init (random), data order, augmentation, dropout")
    parser.add_argument("--out", default="finetune-out", help="checkpoint / result directory")
    parser.add_argument("--resume", action="store_true", help="continue from the latest epoch in --out")
    parser.add_argument("--stop-after", type=int, help="end this invocation after this epoch (schedule unchanged)")
    parser.add_argument("--workers", type=int, default=2, help="decoding workers (--data)")
    cli_args.add_device_arguments(parser, dtype=False)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    cli_args.add_pruning_arguments(parser, seed_flag=False)  # --seed is the training seed here


@dataclass
class Run:
    """What the epochs of one invocation need, built by :func:`setup`."""

    args: argparse.Namespace
    info: dist_utils.DistInfo
    loaded: LoadedModel
    trainer: training.Trainer  # the model being trained (maybe DDP / compiled), optimizer, data, recipe
    val_set: ClipTensorSet | None
    out: Path
    start_epoch: int = 0
    train_seconds: float = 0.0


def _log(info: dist_utils.DistInfo, message: str) -> None:
    if info.is_main:
        print(f"staprune finetune: {message}", file=sys.stderr, flush=True)


def _check_args(args: argparse.Namespace) -> None:
    cli_args.check_pruning_options(args)
    if args.method == "none" and args.r:
        raise UsageError(f"--method none trains the dense model and takes no --r (got {args.r}); drop --r")
    if args.r is not None and args.r < 0:
        raise UsageError(f"--r must be >= 0, got {args.r}")
    for name in ("epochs", "batch_size", "train_clips", "val_clips"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("lr", "base_lr"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive learning rate, got {getattr(args, name)}")
    for name in ("weight_decay", "warmup_epochs", "clip_grad", "workers"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.label_smoothing < 1:
        raise UsageError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    cli_args.check_threads(args)
    if args.eval_r and cli_args.explicit_schedule(cli_args.pruning_options(args)):
        raise UsageError(f"--schedule {args.schedule} gives every stage's r; drop --eval-r (got {args.eval_r})")
    if args.stop_after is not None and not 1 <= args.stop_after <= args.epochs:
        raise UsageError("--stop-after must be between 1 and --epochs")
    if args.demo and args.val:
        raise UsageError("--val goes with --data; --demo evaluates on generated held-out clips")


def _clip_shape(args: argparse.Namespace, loaded: LoadedModel) -> tuple[int, int, int]:
    """(frames, stride, size) of the training clips, known before any data exists."""
    if args.demo:
        return args.frames or loaded.frames or 16, 1, loaded.image_size or loaded.preprocessing.size
    base = loaded.protocol(args.dataset)
    return args.frames or base.frames, args.stride or base.stride, loaded.preprocessing.size


def _datasets(args: argparse.Namespace, loaded: LoadedModel, frames: int, stride: int,
              size: int) -> tuple[ClipTensorSet | ListClipSet, ClipTensorSet | None]:
    """(training set, demo held-out set or None) for ``args``, once every setting is known to fit."""
    if args.demo:
        if loaded.num_classes < NUM_CLASSES:
            raise UsageError(f"--demo has {NUM_CLASSES} classes; the model has {loaded.num_classes}")
        train = ClipTensorSet(*generate(args.train_clips, args.data_seed, frames, size), loaded.preprocessing)
        return train, ClipTensorSet(*generate(args.val_clips, HELD_OUT_SEED, frames, size), loaded.preprocessing)
    items, _ = load_items(args.data, args.root)
    if not items or any(it.label >= loaded.num_classes for it in items):
        raise UsageError(f"training list is empty or has labels >= the model's {loaded.num_classes} classes")
    return ListClipSet(readable_items(items), frames, stride, loaded.preprocessing, args.flip), None


def setup(args: argparse.Namespace, info: dist_utils.DistInfo) -> Run:
    """Load the model and data, patch, wrap (DDP), build the optimizer, restore a checkpoint."""
    _check_args(args)
    cli_args.apply_threads(args)
    device = resolve_device(args.device, info.local_rank if info.distributed else None)
    args.model = args.model or ("demo-vit" if args.demo else None)
    if args.model is None:
        raise UsageError("--model is required with --data")
    require_model_kind(args.model, VIDEO_CLASSIFIER, "staprune finetune", INSTEAD)
    if info.is_main:
        claim_folder(writable_dir(args.out), "finetune")  # before the model is loaded or a clip decoded
    torch.manual_seed(args.seed)  # a random init (--init random, or auto without bundled weights) follows the seed
    loaded = load(args.model, args.weights, frames=args.frames, image_size=args.image_size, init=args.init)
    require_kind(loaded.family, VIDEO_CLASSIFIER, "staprune finetune", INSTEAD)  # a hub id or file: known once loaded
    loaded.model.train()
    options = cli_args.pruning_options(args)
    schedule = cli_args.explicit_schedule(options)  # every stage's r given: no --r to default
    if args.method != "none" and not args.r and not schedule:
        args.r = loaded.default_r()
        _log(info, f"--r not given: training at r={args.r}, the middle of this model's levels {loaded.default_levels()}")
    frames, stride, size = _clip_shape(args, loaded)
    # The trained setting and every --eval-r fit the model's token grid, before any clip is made or read.
    entries = [(args.method, args.r or 0), *training.eval_entries(args.method, args.r, args.eval_r, schedule)]
    settings = [Setting.of(m, r, options if m != "none" else None) for m, r in entries]
    check_settings_fit(loaded.family, loaded.model, settings, frames, size)
    train_set, val_set = _datasets(args, loaded, frames, stride, size)
    recipe = training.make_recipe(
        model=args.model, data=None if args.demo else args.data, train_clips=args.train_clips,
        data_seed=args.data_seed, method=args.method, r=args.r, epochs=args.epochs, lr=args.lr, base_lr=args.base_lr,
        batch_per_process=args.batch_size, world_size=info.world_size, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, num_clips=len(train_set), label_smoothing=args.label_smoothing,
        clip_grad=args.clip_grad, seed=args.seed, dtype=args.dtype, frames=frames, stride=stride, flip=args.flip,
        init=loaded.source, options=recorded(options), weights=args.weights, image_size=args.image_size)
    model = training.apply_pruning(loaded.model, args.method, args.r, options)
    trainer = training.build_trainer(model, loaded.family, train_set, recipe, device, info, workers=args.workers,
                                     gradient_checkpointing=args.gradient_checkpointing,
                                     compile_backend=args.compile_backend if args.compile else None)
    run = Run(args, info, loaded, trainer, val_set, Path(args.out))
    # Resume from the latest checkpoint of --out (or refuse to overwrite one); seed the dropout RNG.
    run.start_epoch, run.train_seconds = training.resume_latest(
        run.out, loaded.model, trainer.opt, recipe, resume=args.resume, info=info, log=lambda m: _log(info, m))
    trainer.model = training.data_parallel(model, device, info)  # after restoring (unwrapped state)
    return run


def final_evaluation(run: Run) -> list[dict[str, Any]]:
    """Top-1 of the trained model for each ``--eval-r`` (demo held-out clips, or ``--val``)."""
    args, info, options = run.args, run.info, cli_args.pruning_options(run.args)
    device = run.trainer.step_cfg.device
    entries = training.eval_entries(args.method, args.r, args.eval_r, cli_args.explicit_schedule(options))
    if args.val:
        rows = training.evaluate_list(run.loaded, args.val, args.root, entries, options, info, device,
                                      run.out / "eval", dataset=args.dataset, views=args.val_views,
                                      frames=args.frames, batch_size=args.batch_size, workers=args.workers,
                                      quiet=args.quiet)
        result = [{key: row[key] for key in ("method", "r", "top1", "videos", "error")} for row in rows]
    elif run.val_set is not None:
        result = training.evaluate_clips(run.loaded, entries, options, run.val_set, info, args.batch_size,
                                         run.trainer.step_cfg.autocast)
    else:
        result = []
    training.apply_pruning(run.loaded.model, args.method, args.r, options)  # leave it as trained
    return result


def run_training(run: Run) -> dict[str, Any]:
    """Epochs ``start_epoch .. end``, a checkpoint after each; the final evaluation if finished."""
    args, info, trainer = run.args, run.info, run.trainer
    end, steps_per_epoch = args.stop_after or args.epochs, trainer.recipe["steps_per_epoch"]
    history: list[dict[str, float]] = []
    for epoch in range(run.start_epoch, end):
        bar = progress(steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}", "step",
                       enabled=not args.quiet and info.is_main)
        stats = training.train_epoch(trainer, epoch, bar, log=lambda message: _log(info, message))
        run.train_seconds += stats["seconds"]
        history.append({"epoch": epoch + 1, **stats})
        states = training.gather_rng_states(info)
        if info.is_main:
            meta = {"step": (epoch + 1) * steps_per_epoch, "recipe": trainer.recipe,
                    "train_seconds": run.train_seconds, "last_epoch": history[-1]}
            path = training.save_checkpoint(run.out, epoch + 1, run.loaded.model, trainer.opt, states, meta)
            left = end - epoch - 1
            eta = f"; about {format_duration(left * stats['seconds'])} of training left" if left else ""
            _log(info, f"epoch {epoch + 1}: loss {stats['loss']:.4f}, {stats['seconds']:.1f}s, "
                       f"{stats['clips_per_s']:.1f} clips/s; saved {path}{eta}")
        dist_utils.barrier(info)
    summary: dict[str, Any] = {"recipe": trainer.recipe, "source": run.loaded.source, "epochs_this_run": history,
                               "train_seconds": run.train_seconds, "compile": trainer.compile_note or None,
                               "world_size": info.world_size, "finished": end == args.epochs}
    if end == args.epochs:
        summary["eval"] = final_evaluation(run)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines: training time and the evaluation rows."""
    r = summary["recipe"]
    lines = [f"{summary['source']}: {r['method']} r={r['r']}, {r['epochs']} epochs, global batch "
             f"{r['global_batch']}, lr {r['lr']:.3g}, {summary['train_seconds']:.1f}s training"]
    for row in summary.get("eval", []):
        top1 = "-" if row["top1"] is None else f"{row['top1']:.2f}"
        lines.append(f"  eval {row['method']:<6} r={row['r']:<4} top-1 {top1}% on {row['videos']} clips")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``staprune finetune``: 0 on success."""
    info = dist_utils.init(resolve_device(args.device).type)
    try:
        error: BaseException | None = None
        try:
            run_ = setup(args, info)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank just below
            error = e
        dist_utils.raise_if_any(info, error)
        _log(info, f"{run_.loaded.source}: {len(run_.trainer.train_set)} training clips, "
                   f"{run_.trainer.recipe['steps_per_epoch']} steps/epoch, "
                   f"{info.world_size} process(es), lr {run_.trainer.recipe['lr']:.3g}")
        summary = run_training(run_)
        if info.is_main:
            atomic_write_json(run_.out / "summary.json", summary, indent=1)
            print(format_summary(summary))
        dist_utils.barrier(info)
        return 0
    finally:
        dist_utils.shutdown(info)


def interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves behind (printed by the CLI): resuming is offered only when something was."""
    if latest_epoch(Path(args.out)) is None:
        return "no epoch had finished; nothing was checkpointed"
    return (f"every finished epoch is checkpointed in {args.out}; run the same command with --resume to "
            "continue from the last one")


def main(argv: list[str] | None = None) -> int:
    """``python -m staprune.commands.finetune`` (the same as ``staprune finetune``)."""
    parser = argparse.ArgumentParser(prog="staprune finetune", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

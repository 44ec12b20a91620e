"""``staprune finetune``: a plain fine-tuning loop for dense or pruned (STA / random) video models.

Recipe (paper, supplementary A "Training details", minus its augmentations; see below):

* AdamW, weight decay 0.05 on weight matrices only (biases and norm parameters get none, as in the
  VideoMAE / timm fine-tuning code), betas (0.9, 0.999);
* learning rate: ``--lr`` if given, else ``--base-lr`` (1e-3) x global batch / 256, the paper's
  linear scaling rule (global batch = ``--batch-size`` per process x number of processes);
* per-step schedule: linear warm-up over ``--warmup-epochs`` (default 5 % of the epochs: the
  paper's 5 of 100), then cosine decay to 0;
* cross-entropy with label smoothing 0.1; no gradient clipping unless ``--clip-grad``.

Not implemented (the paper's K400 recipe has them): RandAugment, mixup, cutmix, repeated
augmentation. List training uses one random clip per video (``--frames`` frames, ``--stride``,
random start), short side resized to the model's size, a random square crop and a horizontal flip
with probability 0.5 (off with ``--no-flip``; it must be off for direction-sensitive data as SSV2).
``--demo`` trains on a fixed set of generated clips (:func:`staprune.demo.data.generate`) without
augmentation.

Pruning runs in train mode: the kept indices are computed without gradients, the kept tokens are
gathered with them (:mod:`staprune.adapters`). Dropout and drop-path work as in the stock model.

Checkpoints (``--out``), written by rank 0 after every epoch, atomically, JSON last:

* ``epoch_NNN.safetensors``: the model's ``state_dict`` (float32; loads into the unpatched model);
* ``epoch_NNN.train.safetensors``: flat tensors ``optimizer.state.<param index>.<key>``
  (``exp_avg``, ``exp_avg_sq``, ``step``) and ``rng.torch.rank<k>`` (each rank's CPU RNG state:
  dropout and drop-path draws);
* ``epoch_NNN.train.json``: epoch, global step (= the scheduler's position), the optimizer's
  ``param_groups`` (hyper-parameters, parameter indices), non-tensor optimizer state, the recipe,
  cumulative training seconds.

The file names and the "complete epoch" rule (all three files exist; the JSON is written last)
are :mod:`staprune.storage.runfolder`'s, which :func:`staprune.load` shares to load a run folder.
``--resume`` continues from the latest complete epoch in ``--out`` and refuses if the recipe
changed. The data order and the augmentation of epoch ``e`` are pure functions of
``(--seed, e)``, so together with the restored weights, optimizer state and RNG states a resumed
run reproduces the uninterrupted one exactly (tested bit for bit). ``--stop-after E`` ends an
invocation after epoch ``E`` without shortening the schedule (for time-sliced jobs).

Data parallel: ``torchrun --nproc-per-node N -m staprune finetune ... --rs 12`` (torchrun rejects
``--r`` as ambiguous; ``--rs`` is the same option). DistributedDataParallel on gloo (CPU) or nccl;
each step every rank takes its slice of the same global batch; the processes must share ``--out``.

Gradient checkpointing (``--gradient-checkpointing``, families that allow it: VideoMAE): the pruning
step mutates per-forward state, so it must not be re-run in backward. With transformers >= 5 the
checkpoint wrapper sits in each layer class's ``forward``; the pruning layers' patched forward
replaces the instance's ``forward``, so those layers run un-checkpointed (once) and every other
layer is checkpointed. ToMe (whose non-pruning layers read the merge sizes) and a transformers
that checkpoints whole layers from the encoder loop are rejected with an error; after every
backward the number of recorded pruning stages is checked, so a re-run never goes unnoticed.

``--compile`` wraps the model in ``torch.compile``; if the first step fails to compile, it warns
and continues eager. ``--dtype bf16`` trains under bf16 autocast (weights and optimizer fp32).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..adapters.state import get_config, pruning_stage_count, recorded_stage_count
from ..api.evaluation import check_compatible, resolve_protocol, score_clips
from ..api.loading import load
from ..api.settings import Setting, check_settings_fit, recorded
from ..core.errors import DataError, UsageError
from ..data.lists import VideoItem, load_items
from ..data.transforms import Preprocessing, normalize, resize_short_side
from ..data.video import VideoReadError, probe, read_frames
from ..data.workers import decoding_loader, loading
from ..demo.data import HELD_OUT_SEED, NUM_CLASSES, generate
from ..families import Family, LoadedModel, families, family_of
from ..runs import distributed as dist_utils
from ..runs.arguments import (
    add_device_arguments,
    add_model_arguments,
    add_pruning_arguments,
    apply_threads,
    check_pruning_options,
    check_threads,
    explicit_schedule,
    pruning_options,
)
from ..runs.devices import resolve_device
from ..runs.list_evaluation import ListEvaluation
from ..runs.progress import format_duration, progress
from ..runs.training import build_optimizer, lr_at
from ..storage.outputs import writable_dir
from ..storage.runfolder import (
    atomic_write,
    atomic_write_json,
    check_no_results,
    claim_folder,
    differences,
    epoch_files,
    latest_epoch,
)

METHODS = ("sta", "random", "none")
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}
FORMAT_VERSION = 1
# Recipe fields that must not change between a run and its resumption.
RECIPE_KEYS = (
    "model",
    "data",
    "demo",
    "train_clips",
    "data_seed",
    "method",
    "r",
    "epochs",
    "lr",
    "global_batch",
    "weight_decay",
    "warmup_steps",
    "label_smoothing",
    "clip_grad",
    "seed",
    "dtype",
    "frames",
    "stride",
    "flip",
    "init",
    "options",
)


# --- CLI ----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``staprune finetune`` (the recipe is in the module docstring)."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="training list file ('path label' lines) or folder per class")
    src.add_argument("--demo", action="store_true", help="train on generated demo clips (staprune.demo.data)")
    add_model_arguments(parser, note=" (default with --demo: demo-vit)")
    parser.add_argument(
        "--init",
        default="auto",
        choices=("auto", "bundled", "random"),
        help="demo models: bundled weights (auto: if present) or a random init from --seed",
    )
    parser.add_argument("--root", help="base directory of relative paths in the lists")
    parser.add_argument("--val", help="validation list, evaluated at the end through `staprune eval`'s loop")
    parser.add_argument(
        "--dataset", default="k400", choices=("k400", "ssv2"), help="validation view protocol"
    )
    parser.add_argument("--val-views", help="CLIPSxCROPS for validation (default: the protocol's)")
    parser.add_argument("--frames", type=int, help="frames per training clip (default: the protocol's)")
    parser.add_argument(
        "--stride", type=int, help="temporal stride of training clips (default: the protocol's)"
    )
    parser.add_argument("--image-size", type=int, help="input side for release .pth / registry models")
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flip")
    parser.add_argument(
        "--train-clips", type=int, default=2048, help="--demo: size of the fixed training set"
    )
    parser.add_argument(
        "--val-clips", type=int, default=600, help="--demo: held-out clips for the final top-1"
    )
    parser.add_argument(
        "--data-seed",
        type=int,
        default=1,
        help="--demo: seed of the training clips (the demo models were trained on seed 0)",
    )
    parser.add_argument(
        "--method", default="sta", choices=METHODS, help="pruning while training (none = dense)"
    )
    parser.add_argument(
        "--r",
        "--rs",
        dest="r",
        type=int,
        metavar="R",
        help="tokens dropped per unit at the first stage (spell it --rs under torchrun); default: the middle of "
        "the model's three levels",
    )
    parser.add_argument(
        "--eval-r",
        type=int,
        nargs="+",
        metavar="R",
        help="r values for the final evaluation, 0 = dense (default: the training r)",
    )
    parser.add_argument("--epochs", type=int, default=3, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=16, help="clips per step per process")
    parser.add_argument(
        "--lr", type=float, help="peak learning rate (default: --base-lr x global batch / 256)"
    )
    parser.add_argument("--base-lr", type=float, default=1e-3, help="learning rate per 256 clips of global batch")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay of weight matrices")
    parser.add_argument(
        "--warmup-epochs", type=float, help="linear warm-up length (default: 5%% of --epochs)"
    )
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    parser.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm (0: no clipping)")
    parser.add_argument("--dtype", default="fp32", choices=tuple(AUTOCAST), help="bf16 = autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (eager fallback)")
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (e.g. aot_eager)"
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="HF VideoMAE only")
    parser.add_argument(
        "--seed", type=int, default=0, help="init (random), data order, augmentation, dropout"
    )
    parser.add_argument("--out", default="finetune-out", help="checkpoint / result directory")
    parser.add_argument("--resume", action="store_true", help="continue from the latest epoch in --out")
    parser.add_argument(
        "--stop-after", type=int, help="end this invocation after this epoch (schedule unchanged)"
    )
    parser.add_argument("--workers", type=int, default=2, help="decoding workers (--data)")
    add_device_arguments(parser, dtype=False)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_pruning_arguments(parser, seed_flag=False)  # --seed is the training seed here


# --- recipe -------------------------------------------------------------------------------------
def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The paper's linear scaling rule: ``base_lr * global_batch / 256``."""
    return base_lr * global_batch / 256


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (order matters), so (seed, epoch, rank) streams never collide."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


def epoch_plan(num_items: int, epoch: int, seed: int, global_batch: int) -> tuple[Tensor, Tensor]:
    """Which items each step of ``epoch`` uses, and one augmentation seed per item.

    A pure function of ``(seed, epoch)``: resuming needs no sampler state. The last partial
    global batch is dropped (every rank must take the same number of steps).

    Returns:
        indices ``(steps, global_batch)`` long; seeds ``(steps, global_batch)`` long.
    """
    steps = num_items // global_batch
    if steps == 0:
        raise UsageError(f"{num_items} training clips cannot fill one global batch of {global_batch}")
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, 0xDA7A))
    order = torch.randperm(num_items, generator=g)[: steps * global_batch]
    seeds = torch.randint(0, 2**62, (steps * global_batch,), generator=g)
    return order.view(steps, global_batch), seeds.view(steps, global_batch)


# --- data ---------------------------------------------------------------------------------------
class ClipTensorSet:
    """Clips held in memory as uint8 ``(N, T, 3, H, W)`` with labels ``(N,)`` (the demo data)."""

    def __init__(self, clips: Tensor, labels: Tensor, prep: Preprocessing):
        self.clips, self.labels, self.prep = clips, labels, prep

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised float ``(B, T, 3, H, W)`` and labels ``(B,)``."""
        x = self.clips[indices].float().div_(255.0)
        mean = torch.tensor(self.prep.mean).view(3, 1, 1)
        std = torch.tensor(self.prep.std).view(3, 1, 1)
        return (x - mean) / std, self.labels[indices]


class ListClipSet(Dataset):
    """One random training clip per video of a list; item ``(index, seed)`` -> ``(views, label)``.

    The clip is ``frames`` frames at ``stride`` from a random start (indices past the end repeat the
    last frame), short side resized to ``prep.size``, a random ``size x size`` crop, an optional
    horizontal flip, normalised: float ``(T, 3, size, size)``. All randomness comes from ``seed``.
    """

    def __init__(self, items, frames: int, stride: int, prep: Preprocessing, flip: bool):
        self.items, self.frames, self.stride, self.prep, self.flip = list(items), frames, stride, prep, flip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        index, seed = key
        for attempt in range(len(self.items)):  # an unreadable video is replaced by the next one
            item = self.items[(index + attempt) % len(self.items)]
            try:
                return self._clip(item.path, seed), item.label
            except VideoReadError as e:  # opened at setup, fails to decode now: one line, the next video instead
                print(f"staprune finetune: skipping training video {item.path}: {e.reason}", file=sys.stderr, flush=True)
        raise DataError("no training video of the list could be decoded; check --data and --root")

    def _clip(self, path: Path, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(int(seed))
        n = probe(path).num_frames
        span = (self.frames - 1) * self.stride + 1
        start = int(torch.randint(0, max(1, n - span + 1), (1,), generator=g))
        frames = read_frames(path, [min(start + k * self.stride, n - 1) for k in range(self.frames)])
        x = resize_short_side(frames, self.prep.size)  # (T, 3, H', W') in [0, 1]
        size = self.prep.size
        top = int(torch.randint(0, x.shape[-2] - size + 1, (1,), generator=g))
        left = int(torch.randint(0, x.shape[-1] - size + 1, (1,), generator=g))
        x = x[..., top : top + size, left : left + size]
        if self.flip and bool(torch.rand(1, generator=g) < 0.5):
            x = x.flip(-1)
        return normalize(x, self.prep.mean, self.prep.std).contiguous()


def rank_batches(
    dataset, indices: Tensor, seeds: Tensor, info: dist_utils.DistInfo, workers: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """This rank's batches of one epoch: its contiguous slice of every global batch ``(steps, G)``."""
    per_rank = indices.shape[1] // info.world_size
    part = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
    mine_i, mine_s = indices[:, part], seeds[:, part]
    if isinstance(dataset, ClipTensorSet):
        for row in mine_i:
            yield dataset.batch(row)
        return
    keys = [(int(i), int(s)) for i, s in zip(mine_i.flatten(), mine_s.flatten(), strict=True)]
    loader = decoding_loader(dataset, workers, batch_size=per_rank, sampler=keys, drop_last=False)
    with loading(loader) as batches:
        yield from batches


# --- model --------------------------------------------------------------------------------------
def apply_pruning(model: nn.Module, method: str, r: int | None, options: dict | None = None) -> nn.Module:
    """(Re-)patch ``model`` for ``method`` at ``r`` (and other STAConfig ``options``); ``none`` or r=0
    is the dense setting."""
    return Setting.of(method, r or 0, options if method != "none" else None).apply(model)


def logits_of(model: nn.Module, x: Tensor, family: Family) -> Tensor:
    """Logits ``(B, classes)`` of views ``(B, T, 3, H, W)``, put into the model's layout by its family."""
    return family.logits(model(family.to_input(x)))


def enable_checkpointing(model: nn.Module) -> None:
    """Turn on Hugging Face activation (gradient) checkpointing, under either of its names, where the
    model's family allows it with pruning (:attr:`~staprune.families.Family.supports_gradient_checkpointing`)."""
    family = family_of(model)
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
        model, "gradient_checkpointing_enable", None
    )
    if enable is None or not family.supports_gradient_checkpointing:
        supported = ", ".join(f.title for f in families() if f.supports_gradient_checkpointing)
        raise UsageError(f"--gradient-checkpointing is available for {supported}, not {family.title}")
    enable()


def checkpointing_enabled(model: nn.Module) -> bool:
    """``model.is_activation_checkpointing`` (transformers >= 5.x) or ``is_gradient_checkpointing``."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name) or name in vars(model):
            return bool(getattr(model, name))
    return False


def check_gradient_checkpointing(model: nn.Module) -> None:
    """Refuse gradient checkpointing where backward's re-run would touch pruning state.

    Raises:
        ValueError: checkpointing is on and the model prunes with ToMe, or the installed
            transformers checkpoints whole layers (``layer.__call__``) from the encoder loop.
    """
    if not checkpointing_enabled(model):
        return
    cfg = get_config(model)
    if cfg is None or cfg.method == "none":
        return
    if cfg.method == "tome":
        raise UsageError(
            "gradient checkpointing cannot be combined with ToMe: the re-run layers read merge "
            "sizes that later layers have already changed; turn one of them off"
        )
    layer_cls = type(family_of(model).blocks(model)[0][0])
    if not hasattr(layer_cls.forward, "__wrapped__"):
        raise UsageError(
            "gradient checkpointing with pruning needs transformers >= 5 (checkpointing inside each layer's "
            "forward, which the pruning layers replace); this version would re-run the pruning step in "
            "backward. Turn off --gradient-checkpointing."
        )


def assert_pruned_once(model: nn.Module) -> None:
    """After backward: each pruning stage of the last forward was applied exactly once (a re-run by
    gradient checkpointing would append to the kept-token record again)."""
    expected = pruning_stage_count(model)
    if expected is None:
        return
    kept = recorded_stage_count(model)
    if kept != expected:
        raise RuntimeError(
            f"pruning state was updated {kept} times for {expected} stages in one step: a "
            "pruning layer was re-run (gradient checkpointing?); its kept-token record is wrong"
        )


# --- one step -----------------------------------------------------------------------------------
@dataclass
class StepConfig:
    """What every training step needs besides the batch."""

    family: Family
    autocast: torch.dtype | None
    label_smoothing: float
    clip_grad: float
    device: torch.device


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, lr: float, cfg: StepConfig, check=None
) -> Tensor:
    """One optimizer step on views ``x`` ``(B, T, 3, H, W)``, labels ``y`` ``(B,)``; returns the loss.

    ``check``: called after backward, before the update (the pruning-state guard).
    """
    for group in opt.param_groups:
        group["lr"] = lr
    with torch.autocast(
        cfg.device.type, dtype=cfg.autocast or torch.float32, enabled=cfg.autocast is not None
    ):
        logits = logits_of(model, x, cfg.family)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if check is not None:
        check()
    if cfg.clip_grad > 0:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    opt.step()
    return loss.detach()


def try_compile(model: nn.Module, first_step, backend: str = "inductor") -> tuple[nn.Module, str]:
    """``torch.compile(model)`` and run ``first_step(compiled)``; on failure warn and use ``model``.

    Returns the module to train with and a one-line account of what happened.
    """
    try:
        compiled = torch.compile(model, backend=backend)
        first_step(compiled)
        return compiled, "torch.compile: ok"
    except Exception as e:  # noqa: BLE001 - any compiler failure means: train eager instead
        import torch._dynamo as dynamo

        dynamo.reset()
        message = f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); training eager"
        warnings.warn(message, stacklevel=2)
        return model, message


# --- checkpoints --------------------------------------------------------------------------------
def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Optimizer state as flat named tensors plus JSON-able metadata (param_groups, scalars)."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            name = f"optimizer.state.{index}.{key}"
            if isinstance(value, Tensor):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer`: a ``state_dict`` for ``Optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    items = [(k, v) for k, v in tensors.items() if k.startswith("optimizer.state.")]
    for name, value in [*items, *meta["scalars"].items()]:
        index, key = name[len("optimizer.state.") :].split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    out: Path,
    epoch: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    rng_states: Sequence[Tensor],
    meta: dict[str, Any],
) -> Path:
    """Write epoch ``epoch``'s three files (JSON last: its presence marks a complete checkpoint)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    claim_folder(out, "finetune")  # marks the folder (checked before the training started)
    files = epoch_files(out, epoch)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors, opt_meta = flatten_optimizer(opt)
    tensors.update({f"rng.torch.rank{k}": s.contiguous() for k, s in enumerate(rng_states)})
    atomic_write(files.weights, lambda p: save_file(state, str(p)))
    atomic_write(files.train_tensors, lambda p: save_file(tensors, str(p)))
    doc = {
        "format": FORMAT_VERSION,
        "epoch": epoch,
        **meta,
        "optimizer": opt_meta,
        "world_size": len(rng_states),
    }
    atomic_write_json(files.train_json, doc, indent=1)
    return files.weights


def load_checkpoint(out: Path, epoch: int) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """(model state_dict, training tensors, training JSON) of epoch ``epoch``."""
    from safetensors.torch import load_file

    files = epoch_files(out, epoch)
    return (
        load_file(str(files.weights)),
        load_file(str(files.train_tensors)),
        json.loads(files.train_json.read_text(encoding="utf-8")),
    )


def check_recipe(stored: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Raise ValueError naming every recipe field that differs from the checkpoint's."""
    changed = differences(stored, current, RECIPE_KEYS)
    if changed:
        raise UsageError(f"cannot resume from {where}: the recipe changed ({changed})")


# --- evaluation ---------------------------------------------------------------------------------
def top1_on_clips(
    loaded: LoadedModel,
    setting: Setting,
    data: ClipTensorSet,
    info: dist_utils.DistInfo,
    batch: int,
    autocast: torch.dtype | None,
) -> float:
    """Top-1 (percent) of ``loaded`` under ``setting`` over all clips of ``data``, sharded over ranks
    and summed."""
    mine = torch.arange(len(data))[info.rank :: info.world_size]
    scores = score_clips(loaded, data.clips[mine], data.labels[mine], (setting,), batch_size=batch,
                         autocast=autocast)[setting]
    return 100.0 * sum(dist_utils.all_gather(info, scores.correct1)) / max(1, len(data))


def eval_entries(method: str, train_r: int | None, eval_r: Sequence[int] | None,
                 schedule: bool = False) -> list[tuple[str, int]]:
    """(method, r) pairs for the final evaluation; r=0 is dense. Under an explicit ``schedule`` (it
    gives every stage's r) the one entry is the trained setting, as ``(method, 0)``."""
    if schedule and method != "none":
        return [(method, 0)]
    rs = list(eval_r) if eval_r else [train_r if method != "none" and train_r else 0]
    pruned = "sta" if method == "none" else method
    return [("none", 0) if r == 0 else (pruned, r) for r in dict.fromkeys(rs)]


def evaluate_list(
    args: argparse.Namespace,
    loaded: LoadedModel,
    info: dist_utils.DistInfo,
    entries: Sequence[tuple[str, int]],
    device: torch.device,
    out: Path,
) -> list[dict[str, Any]]:
    """Evaluate ``--val`` with the multi-view protocol, into resumable run folders under ``out``."""
    proto = resolve_protocol(loaded.protocol(args.dataset), args.val_views, args.frames, None)
    items, _ = load_items(args.val, args.root)
    check_compatible(loaded, proto, items)
    loaded.model.eval()
    evaluation = ListEvaluation(loaded, items, proto, out, str(args.val), device, batch_size=args.batch_size,
                                workers=args.workers, resume=True, quiet=args.quiet, info=info)
    options = pruning_options(args)
    return [evaluation.evaluate(Setting.of(m, r, options if m != "none" else None)) for m, r in entries]


# --- the run ------------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything the epoch loop needs, built by :func:`setup`."""

    args: argparse.Namespace
    info: dist_utils.DistInfo
    loaded: LoadedModel
    train_set: Any
    val_set: ClipTensorSet | None
    model: nn.Module  # what forward runs on (maybe DDP / compiled)
    opt: torch.optim.AdamW
    step_cfg: StepConfig
    recipe: dict[str, Any]
    steps_per_epoch: int
    out: Path
    start_epoch: int = 0
    train_seconds: float = 0.0
    compile_note: str = ""


def _log(info: dist_utils.DistInfo, message: str) -> None:
    if info.is_main:
        print(f"staprune finetune: {message}", file=sys.stderr, flush=True)


def _check_args(args: argparse.Namespace) -> None:
    check_pruning_options(args)
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
    check_threads(args)
    if args.eval_r and explicit_schedule(pruning_options(args)):
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


def _check_fits(args: argparse.Namespace, loaded: LoadedModel, frames: int, size: int) -> None:
    """The trained setting and every ``--eval-r`` fit the model's token grid, before any clip is made or read."""
    options = pruning_options(args)
    entries = [(args.method, args.r or 0)] + eval_entries(args.method, args.r, args.eval_r,
                                                           explicit_schedule(options))
    settings = [Setting.of(m, r, options if m != "none" else None) for m, r in entries]
    check_settings_fit(loaded.family, loaded.model, settings, frames, size)


def _datasets(args: argparse.Namespace, loaded: LoadedModel) -> tuple[Any, ClipTensorSet | None, int, int]:
    """(training set, demo held-out set or None, frames, stride) for ``args``."""
    frames, stride, size = _clip_shape(args, loaded)
    if args.demo:
        if loaded.num_classes < NUM_CLASSES:
            raise UsageError(f"--demo has {NUM_CLASSES} classes; the model has {loaded.num_classes}")
        train = ClipTensorSet(*generate(args.train_clips, args.data_seed, frames, size), loaded.preprocessing)
        held = ClipTensorSet(
            *generate(args.val_clips, HELD_OUT_SEED, frames, size), loaded.preprocessing
        )
        return train, held, frames, stride
    items, _ = load_items(args.data, args.root)
    bad = [it for it in items if it.label >= loaded.num_classes]
    if not items or bad:
        raise UsageError(f"training list is empty or has labels >= the model's {loaded.num_classes} classes")
    return ListClipSet(_readable(items), frames, stride, loaded.preprocessing, args.flip), None, frames, stride


def _readable(items: Sequence[VideoItem]) -> list[VideoItem]:
    """The training videos that open (their headers read), the others said once, with the first reason."""
    readable, failed = [], []
    for item in items:
        try:
            probe(item.path)
            readable.append(item)
        except VideoReadError as err:
            failed.append((item.path, err.reason))
    if not readable:
        raise DataError(f"no training video of the list could be read (first: {failed[0][0]}: {failed[0][1]}); "
                        "check --data and --root")
    if failed:
        print(f"staprune finetune: {len(failed)} of {len(items)} training videos cannot be read and are left out "
              f"(first: {failed[0][0]}: {failed[0][1]})", file=sys.stderr, flush=True)
    return readable


def _recipe(
    args: argparse.Namespace, info: dist_utils.DistInfo, steps_per_epoch: int, frames: int, stride: int
) -> dict[str, Any]:
    global_batch = args.batch_size * info.world_size
    warmup_epochs = args.warmup_epochs if args.warmup_epochs is not None else 0.05 * args.epochs
    return {
        "model": args.model,
        "data": None if args.demo else str(args.data),
        "demo": bool(args.demo),
        "train_clips": args.train_clips if args.demo else None,
        "data_seed": args.data_seed if args.demo else None,
        "method": args.method,
        "r": args.r if args.method != "none" else None,
        "epochs": args.epochs,
        "lr": args.lr if args.lr else scaled_lr(args.base_lr, global_batch),
        "global_batch": global_batch,
        "batch_per_process": args.batch_size,
        "weight_decay": args.weight_decay,
        "warmup_steps": max(1, round(warmup_epochs * steps_per_epoch)),
        "steps_per_epoch": steps_per_epoch,
        "label_smoothing": args.label_smoothing,
        "clip_grad": args.clip_grad,
        "seed": args.seed,
        "dtype": args.dtype,
        "frames": frames,
        "stride": stride,
        "flip": bool(args.flip) if args.data else None,
        "init": None,  # filled in by setup: where the initial weights came from
        "options": recorded(pruning_options(args)) or None,  # the other STAConfig fields set
        # Not compared on resume; what `staprune.load` needs to rebuild the architecture.
        "weights": args.weights,
        "image_size": args.image_size,
    }


def setup(args: argparse.Namespace, info: dist_utils.DistInfo) -> Run:
    """Load the model and data, patch, wrap (DDP), build the optimizer, restore a checkpoint."""
    _check_args(args)
    apply_threads(args)
    device = resolve_device(args.device, info.local_rank if info.distributed else None)
    args.model = args.model or ("demo-vit" if args.demo else None)
    if args.model is None:
        raise UsageError("--model is required with --data")
    if info.is_main:
        claim_folder(writable_dir(args.out), "finetune")  # before the model is loaded or a clip decoded
    torch.manual_seed(args.seed)  # a random init (--init random, or auto without bundled weights) follows the seed
    loaded = load(args.model, args.weights, frames=args.frames, image_size=args.image_size, init=args.init)
    loaded.model.train()
    if args.method != "none" and not args.r and not explicit_schedule(pruning_options(args)):
        args.r = loaded.default_r()
        _log(info, f"--r not given: training at r={args.r}, the middle of this model's levels {loaded.default_levels()}")
    frames, _, size = _clip_shape(args, loaded)
    _check_fits(args, loaded, frames, size)
    train_set, val_set, frames, stride = _datasets(args, loaded)
    global_batch = args.batch_size * info.world_size
    steps_per_epoch = len(train_set) // global_batch
    if steps_per_epoch == 0:
        raise UsageError(f"{len(train_set)} training clips cannot fill one global batch of {global_batch}")
    recipe = _recipe(args, info, steps_per_epoch, frames, stride)
    recipe["init"] = loaded.source
    model = apply_pruning(loaded.model, args.method, args.r, pruning_options(args))
    if args.gradient_checkpointing:
        enable_checkpointing(model)
        check_gradient_checkpointing(model)
    model.to(device).train()
    opt = build_optimizer(model, recipe["lr"], args.weight_decay, loaded.family.no_weight_decay)
    out = Path(args.out)
    run = Run(
        args,
        info,
        loaded,
        train_set,
        val_set,
        model,
        opt,
        StepConfig(loaded.family, AUTOCAST[args.dtype], args.label_smoothing, args.clip_grad, device),
        recipe,
        steps_per_epoch,
        out,
    )
    _restore(run)
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        run.model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return run


def _restore(run: Run) -> None:
    """Resume from the latest checkpoint of ``--out`` (or refuse to overwrite one); seed dropout RNG."""
    info, out = run.info, run.out
    latest = latest_epoch(out)
    check_no_results(out, latest is not None, run.args.resume, f"checkpoints (epoch {latest})")
    torch.manual_seed(mix_seed(run.args.seed, info.rank, 0xD20))  # dropout / drop-path stream of this rank
    if latest is None:
        if run.args.resume:
            _log(info, f"nothing to resume in {out}; starting from epoch 0")
        return
    weights, tensors, doc = load_checkpoint(out, latest)
    check_recipe(doc["recipe"], run.recipe, out)
    run.loaded.model.load_state_dict(weights, strict=True)
    run.opt.load_state_dict(unflatten_optimizer(tensors, doc["optimizer"]))
    rng = tensors.get(f"rng.torch.rank{info.rank}")
    if rng is not None and doc["world_size"] == info.world_size:
        torch.set_rng_state(rng)
    else:
        _log(info, "world size changed since the checkpoint: dropout RNG reseeded")
    run.start_epoch, run.train_seconds = latest, float(doc.get("train_seconds", 0.0))
    _log(info, f"resumed from {out} at epoch {latest} (step {doc['step']})")


def _progress(run: Run, epoch: int):
    return progress(run.steps_per_epoch, f"epoch {epoch + 1}/{run.args.epochs}", "step",
                    enabled=not run.args.quiet and run.info.is_main)


def train_epoch(run: Run, epoch: int) -> dict[str, float]:
    """One epoch; returns its mean loss (this rank), seconds and training clips/s (all ranks)."""
    r = run.recipe
    total_steps = r["steps_per_epoch"] * r["epochs"]
    indices, seeds = epoch_plan(len(run.train_set), epoch, run.args.seed, r["global_batch"])
    bar = _progress(run, epoch)
    # Under gradient checkpointing: verify after every backward that no pruning step was re-run.
    guard = (lambda: assert_pruned_once(run.loaded.model)) if run.args.gradient_checkpointing else None
    losses: list[float] = []
    run.model.train()
    start = time.perf_counter()
    for i, (x, y) in enumerate(rank_batches(run.train_set, indices, seeds, run.info, run.args.workers)):
        step = epoch * r["steps_per_epoch"] + i
        lr = lr_at(step, total_steps, r["warmup_steps"], r["lr"])
        x, y = x.to(run.step_cfg.device), y.to(run.step_cfg.device)
        if run.args.compile and not run.compile_note:
            first: list[float] = []
            run.model, run.compile_note = try_compile(
                run.model,
                backend=run.args.compile_backend,
                first_step=lambda m, x=x, y=y, lr=lr, first=first: first.append(
                    float(train_step(m, run.opt, x, y, lr, run.step_cfg))
                ),
            )
            _log(run.info, run.compile_note)
            if first:  # the compiled model has taken this step already
                losses.extend(first)
                _advance(bar, losses, lr)
                continue
        losses.append(float(train_step(run.model, run.opt, x, y, lr, run.step_cfg, guard)))
        _advance(bar, losses, lr)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    clips = r["steps_per_epoch"] * r["global_batch"]
    return {"loss": sum(losses) / max(1, len(losses)), "seconds": seconds, "clips_per_s": clips / seconds}


def _advance(bar, losses: list[float], lr: float | None = None) -> None:
    if bar is not None:
        bar.update(1)
        post = {"loss": f"{losses[-1]:.3f}"}
        if lr is not None:
            post["lr"] = f"{lr:.2e}"
        bar.set_postfix(post)


def final_evaluation(run: Run) -> list[dict[str, Any]]:
    """Top-1 of the trained model for each ``--eval-r`` (demo held-out clips, or ``--val``)."""
    args, info = run.args, run.info
    entries = eval_entries(args.method, args.r, args.eval_r, explicit_schedule(pruning_options(args)))
    model = run.loaded.model
    if args.val:
        rows = evaluate_list(args, run.loaded, info, entries, run.step_cfg.device, run.out / "eval")
        result = [
            {
                "method": row["method"],
                "r": row["r"],
                "top1": row["top1"],
                "videos": row["videos"],
                "error": row["error"],
            }
            for row in rows
        ]
    elif run.val_set is not None:
        result = []
        for method, r in entries:
            setting = Setting.of(method, r, pruning_options(args) if method != "none" else None)
            top1 = top1_on_clips(run.loaded, setting, run.val_set, info, args.batch_size, run.step_cfg.autocast)
            result.append({"method": method, "r": r, "top1": top1, "videos": len(run.val_set)})
    else:
        result = []
    apply_pruning(model, args.method, args.r, pruning_options(args))  # leave it as trained
    return result


def _rng_states(info: dist_utils.DistInfo) -> list[Tensor]:
    return dist_utils.all_gather(info, torch.get_rng_state())


def run_training(run: Run) -> dict[str, Any]:
    """Epochs ``start_epoch .. end``, a checkpoint after each; the final evaluation if finished."""
    args, info = run.args, run.info
    end = args.stop_after or args.epochs
    history: list[dict[str, float]] = []
    for epoch in range(run.start_epoch, end):
        stats = train_epoch(run, epoch)
        run.train_seconds += stats["seconds"]
        history.append({"epoch": epoch + 1, **stats})
        states = _rng_states(info)
        if info.is_main:
            meta = {
                "step": (epoch + 1) * run.steps_per_epoch,
                "recipe": run.recipe,
                "train_seconds": run.train_seconds,
                "last_epoch": history[-1],
            }
            path = save_checkpoint(run.out, epoch + 1, run.loaded.model, run.opt, states, meta)
            left = end - epoch - 1
            eta = f"; about {format_duration(left * stats['seconds'])} of training left" if left else ""
            _log(
                info,
                f"epoch {epoch + 1}: loss {stats['loss']:.4f}, {stats['seconds']:.1f}s, "
                f"{stats['clips_per_s']:.1f} clips/s; saved {path}{eta}",
            )
        dist_utils.barrier(info)
    summary: dict[str, Any] = {
        "recipe": run.recipe,
        "source": run.loaded.source,
        "epochs_this_run": history,
        "train_seconds": run.train_seconds,
        "compile": run.compile_note or None,
        "world_size": info.world_size,
        "finished": end == args.epochs,
    }
    if end == args.epochs:
        summary["eval"] = final_evaluation(run)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines: training time and the evaluation rows."""
    r = summary["recipe"]
    lines = [
        f"{summary['source']}: {r['method']} r={r['r']}, {r['epochs']} epochs, global batch "
        f"{r['global_batch']}, lr {r['lr']:.3g}, {summary['train_seconds']:.1f}s training"
    ]
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
        _log(
            info,
            f"{run_.loaded.source}: {len(run_.train_set)} training clips, "
            f"{run_.steps_per_epoch} steps/epoch, "
            f"{info.world_size} process(es), lr {run_.recipe['lr']:.3g}",
        )
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

"""Train the bundled demo models from scratch on CPU: ``python -m staprune.demo.train``.

Recipe (reproducible: seeded model init, seeded data, seeded batch order and augmentation):
a fixed training set of generated clips (``--train-clips``, seed ``--data-seed``), AdamW,
linear warm-up then cosine decay, label smoothing, gradient clipping, CPU bf16 autocast
(``--no-bf16``: fp32). Augmentation uses
the symmetries of the generator, with the labels mapped accordingly: a horizontal flip swaps
left/right and the two rotations, a vertical flip swaps up/down and the two rotations, playing
the clip backwards swaps every class with its reverse (left/right, up/down, cw/ccw,
grow/shrink, appear/disappear); eight times the distinct clips at no generation cost. Half of
the tubelet-embedding filters start as temporal differences (:func:`temporal_difference_init`).
The Swin trains through staprune's fused window attention (``patch(r=0)``: same function).
After training, the weights are rounded to fp16 (as shipped), evaluated on held-out clips of
another seed, and written with a JSON model card (recipe, minutes, held-out top-1).
Weights go to ``--out`` (default ``./demo-weights``); only ``--install`` writes into the installed
package, replacing the bundled ones. ``--init-from W.safetensors`` runs a further cosine cycle from earlier weights (a warm
restart); the earlier card is nested in the new one's recipe, so the chain stays reproducible.
``--init-stage1-from-vit W.safetensors`` (Swin only) starts the Swin's patch embedding and stage 1
from a trained demo ViT's tubelet embedding and first four layers (:mod:`.vit_to_swin`); that
ViT's card is recorded likewise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api.evaluation import score_clips
from ..api.patching import unpatch
from ..api.settings import Setting
from ..core.errors import CheckpointError, NotFoundError
from ..families.base import LoadedModel
from ..storage.runfolder import atomic_write
from ..training.optim import build_optimizer, lr_at
from .data import HELD_OUT_SEED, NUM_CLASSES, generate
from .models import (
    BUILDERS,
    DEMO_MODELS,
    WEIGHTS_DIR,
    as_loaded,
    load_weights,
    roundtrip_fp16,
    save_demo_weights,
)
from .vit_to_swin import init_swin_stage1_from_vit

# Label permutations under the generator's symmetries (index = old label, value = new label).
# Classes: 0 left, 1 right, 2 up, 3 down, 4 cw, 5 ccw, 6 grow, 7 shrink, 8 appear, 9 disappear,
# 10 still, 11 shake.
HFLIP = torch.tensor([1, 0, 2, 3, 5, 4, 6, 7, 8, 9, 10, 11])
VFLIP = torch.tensor([0, 1, 3, 2, 5, 4, 6, 7, 8, 9, 10, 11])
REVERSE = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 10, 11])

DEFAULTS = {  # per model: steps, batch size, peak learning rate
    "demo-vit": {"steps": 7000, "batch": 16, "lr": 5e-4},
    "demo-swin": {"steps": 4000, "batch": 16, "lr": 5e-4},
}


def augment(clips: Tensor, labels: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random label-consistent flips / time reversal of uint8 clips (B, T, 3, H, W)."""
    b = clips.shape[0]
    clips, labels = clips.clone(), labels.clone()
    for perm, dim in ((HFLIP, -1), (VFLIP, -2), (REVERSE, 1)):
        pick = (torch.rand(b, generator=g) < 0.5).nonzero().flatten()
        if pick.numel():
            clips[pick] = clips[pick].flip(dim)
            labels[pick] = perm[labels[pick]]
    return clips, labels


def evaluate(loaded: LoadedModel, clips: Tensor, labels: Tensor, batch: int = 32) -> float:
    """Top-1 accuracy (fraction) of the dense model on uint8 clips (N, T, 3, H, W)."""
    scores = score_clips(loaded, clips, labels, (Setting(),), batch_size=batch)[Setting()]
    return scores.correct1 / max(1, len(labels))


def temporal_difference_init(model: nn.Module, fraction: float = 0.5) -> None:
    """Make a ``fraction`` of the tubelet-embedding filters temporal differences (w[:, :, 1] = -w[:, :, 0]).

    The first Conv3d over two frames is the tubelet / patch embedding of both architectures. A
    filter whose two temporal taps cancel responds only to what changes between the frames (motion,
    and noise) and not to the static textured background, so the moving object stands out in
    those channels from the first step: an initialisation prior (as in temporal-difference
    networks), not a change of architecture or data; training is free to undo it.
    """
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv3d) and m.kernel_size[0] == 2)
    k = int(conv.out_channels * fraction)
    with torch.no_grad():
        conv.weight[:k, :, 1] = -conv.weight[:k, :, 0]


def load_init_weights(model: nn.Module, path: Path) -> str | dict:
    """Load ``path`` (a ``.safetensors`` written by this trainer) into ``model``; return its card.

    Raises:
        FileNotFoundError: no such file. ValueError: the weights do not fit ``model``.
    """
    if not path.exists():
        raise NotFoundError(f"--init-from {path}: no such file (a .safetensors written by this trainer)")
    try:
        load_weights(model, path)
    except RuntimeError as err:
        raise CheckpointError(f"--init-from {path} does not fit this model's architecture: {err}") from err
    return _card_of(path)


def _card_of(weights: Path) -> str | dict:
    card = weights.with_suffix(".json")
    return json.loads(card.read_text()) if card.exists() else f"weights from {weights.name}"


def init_stage1_from_vit(swin: nn.Module, path: Path) -> dict:
    """Start ``swin``'s patch embedding and stage 1 from the demo-ViT weights at ``path``; return
    the init description for the model card (the ViT's own card nested).

    Raises:
        FileNotFoundError: no such file. ValueError: not demo-ViT weights.
    """
    if not path.exists():
        raise NotFoundError(f"--init-stage1-from-vit {path}: no such file (demo-vit weights, "
                                f"e.g. {WEIGHTS_DIR / 'demo-vit.safetensors'})")
    vit = BUILDERS["demo-vit"]()
    try:
        load_weights(vit, path)
    except RuntimeError as err:
        raise CheckpointError(f"--init-stage1-from-vit {path} are not demo-vit weights: {err}") from err
    init_swin_stage1_from_vit(swin, vit)
    return {"patch embedding and stage 1": "demo-vit tubelet embedding and layers 0-3 "
                                           "(relative-position tables 0; patch norm, stage 2, head fresh)",
            "demo-vit": _card_of(path)}


def train_one(name: str, clips: Tensor, labels: Tensor, held: tuple[Tensor, Tensor], args) -> dict:
    """Train demo model ``name`` on uint8 ``clips`` (N, T, 3, H, W), evaluate on ``held``, write
    weights and model card."""
    hp = DEFAULTS[name]
    steps = args.steps or hp["steps"]
    batch, peak = hp["batch"], args.lr or hp["lr"]
    torch.manual_seed(args.seed)
    model = BUILDERS[name]()
    init = "half the tubelet-embedding filters temporal differences"
    if args.init_stage1_from_vit:
        init = init_stage1_from_vit(model, Path(args.init_stage1_from_vit))
    elif args.init_from:
        # A further cosine cycle from earlier weights (warm restart): the earlier run's card
        # goes into this one's, so the whole chain stays reproducible from scratch.
        init = load_init_weights(model, Path(args.init_from))
    else:
        temporal_difference_init(model)
    loaded = as_loaded(name, model)
    family, prep = loaded.family, loaded.preprocessing
    # Train as staprune's dense model (r=0: no pruning): the Swin through its fused window attention,
    # the same function as stock to float rounding, gradients included; the weights are unaffected.
    Setting().apply(model)
    opt = build_optimizer(model, peak, 0.05, family.no_weight_decay)
    g = torch.Generator().manual_seed(args.seed + 1)
    warmup = max(1, steps // 20)
    order = torch.empty(0, dtype=torch.long)
    out_dir = WEIGHTS_DIR if args.install else Path(args.out)
    ckpt_path = out_dir / f"{name}.ckpt.pt"
    first, elapsed = 0, 0.0
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        g.set_state(ckpt["batch_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        order, first, elapsed = ckpt["order"], ckpt["step"], ckpt["elapsed"]
        print(f"[{name}] resumed from {ckpt_path} at step {first}", file=sys.stderr, flush=True)
    start = time.time() - elapsed
    model.train()
    for step in range(first, steps):
        if order.numel() < batch:  # reshuffle each epoch
            order = torch.cat([order, torch.randperm(len(labels), generator=g)])
        idx, order = order[:batch], order[batch:]
        x, y = augment(clips[idx], labels[idx], g)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, warmup, peak)
        # bf16 autocast: ~1.5x (ViT) to 2x (Swin) faster steps on CPUs with bf16 instructions.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = family.logits(model(family.to_input(prep.normalize_pixels(x))))
        loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            acc = (logits.argmax(-1) == y).float().mean().item()
            print(f"[{name}] step {step}/{steps} loss {loss.item():.3f} batch-acc {acc:.2f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} {time.time() - start:.0f}s", file=sys.stderr, flush=True)
        if args.eval_every and step and step % args.eval_every == 0:
            acc = evaluate(loaded, held[0][:96], held[1][:96])
            print(f"[{name}] step {step} held-out(96) top-1 {acc:.3f}", file=sys.stderr, flush=True)
            model.train()
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and step + 1 < steps:
            # Everything the next step depends on, so a resumed run continues bit-identically.
            out_dir.mkdir(parents=True, exist_ok=True)
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "batch_rng": g.get_state(),
                     "torch_rng": torch.get_rng_state(), "order": order, "step": step + 1,
                     "elapsed": time.time() - start}
            atomic_write(ckpt_path, lambda tmp, state=state: torch.save(state, tmp))
    minutes = (time.time() - start) / 60
    unpatch(model)
    roundtrip_fp16(model)  # measure what ships
    top1 = evaluate(loaded, *held)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_demo_weights(model, name, out_dir / f"{name}.safetensors")
    card = {
        "model": name,
        "classes": NUM_CLASSES,
        "input": "(B, 3, 16, 112, 112)" if family.input_layout == "BCTHW" else "(B, 16, 3, 112, 112)",
        "normalisation": "x / 255, then (x - 0.5) / 0.5",
        "held_out_top1": round(top1, 4),
        "held_out_clips": len(held[1]),
        "held_out_seed": HELD_OUT_SEED,
        "weights": "fp16 safetensors (accuracy measured after the fp16 round trip)",
        "recipe": {
            "train_clips": len(labels), "data_seed": args.data_seed, "seed": args.seed, "steps": steps,
            "batch": batch, "optimizer": "AdamW(betas=(0.9, 0.999), weight_decay=0.05; none on norms/biases)",
            "lr": peak, "schedule": f"linear warm-up {warmup} steps, cosine to 0", "label_smoothing": 0.1,
            "grad_clip": 1.0, "init": init, "precision": "bf16 autocast" if args.bf16 else "fp32",
            "augment": "hflip, vflip, time reversal (labels mapped)",
            "threads": torch.get_num_threads(), "train_minutes": round(minutes, 1),
        },
    }
    (out_dir / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    ckpt_path.unlink(missing_ok=True)  # the finished weights supersede it
    print(f"[{name}] held-out top-1 {top1:.4f} on {len(held[1])} clips; {minutes:.1f} min", file=sys.stderr)
    return card


def load_or_generate(n: int, seed: int, cache: str | None) -> tuple[Tensor, Tensor]:
    """Generate clips, or reuse a copy cached by an earlier run (the data are a pure function of n, seed)."""
    path = Path(cache) / f"demo_clips_{n}_{seed}.pt" if cache else None
    if path is not None and path.exists():
        data = torch.load(path, weights_only=True)
        return data["clips"], data["labels"]
    clips, labels = generate(n, seed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save({"clips": clips, "labels": labels}, tmp))
    return clips, labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m staprune.demo.train", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*DEMO_MODELS, "all"], default="all")
    parser.add_argument("--train-clips", type=int, default=6144)
    parser.add_argument("--held-out-clips", type=int, default=600)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="model init / batch order / augmentation seed")
    parser.add_argument("--steps", type=int, default=0, help="override the per-model default")
    parser.add_argument("--lr", type=float, default=0.0, help="override the per-model default")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="train under CPU bf16 autocast (default on)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default=None, help="directory to cache the generated training set in")
    parser.add_argument("--checkpoint-every", type=int, default=250,
                        help="write a resumable training checkpoint every N steps (0: never)")
    parser.add_argument("--init-from", default=None,
                        help="start from these weights (.safetensors) instead of a fresh init: another "
                             "cosine cycle; the earlier model card is recorded in the new one")
    parser.add_argument("--init-stage1-from-vit", default=None, metavar="VIT.safetensors",
                        help="demo-swin only: start its patch embedding and stage 1 from these trained demo-vit "
                             "weights (same shapes: tubelet embedding + first four layers); the rest fresh")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in --out if there is one")
    parser.add_argument("--out", default="demo-weights",
                        help="where to write the weights and model cards (default: ./demo-weights)")
    parser.add_argument("--install", action="store_true",
                        help="write them into the installed package (replacing the bundled weights) instead of --out")
    args = parser.parse_args(argv)
    if args.init_stage1_from_vit and args.model != "demo-swin":
        parser.error("--init-stage1-from-vit starts a Swin from a ViT: use it with --model demo-swin")
    if args.init_stage1_from_vit and args.init_from:
        parser.error("--init-stage1-from-vit and --init-from are two different starts: give one")
    torch.set_num_threads(args.threads)
    t = time.time()
    clips, labels = load_or_generate(args.train_clips, args.data_seed, args.cache)
    held = load_or_generate(args.held_out_clips, HELD_OUT_SEED, args.cache)
    print(f"data ready in {time.time() - t:.0f}s", file=sys.stderr, flush=True)
    names = DEMO_MODELS if args.model == "all" else (args.model,)
    for name in names:
        train_one(name, clips, labels, held, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

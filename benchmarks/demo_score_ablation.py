"""Which half of STA's score earns its place on a demo model: score ablation + object-token recall.

On held-out generated clips (``staprune.demo.data``, which also renders the class-defining
object's alpha mask), one bundled demo model is run dense and pruned at one level with
STA's full score ``A*(1-F)`` (``score="sta"``), the temporal accumulation alone
(``"temporal"``), the semantic term alone (``"semantic"``), random drop, and ToMe (ViT only),
all on the same batches. For each setting it prints

* top-1 and agreement with the dense model's predictions;
* **object-token recall**: of the tokens of the last pruned stage's grid that touch the
  foreground object (its alpha > 0 anywhere in the token's 2 frames x cell pixels), the share
  still kept after the last stage, pooled over clips. Every dropping method keeps the same
  number of tokens, so recall compares *which* tokens they keep. (ToMe merges instead of
  dropping; its representatives are not comparable and it gets no recall.)

    python benchmarks/demo_score_ablation.py --model demo-vit --r 12 --clips 600
    python benchmarks/demo_score_ablation.py --model demo-swin --r 12 --clips 600
    python benchmarks/demo_score_ablation.py --model demo-vit --r 37 --locations 3 --clips 300
    python benchmarks/demo_score_ablation.py --smoke   # CI: the same code on 8 clips, seconds; not a result

The README's "Why STA loses more than ToMe" / "Why STA falls below random" tables come from it.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

import staprune
from staprune.demo.data import generate_with_masks
from staprune.demo.models import DEMO_MODELS

# Token cell of the last pruned stage on each demo model: (frames per token, pixels per side).
# demo-vit: tubelet 2 x patch 16 (8 x 7x7 tokens); demo-swin: stage 2 after one 2x2 patch
# merging of its 2x16x16 patches (8 x 4x4 tokens, the last row/column half padding).
CELL = {"demo-vit": (2, 16), "demo-swin": (2, 32)}
SCORES = ("sta", "temporal", "semantic")
# --smoke: the same code path at a tiny setting (CI runs it so the script cannot rot); explicit
# options still override these.
SMOKE = {"clips": 8, "batch": 8, "threads": 1}
SMOKE_NOTE = "SMOKE RUN (--smoke): a tiny setting that checks the script runs; its numbers are not a result"


def settings(net: torch.nn.Module, model: str, r: int, locations: tuple[int, ...] | None = None) -> list[tuple[str, dict]]:
    where = {"locations": locations} if locations else {}
    out = [("dense", {})]
    out += [(f"STA score={s!r}", {"r": r, "method": "sta", "score": s, **where}) for s in SCORES]
    out.append(("random", {"r": r, "method": "random", **where}))
    if model == "demo-vit" and r <= (net.config.image_size // net.config.patch_size) ** 2 // 2:
        # ToMe's one bipartite merge round per unit merges at most half of a tubelet-frame's tokens.
        out.append(("ToMe", {"r": r, "method": "tome", **where}))
    return out


def object_tokens(masks: torch.Tensor, frames_per_token: int, cell: int) -> torch.Tensor:
    """Which tokens touch the object: masks (B, T, H, W) alpha -> (B, T', gh*gw) bool, with the
    grid padded at the bottom/right like Swin's patch merging (no-op for the ViT's 7x16=112)."""
    h, w = masks.shape[-2:]
    gh, gw = -(-h // cell), -(-w // cell)
    padded = F.pad(masks, (0, gw * cell - w, 0, gh * cell - h))
    pooled = F.max_pool3d(padded[:, None], (frames_per_token, cell, cell))[:, 0]  # (B, T', gh, gw)
    return (pooled > 0).flatten(2)


def run(args: argparse.Namespace) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = staprune.load(args.model, init="bundled")  # the bundled trained weights, or an error
    net = loaded.model
    clips, labels, masks = generate_with_masks(args.clips, args.seed)
    configs = settings(net, args.model, args.r, tuple(args.locations) if args.locations else None)
    correct, agree, hit = [0] * len(configs), [0] * len(configs), [0] * len(configs)
    kept_share: list[float | None] = [None] * len(configs)  # the same for every clip: fixed counts
    total_obj = 0
    frames_per_token, cell = CELL[args.model]
    with torch.inference_mode():
        for start in range(0, len(labels), args.batch):
            x = loaded.to_input(loaded.preprocessing.normalize_pixels(clips[start:start + args.batch]))
            y = labels[start:start + args.batch]
            obj = object_tokens(masks[start:start + args.batch], frames_per_token, cell).flatten(1)
            total_obj += int(obj.sum())
            dense_pred = None
            for i, (_, options) in enumerate(configs):
                staprune.unpatch(net)
                if options:
                    staprune.patch(net, **options)
                pred = loaded.family.logits(net(x)).argmax(-1)
                dense_pred = pred if dense_pred is None else dense_pred
                correct[i] += int((pred == y).sum())
                agree[i] += int((pred == dense_pred).sum())
                if options and options["method"] != "tome":
                    kept = staprune.kept_tokens(net)[-1]  # (B, K) flat indices in that stage's grid
                    if int(kept.max()) >= obj.shape[1]:
                        raise RuntimeError(f"kept index beyond the {obj.shape[1]}-token grid of CELL[{args.model!r}]")
                    hit[i] += int(obj.gather(1, kept).sum())
                    kept_share[i] = kept.shape[1] / obj.shape[1]
            print(f"  {min(start + args.batch, len(labels))}/{len(labels)} clips", file=sys.stderr, flush=True)
    staprune.unpatch(net)
    n = len(labels)
    rows = []
    for i, (name, options) in enumerate(configs):
        pruned = kept_share[i] is not None
        rows.append({
            "setting": name,
            "top1": correct[i] / n,
            "agrees_with_dense": agree[i] / n,
            "object_token_recall": (hit[i] / total_obj) if pruned else (None if options else 1.0),
            "kept_share": kept_share[i],
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=DEMO_MODELS, default="demo-vit")
    parser.add_argument("--r", type=int, default=12, help="ViT: r per tubelet-frame; Swin: r1")
    parser.add_argument("--locations", type=int, nargs="+", default=None,
                        help="ViT block indices to prune after (default: the paper's 0, L//3, 2L//3)")
    parser.add_argument("--clips", type=int, default=600)
    parser.add_argument("--seed", type=int, default=7, help="the demo's default evaluation seed")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CI check: 8 clips, 1 thread (seconds); not a result")
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
        print(SMOKE_NOTE, file=sys.stderr if args.json else sys.stdout)
    rows = run(args)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    where = f", pruning after blocks {args.locations}" if args.locations else ""
    print(f"{args.model}, r={args.r}{where}, {args.clips} clips (seed {args.seed})")
    print(f"{'setting':<24} {'top-1':>6} {'agrees':>7} {'obj. recall':>11} {'kept':>5}")
    for row in rows:
        recall = "—" if row["object_token_recall"] is None else f"{row['object_token_recall']:.2f}"
        kept = "—" if row["kept_share"] is None else f"{row['kept_share']:.2f}"
        print(f"{row['setting']:<24} {100 * row['top1']:>6.1f} {100 * row['agrees_with_dense']:>6.1f}% "
              f"{recall:>11} {kept:>5}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

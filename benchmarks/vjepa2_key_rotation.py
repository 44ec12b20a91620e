"""V-JEPA 2: take STA's similarity from the keys before or after their rotary rotation? Both, measured.

V-JEPA 2 adds no position to its tokens; each attention rotates queries and keys by the token's
(frame, row, column). STA's transition compares the tokens of one temporal unit with those of the
previous one, so the choice decides whether "seen before" means *same content* (keys before the
rotation) or *same content at the same relative place* (after it: the cosine of two rotated keys is
their content seen through a rotation by their frame/row/column offsets).

The model: the bundled demo ViT's encoder transplanted into a V-JEPA 2 classifier of the same width
(patch embedding, attention, MLP and norms copied; VideoMAE's additive sinusoidal positions dropped,
V-JEPA 2's rotary ones instead; a fresh attentive pooler), fine-tuned on generated demo clips so it
learns to use rotary positions (``--steps``; cached with ``--cache``). Then, on held-out clips and
the same batches for every setting:

* top-1 of dense, STA with keys before the rotation, STA with keys after it, and random drop, at
  the demo ViT's three levels (identical FLOPs for the three pruned settings at each level);
* object-token recall (the share of tokens touching the class-defining object still kept after
  the last stage, from the generator's masks), and the overlap of the two STA choices' kept sets;
* on static clips (one frame repeated): how often a token's best match in the previous tubelet-frame
  (cosine of block-0 keys, the first stage's metric) is itself at the same place.

    python benchmarks/vjepa2_key_rotation.py --steps 1500 --clips 600 --threads 2 --cache /tmp/vjepa2_demo.safetensors
    python benchmarks/vjepa2_key_rotation.py --smoke   # CI: 2 steps, 8 clips, seconds; not a result
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import staprune
from staprune.demo.data import HELD_OUT_SEED, generate, generate_with_masks
from staprune.demo.models import LEVELS, preprocessing
from staprune.families import family_of
from staprune.families.vjepa2 import patch_vjepa2

TRAIN_SEED = 1  # training clips from another seed than the demo's held-out one
# --smoke: the same code path at a tiny setting (CI runs it so the script cannot rot); explicit
# options still override these. No --cache: a smoke run never writes weights.
SMOKE = {"steps": 2, "batch": 4, "train_clips": 8, "clips": 8, "static_clips": 4, "threads": 1, "cache": None}
SMOKE_NOTE = "SMOKE RUN (--smoke): a tiny setting that checks the script runs; its numbers are not a result"


def model_input(model: torch.nn.Module, clips: torch.Tensor) -> torch.Tensor:
    """uint8 clips (B, T, 3, H, W) -> normalised as the demo models' inputs, in ``model``'s layout."""
    return family_of(model).to_input(preprocessing().normalize_pixels(clips))


def transplant() -> torch.nn.Module:
    """A V-JEPA 2 classifier whose encoder carries the trained demo ViT's weights (positions aside)."""
    from transformers import VJEPA2Config, VJEPA2ForVideoClassification

    vit = staprune.load("demo-vit", init="bundled").model  # the bundled trained weights, or an error
    hf = vit.config
    torch.manual_seed(0)
    model = VJEPA2ForVideoClassification(VJEPA2Config(
        patch_size=hf.patch_size, crop_size=hf.image_size, frames_per_clip=hf.num_frames, tubelet_size=hf.tubelet_size,
        hidden_size=hf.hidden_size, num_attention_heads=hf.num_attention_heads, num_hidden_layers=hf.num_hidden_layers,
        mlp_ratio=hf.intermediate_size / hf.hidden_size, num_pooler_layers=1, num_labels=vit.config.num_labels,
        layer_norm_eps=hf.layer_norm_eps, pred_num_hidden_layers=1,
    ))
    src, dst = vit.videomae, model.vjepa2.encoder
    with torch.no_grad():
        dst.embeddings.patch_embeddings.proj.load_state_dict(src.embeddings.patch_embeddings.projection.state_dict())
        for a, b in zip(src.encoder.layer, dst.layer, strict=True):
            att = a.attention.attention
            for name in ("query", "key", "value"):  # VideoMAE has no key bias: zero
                dst_linear, src_linear = getattr(b.attention, name), getattr(att, name)
                dst_linear.weight.copy_(src_linear.weight)
                dst_linear.bias.copy_(src_linear.bias if src_linear.bias is not None else torch.zeros_like(dst_linear.bias))
            b.attention.proj.load_state_dict(a.attention.output.dense.state_dict())
            b.norm1.load_state_dict(a.layernorm_before.state_dict())
            b.norm2.load_state_dict(a.layernorm_after.state_dict())
            b.mlp.fc1.load_state_dict(a.intermediate.dense.state_dict())
            b.mlp.fc2.load_state_dict(a.output.dense.state_dict())
        dst.layernorm.load_state_dict(vit.fc_norm.state_dict())
    return model


def fine_tune(model: torch.nn.Module, steps: int, batch: int, lr: float, train_clips: int) -> list[float]:
    """AdamW (staprune finetune's recipe: warm-up, cosine decay, label smoothing 0.1), random batches
    from a fixed set of generated training clips; returns the per-step losses."""
    from staprune import training

    clips, labels = generate(train_clips, TRAIN_SEED)
    opt = training.build_optimizer(model, lr, 0.05)
    cfg = training.StepConfig(family_of(model), None, 0.1, 1.0, torch.device("cpu"))
    losses, g = [], torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(labels), (batch,), generator=g)
        x = model_input(model, clips[idx])
        losses.append(float(training.train_step(model, opt, x, labels[idx], training.lr_at(step, steps, steps // 20, lr), cfg)))
        if step % 100 == 0:
            print(f"  step {step}: loss {sum(losses[-100:]) / len(losses[-100:]):.3f}", file=sys.stderr, flush=True)
    return losses


def object_tokens(masks: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W) alpha -> (B, T/2 * 7*7) tokens that touch the object (2 frames x 16x16 pixels)."""
    return (F.max_pool3d(masks[:, None], (2, 16, 16))[:, 0] > 0).flatten(1)


def settings(r: int) -> list[tuple[str, dict | None, bool]]:
    return [("STA, keys before rotation", {"r": r}, False), ("STA, keys after rotation", {"r": r}, True),
            ("random", {"r": r, "method": "random"}, False)]


def evaluate(model: torch.nn.Module, clips: int, batch: int, levels: tuple[int, ...]) -> list[dict]:
    data, labels, masks = generate_with_masks(clips, HELD_OUT_SEED)
    rows = {("dense", 0): {"setting": "dense", "r": 0, "correct": 0, "hit": 0, "overlap": []}}
    for r in levels:
        for name, _, _ in settings(r):
            rows[(name, r)] = {"setting": name, "r": r, "correct": 0, "hit": 0, "overlap": []}
    total_obj = 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, clips, batch):
            x = model_input(model, data[start:start + batch])
            y = labels[start:start + batch]
            obj = object_tokens(masks[start:start + batch])
            total_obj += int(obj.sum())
            staprune.unpatch(model)
            rows[("dense", 0)]["correct"] += int((model(x).logits.argmax(-1) == y).sum())
            for r in levels:
                kept_sets = {}
                for name, options, rotated in settings(r):
                    staprune.unpatch(model)
                    patch_vjepa2(model, staprune.STAConfig(**options), rotated_keys=rotated)
                    pred = model(x).logits.argmax(-1)
                    kept = staprune.kept_tokens(model)[-1]
                    live = torch.zeros_like(obj).scatter_(1, kept, True)
                    row = rows[(name, r)]
                    row["correct"] += int((pred == y).sum())
                    row["hit"] += int((live & obj).sum())
                    row["kept_share"] = kept.shape[1] / obj.shape[1]
                    kept_sets[rotated, options.get("method", "sta")] = live
                before, after = kept_sets[False, "sta"], kept_sets[True, "sta"]
                overlap = ((before & after).sum(1) / before.sum(1)).tolist()
                rows[("STA, keys after rotation", r)]["overlap"] += overlap
    staprune.unpatch(model)
    out = []
    for row in rows.values():
        row["top1"] = 100 * row.pop("correct") / clips
        row["object_recall"] = row.pop("hit") / total_obj if row["r"] else 1.0
        overlap = row.pop("overlap")
        if overlap:
            row["kept_overlap_with_before"] = sum(overlap) / len(overlap)
        out.append(row)
    return out


def static_match(model: torch.nn.Module, clips: int = 32) -> dict[str, float]:
    """On clips of one repeated frame: share of block-0 key tokens whose best cosine match in the
    previous tubelet-frame is at the same place, with keys before and after the rotation."""
    data, _ = generate(clips, HELD_OUT_SEED + 1)
    x = model_input(model, data[:, :1].expand(-1, data.shape[1], -1, -1, -1))
    layer = model.vjepa2.encoder.layer[0]
    seen = {}
    handle = layer.attention.key.register_forward_hook(lambda m, a, o: seen.__setitem__("k", o))
    with torch.inference_mode():
        staprune.unpatch(model)
        model(x)
    handle.remove()
    attn = layer.attention
    keys = seen["k"].view(clips, -1, attn.num_attention_heads, attn.attention_head_size).transpose(1, 2)
    positions = torch.arange(keys.shape[2]).expand(clips, -1)
    rotated = attn.apply_rotary_embeddings(keys, attn.get_position_ids(keys, masks=positions))
    out = {}
    for name, k in (("before", keys), ("after", rotated)):
        m = F.normalize(k.mean(1), dim=-1).view(clips, 8, 49, -1)  # (B, T', N, d), heads averaged
        best = (m[:, 1:] @ m[:, :-1].transpose(-1, -2)).argmax(-1)  # (B, T'-1, N): best match in frame t-1
        out[name] = float((best == torch.arange(49)).float().mean())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--train-clips", type=int, default=6144)
    parser.add_argument("--clips", type=int, default=600, help="held-out clips for the comparison")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--cache", help="safetensors file to store / reuse the fine-tuned weights")
    parser.add_argument("--static-clips", type=int, default=32, help="static clips for the best-match count")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="CI check: 2 fine-tuning steps on 8 clips, 8 held-out clips, 1 thread (seconds); "
                        "not a result")
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
        print(SMOKE_NOTE)
    if args.threads:
        torch.set_num_threads(args.threads)
    from safetensors.torch import load_file, save_file

    model = transplant()
    start = time.time()
    if args.cache and Path(args.cache).is_file():
        model.load_state_dict(load_file(args.cache))
        print(f"fine-tuned weights from {args.cache}", file=sys.stderr)
    else:
        losses = fine_tune(model, args.steps, args.batch, args.lr, args.train_clips)
        tail = losses[-100:]
        print(f"fine-tuned {args.steps} steps in {time.time() - start:.0f} s, mean loss of the last {len(tail)} "
              f"{sum(tail) / len(tail):.3f}", file=sys.stderr)
        if args.cache:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.cache)
    rows = evaluate(model, args.clips, 32, LEVELS["demo-vit"])
    static = static_match(model, args.static_clips)
    print(f"{'setting':<28}{'r':>4}{'top-1':>8}{'object recall':>15}{'kept share':>12}{'overlap':>9}")
    for row in rows:
        overlap = row.get("kept_overlap_with_before")
        print(f"{row['setting']:<28}{row['r']:>4}{row['top1']:>8.1f}{row['object_recall']:>15.3f}"
              f"{row.get('kept_share', 1.0):>12.2f}{'' if overlap is None else f'{overlap:.2f}':>9}")
    print(f"static clips: best match in the previous tubelet-frame is the same place for "
          f"{100 * static['before']:.1f}% of tokens (keys before rotation) vs {100 * static['after']:.1f}% (after)")
    if args.json:
        print(json.dumps({"rows": rows, "static": static}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

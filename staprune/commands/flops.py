"""``staprune flops``: the paper's FLOPs tables, one model's GFLOPs for some r, or the r for a budget."""

from __future__ import annotations

import argparse
import json

from torch import nn

from ..api.flops import analytic_flops, measure_model, paper_tables, r_for_budget, resolve_spec
from ..api.loading import load
from ..api.settings import recorded
from ..core.config import STAConfig
from ..core.errors import UsageError
from ..families import VIDEO_LLM, family_named, family_of_spec, find_model, levels_of
from ..families.video_llms.base import prefill_flops
from ..runs.arguments import (
    add_keep_argument,
    add_method_argument,
    add_pruning_arguments,
    check_pruning_options,
    explicit_schedule,
    pruning_options,
    refuse_keep,
    video_llm_settings,
)
from ..runs.video_llm_timing import setting_label


# --- CLI ----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``staprune flops``."""
    parser.add_argument("--model", help="registry name (ViT-B, VideoSwin-T, ViViT-B, demo-vit, ...) or a local "
                        "model path; default: every model of the paper's tables")
    parser.add_argument("--r", type=int, nargs="+", help="r (ViT) or r1 (Video Swin); default the model's levels")
    add_method_argument(parser)
    add_keep_argument(parser)
    parser.add_argument("--frames", type=int, help="input frames (default: the model's)")
    parser.add_argument("--size", type=int, help="input side in pixels (default: the model's)")
    parser.add_argument("--measured", action="store_true",
                        help="count a forward pass of a random-weight model with FlopCounterMode")
    parser.add_argument("--target", type=float, metavar="FRACTION",
                        help="print the smallest r whose GFLOPs are at most FRACTION x dense")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    add_pruning_arguments(parser)


def default_levels(name: str, spec) -> tuple[int, ...]:
    """r values to tabulate for ``name`` when none are given: 0 and the model's three levels."""
    return (0, *levels_of(name, spec))


def _options(args: argparse.Namespace) -> dict[str, object]:
    return {"method": args.method, **pruning_options(args)}


def _row(args: argparse.Namespace, name: str, spec, net: nn.Module | None, r: int, options: dict) -> dict:
    """One JSON row at ``r`` with the STAConfig ``options``; ``net`` is the built model when counting
    with FlopCounterMode."""
    dense = analytic_flops(spec, 0).gflops
    if net is not None:
        count = measure_model(net, r, frames=args.frames, size=args.size, method=args.method, **options)
    else:
        count = analytic_flops(spec, r, method=args.method, **options)
    row = {
        "model": name,
        "r": r,
        "method": args.method,
        "options": recorded(options),
        "gflops": round(count.gflops, 3),
        "selection_gflops": round(count.selection / 1e9, 4),
        "fraction_of_dense": round(count.gflops / dense, 4),
        "counted": "measured" if args.measured else "analytic",
    }
    entry = find_model(name)
    paper = (entry.paper_gflops or {}) if entry is not None else {}
    default_input = args.frames is None and args.size is None and args.method == "sta" and not pruning_options(args)
    if default_input and r in paper:
        row["paper_gflops"] = paper[r]
    return row


def _r_label(name: str) -> str:
    entry = find_model(name)
    return family_named(entry.family).r_name if entry is not None else "r"


def _print_tables(rows: list[dict]) -> None:
    """Rows grouped by pruning levels: one line per model, one ``ours (paper)`` cell per r."""
    by_model: dict[str, list[dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row)
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, model_rows in by_model.items():
        label = _r_label(name)
        heads = tuple("schedule" if isinstance(row["options"].get("schedule"), list) else f"{label}={row['r']}"
                      for row in model_rows)
        groups.setdefault(heads, []).append(name)
    for heads, names in groups.items():
        width = max(len(n) for n in names) + 2
        print(f"{'model':<{width}}" + "".join(f"{head:>20}" for head in heads))
        for name in names:
            cells = []
            for row in by_model[name]:
                cell = f"{row['gflops']:.1f}"
                if "paper_gflops" in row:
                    cell += f" ({row['paper_gflops']:g})"
                cells.append(f"{cell:>20}")
            print(f"{name:<{width}}" + "".join(cells))
        print()
    counted = rows[0]["counted"] if rows else "analytic"
    print(f"GFLOPs per view ({counted}; 1 multiply-add = 1 FLOP); cells: ours (paper). "
          "STA's own selection operations are excluded (see --json selection_gflops).")


def run(args: argparse.Namespace) -> int:
    """``staprune flops``: the paper's tables, one model's GFLOPs for some r, or r for a budget."""
    check_pruning_options(args)
    if args.model is not None and not args.model.strip():
        raise UsageError("--model is empty; give a registry name or a path, or leave --model out for the paper's tables")
    names = [args.model] if args.model else list(paper_tables())
    specs = {name: resolve_spec(name, args.frames, args.size) for name in names}
    video_llms = {name: spec for name, spec in specs.items() if family_of_spec(spec).kind == VIDEO_LLM}
    if video_llms:
        return _run_video_llms(args, video_llms)
    refuse_keep(args, "this model")
    if args.target is not None:
        return _run_target(args, specs)
    rows = []
    for name, spec in specs.items():
        net = None
        if args.measured:
            net = load(name, frames=args.frames, image_size=args.size).model
        options = pruning_options(args)
        if explicit_schedule(options):  # it gives every stage's r: one row for it, beside dense
            rows += [_row(args, name, spec, net, 0, {}), _row(args, name, spec, net, 0, options)]
        else:
            rows += [_row(args, name, spec, net, r, options) for r in (args.r or default_levels(name, spec))]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_tables(rows)
    return 0


def _run_target(args: argparse.Namespace, specs: dict) -> int:
    rows = []
    for name, spec in specs.items():
        r = r_for_budget(spec, args.target, **_options(args))
        dense = analytic_flops(spec, 0).gflops
        gflops = analytic_flops(spec, r, **_options(args)).gflops
        rows.append({"model": name, "r": r, "method": args.method, "gflops": round(gflops, 3),
                     "fraction_of_dense": round(gflops / dense, 4), "target": args.target})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['model']}: r={row['r']} gives {row['gflops']:.1f} GFLOPs = "
                  f"{row['fraction_of_dense']:.3f} x dense (target <= {args.target})")
    return 0


def _run_video_llms(args: argparse.Namespace, specs: dict) -> int:
    """A video LLM: GFLOPs to the first token (vision encoder, then the language model's prefill of the
    prompt with the kept video tokens), stock vs each budget."""
    for flag in ("measured", "target"):
        if getattr(args, flag) not in (None, False):
            raise UsageError(f"--{flag} is for the video classifiers; a video LLM's count is analytic "
                             "(held against FlopCounterMode in the tests)")
    rows = []
    for name, spec in specs.items():
        family = family_of_spec(spec)
        dense = family.flops(spec, STAConfig(method="none"))
        for config in video_llm_settings(args.keep, args.r, args.methods, pruning_options(args), family.default_keep):
            count = family.flops(spec, config or STAConfig(method="none"))
            video = family.kept_video_tokens(spec, config or STAConfig(method="none"))
            rows.append({
                "model": name, "setting": setting_label(config), "frames": spec.frames, "size": spec.size,
                "options": recorded(pruning_options(args)) if config is not None else {},
                "video_tokens": video, "prompt_tokens": family.prompt_length(spec, video),
                "vision_gflops": round(sum(v for k, v in count.parts.items() if k.startswith("vision")) / 1e9, 3),
                "prefill_gflops": round(prefill_flops(count) / 1e9, 3),
                "first_token_gflops": round(count.gflops, 3),
                "prefill_fraction_of_dense": round(prefill_flops(count) / prefill_flops(dense), 4),
                "first_token_fraction_of_dense": round(count.backbone / dense.backbone, 4),
            })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = (f"{'model':22} {'setting':>16} {'video tok':>9} {'prompt tok':>10} {'vision':>9} {'prefill':>9} "
              f"{'x dense':>7} {'1st token':>9} {'x dense':>7}")
    print(header)
    for i, row in enumerate(rows):
        shown = row["model"] if i == 0 or rows[i - 1]["model"] != row["model"] else ""
        print(f"{shown:22} {row['setting']:>16} {row['video_tokens']:>9} {row['prompt_tokens']:>10} "
              f"{row['vision_gflops']:>9.1f} {row['prefill_gflops']:>9.1f} {row['prefill_fraction_of_dense']:>7.3f} "
              f"{row['first_token_gflops']:>9.1f} {row['first_token_fraction_of_dense']:>7.3f}")
    first = next(iter(specs.values()))
    print(f"GFLOPs (analytic, 1 multiply-add = 1 FLOP) of one video of {first.frames} frames at {first.size}² in a prompt "
          f"of {first.prompt_tokens} text tokens: vision = encoder + projector (pruning does not change it), prefill = "
          "the language model over the prompt with the kept video tokens, 1st token = both")
    return 0

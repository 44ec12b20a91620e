"""``staprune ablate``: the paper's ablations as one resumable run over the same videos and views.

Tables (paper Sec. 4.3 and the supplementary material), every setting on the same clips:

* ``6a`` first unit: bipartite (ToMe-style drop, the default), random, grid;
* ``6b`` temporal accumulation order: F-B-F (default), B-F-B, F-F-F, B-B-B;
* ``6c`` similarity: f_Q, f_K (default), f_V, f_FFN (queries, keys, values, block output);
* ``6d`` schedule: decreasing (default), constant, increasing, and the text's per-frame r, r/2, r/4;
* ``6e`` score: 1-F, A, (1-F)·A (default);
* ``s3`` supplementary Table 3: 2, 3 (default) and 4 STA stages; three placements of the three
  stages, spread as the paper's 1-9-17 / 3-11-19 / 5-13-21 for 24 blocks (offsets of depth/12);
* ``s2`` supplementary Table 2: top-1 for several numbers of temporal views at r = 0 and three r.

FLOPs, as the paper compares them: 6a, 6b, 6c and 6e change only which tokens are kept, so all their
rows share the default's GFLOPs. 6d and the stage count of s3 change how many tokens each block sees;
the paper compares them "maintaining a similar throughput" (6d: constant 8x48 and increasing
8x27/8x54/8x108 against decreasing 8x64/8x32/8x16) and at 302/308/305 GFLOPs (s3), so each such row
takes the r whose analytic GFLOPs are closest to the default's; the per-frame schedule drops the same
counts as decreasing (same FLOPs). The placements of s3 are compared at the same r, so later
placements cost more (the paper: 308/339/370 GFLOPs), and s2's columns are different r by design.
Every row reports the GFLOPs per view measured (``FlopCounterMode``) on the configuration that ran.

Data: ``--data LIST`` evaluates through the run-folder evaluation (multi-view protocol, per-video
records, so an interrupted setting resumes video by video; unreadable videos are counted and said
once); without it, held-out clips generated for the bundled demo models (``--clips``), evaluated in
memory. Rows are appended to ``OUT/rows.jsonl`` as each setting finishes, and ``OUT/meta.json``
records what defines them (model and a digest of its weights, data, clips, views, frames, size,
default r). ``--resume`` skips the settings already there when that definition is the same, and
refuses naming what changed otherwise, so a killed run resumes to the same table (every field but
the measured clips/s of the setting that was interrupted) and never mixes two. One run writes into
an ``--out`` at a time.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..api.evaluation import check_compatible, resolve_protocol, score_clips
from ..api.loading import load, require_model_kind
from ..api.patching import unpatch
from ..api.settings import Setting, check_settings_fit, recorded
from ..core.config import STAConfig, default_locations
from ..core.errors import ConfigError, UsageError
from ..core.flops import measure_flops
from ..data.clips import ClipTensorSet
from ..data.lists import load_items
from ..data.sampling import ViewProtocol
from ..demo.data import HELD_OUT_SEED, generate
from ..families import VIDEO_CLASSIFIER, require_kind
from ..families.base import LoadedModel
from ..runs import distributed as dist_utils
from ..runs.arguments import add_device_arguments, add_model_arguments, apply_threads
from ..runs.devices import resolve_device
from ..runs.list_evaluation import ListEvaluation, list_fingerprint
from ..runs.progress import format_duration, progress
from ..storage.outputs import writable_dir, write_error
from ..storage.runfolder import (
    RunLock,
    append_jsonl,
    atomic_write_json,
    check_no_results,
    claim_folder,
    differences,
    read_jsonl,
)

TABLES = ("6a", "6b", "6c", "6d", "6e", "s3", "s2")
INSTEAD = "compare a video LLM's budgets and methods with staprune bench, flops or visualize --keep"
TITLES = {
    "base": "Dense model",
    "6a": "Table 6a: token removal at the first unit",
    "6b": "Table 6b: temporal accumulation order",
    "6c": "Table 6c: similarity function",
    "6d": "Table 6d: dropping schedule",
    "6e": "Table 6e: scoring",
    "s3": "Supplementary Table 3: number of STA stages and their placement",
    "s2": "Supplementary Table 2: number of temporal views",
}


@dataclass(frozen=True)
class Row:
    """One row to measure: a pruning config (r and other STAConfig fields) and the temporal views."""

    table: str
    name: str
    r: int
    options: tuple[tuple[str, Any], ...] = ()
    views: int | None = None  # temporal clips; None: the protocol's
    matched: bool = False  # r chosen to match the default's FLOPs

    @property
    def key(self) -> str:
        return f"{self.table}|{self.name}|r{self.r}|v{self.views}"

    @property
    def setting(self) -> Setting:
        """What the model runs as: STA at r with the row's options (dense at r=0 with none)."""
        return Setting.of("sta", self.r, self.options) if self.r or self.options else Setting(0, "none")

    def config(self) -> STAConfig:
        return self.setting.config()


# --- which settings --------------------------------------------------------------------------------
def _closest_r(loaded: LoadedModel, spec, target: float, options: dict[str, Any], r_max: int) -> int:
    """The r whose analytic GFLOPs with ``options`` are closest to ``target``."""
    best, best_gap = None, float("inf")
    for r in range(1, r_max + 1):
        try:
            gflops = loaded.family.flops(spec, STAConfig(r=r, **options)).gflops
        except ConfigError:
            continue
        if abs(gflops - target) < best_gap:
            best, best_gap = r, abs(gflops - target)
    if best is None:
        raise ConfigError(f"no r fits {options} on this model")
    return best


def placements(depth: int) -> list[tuple[int, ...]]:
    """Three placements of three stages spread like the paper's 1-9-17 / 3-11-19 / 5-13-21 for 24
    blocks: the default ``0, L/3, 2L/3`` shifted by 0, 1 and 2 steps of ``L/12`` (at least one block);
    placements that would run past the last block are left out."""
    base = default_locations(depth)
    step = max(1, depth // 12)
    out = [tuple(b + k * step for b in base) for k in range(3)]
    return [p for p in out if p[-1] < depth]


def settings_for(tables: Sequence[str], r: int, loaded: LoadedModel, spec, temporal_views: Sequence[int],
                 s2_levels: Sequence[int]) -> list[Row]:
    """Every row of ``tables`` for a model of ``spec`` at the default ``r``."""
    family, depth = loaded.family, spec.layers
    target = family.flops(spec, STAConfig(r=r)).gflops
    r_max = 4 * r + 64
    out = [Row("base", "dense", 0)]
    for table in tables:
        if table == "6a":
            out += [Row("6a", name, r, (("first_unit", name),)) for name in ("bipartite", "random", "grid")]
        elif table == "6b":
            out += [Row("6b", "-".join(o), r, (("order", o),)) for o in ("FBF", "BFB", "FFF", "BBB")]
        elif table == "6c":
            out += [Row("6c", label, r, (("similarity", sim),))
                    for label, sim in (("f_Q", "query"), ("f_K", "key"), ("f_V", "value"), ("f_FFN", "hidden"))]
        elif table == "6d":
            for schedule in ("decreasing", "constant", "increasing", "per_frame"):
                options = {"schedule": schedule}
                if schedule in ("constant", "increasing"):
                    out.append(Row("6d", schedule, _closest_r(loaded, spec, target, options, r_max),
                                       (("schedule", schedule),), matched=True))
                else:
                    out.append(Row("6d", schedule, r, (("schedule", schedule),)))
        elif table == "6e":
            out += [Row("6e", label, r, (("score", score),))
                    for label, score in (("1-F", "semantic"), ("A", "temporal"), ("(1-F)·A", "sta"))]
        elif table == "s3":
            for stages in (2, 3, 4):
                locations = default_locations(depth, stages)
                options = {"locations": locations}
                if len(locations) != stages:
                    continue  # a model too shallow for that many stages
                matched = stages != 3
                r_k = _closest_r(loaded, spec, target, options, r_max) if matched else r
                out.append(Row("s3", f"{stages} stages", r_k, (("locations", locations),), matched=matched))
            for locations in placements(depth):
                out.append(Row("s3", "location " + "-".join(str(b + 1) for b in locations), r,
                                   (("locations", locations),)))
        elif table == "s2":
            out += [Row("s2", f"{views} views", level, views=views)
                    for views in temporal_views for level in (0, *s2_levels)]
        else:
            raise UsageError(f"--tables: unknown table {table!r}; choose from {', '.join(TABLES)}")
    return list(dict.fromkeys(out))


# --- measuring one row ---------------------------------------------------------------------------
def measured_gflops(loaded: LoadedModel, row: Row, frames: int, size: int) -> tuple[float, float]:
    """Backbone and selection GFLOPs of one view, counted on the configuration itself."""
    row.setting.apply(loaded.model)
    param = next(loaded.model.parameters())
    views = torch.randn(1, frames, 3, size, size, device=param.device, dtype=param.dtype)
    counted = measure_flops(loaded.model, loaded.to_input(views))
    return counted.backbone / 1e9, counted.selection / 1e9


class DemoClips:
    """Held-out generated clips for the bundled demo models, evaluated in memory: 16-frame clips,
    one view; for table s2, clips twice as long (the same kinds of motion, continued) read as
    ``views`` evenly spaced 16-frame windows (1: the centre one), every row on the same clips.
    Each clip set is a :class:`~staprune.data.clips.ClipTensorSet`, as ``staprune finetune --demo``'s."""

    def __init__(self, count: int, batch: int, frames: int) -> None:
        self.count, self.batch, self.frames = count, batch, frames
        self.held = ClipTensorSet(*generate(count, HELD_OUT_SEED, frames=frames))
        self._long: dict[int, ClipTensorSet] = {}

    def _views(self, views: int | None) -> tuple[ClipTensorSet, torch.Tensor | None]:
        """(clips, frame indices of each view (V, frames); None: one view of every frame)."""
        if views is None:  # every table but s2: the demo's own 16-frame clips, one view
            return self.held, None
        length = 2 * self.frames  # longer clips of the same kind, windows spread over them
        if length not in self._long:
            self._long[length] = ClipTensorSet(*generate(self.count, HELD_OUT_SEED, frames=length))
        windows = ViewProtocol(views, 1, self.frames, 1, "uniform").clip_indices(length)
        return self._long[length], torch.tensor(windows)

    def evaluate(self, loaded: LoadedModel, row: Row) -> dict[str, Any]:
        data, windows = self._views(row.views)
        setting = row.setting
        bar = progress(self.count, f"  {row.table} {row.name}", "clip")
        done = [0]

        def advance(total: int) -> None:
            bar.update(total - done[0])
            done[0] = total

        # The held-out labels for every view count: the longer clips continue the same ones.
        scores = score_clips(loaded, data.clips, self.held.labels, (setting,), batch_size=self.batch,
                             windows=windows, on_batch=advance)[setting]
        bar.close()
        return {"top1": scores.top1, "top5": scores.top5, "clips_per_s": scores.clips_per_s, "videos": self.count,
                "views": f"{scores.views}x1"}


class ListClips:
    """A dataset list, evaluated through the run-folder evaluation (per-video records: resumable)."""

    def __init__(self, evaluation: ListEvaluation, out: Path) -> None:
        self.evaluation, self.out = evaluation, out

    def evaluate(self, loaded: LoadedModel, row: Row) -> dict[str, Any]:
        base = self.evaluation.protocol
        proto = base if row.views is None else replace(base, clips=row.views)
        evaluation = replace(self.evaluation, protocol=proto, out=self.out / "runs" / f"views-{proto.clips}x{proto.crops}")
        result = evaluation.evaluate(row.setting)
        return {"top1": result["top1"], "top5": result["top5"], "clips_per_s": result["clips_per_s"],
                "videos": result["videos"], "views": result["views"], "failed": len(result["failed"]),
                "failed_reasons": result["failed_reasons"]}


# --- the run -------------------------------------------------------------------------------------
def measure(row: Row, loaded: LoadedModel, source, frames: int, size: int) -> dict[str, Any]:
    gflops, selection = measured_gflops(loaded, row, frames, size)
    result = source.evaluate(loaded, row)
    unpatch(loaded.model)
    return {"key": row.key, "table": row.table, "setting": row.name, "r": row.r,
            "options": recorded(dict(row.options)), "flops_matched": row.matched,
            "gflops": round(gflops, 4), "selection_gflops": round(selection, 5), **result}


def format_tables(rows: Sequence[dict[str, Any]]) -> str:
    """One block per table, shaped like the paper's (supplementary Table 2: views x r)."""
    lines: list[str] = []
    for table in ("base", *TABLES):
        mine = [r for r in rows if r["table"] == table]
        if not mine:
            continue
        lines += ["", TITLES[table]]
        if table == "s2":
            rs = list(dict.fromkeys(r["r"] for r in mine))
            lines.append(f"{'views':<10}" + "".join(f"{f'r={r}':>10}" for r in rs))
            for views in dict.fromkeys(r["views"] for r in mine):
                cells = {r["r"]: r["top1"] for r in mine if r["views"] == views}
                lines.append(f"{views:<10}" + "".join(f"{cells.get(r, float('nan')):>10.2f}" for r in rs))
            continue
        lines.append(f"{'setting':<16}{'r':>5}{'GFLOPs':>10}{'top-1':>8}{'top-5':>8}{'clips/s':>9}")
        for r in mine:
            mark = "*" if r["flops_matched"] else " "
            lines.append(f"{r['setting']:<16}{r['r']:>4}{mark}{r['gflops']:>10.3f}{r['top1']:>8.2f}{r['top5']:>8.2f}"
                         f"{r['clips_per_s'] or float('nan'):>9.1f}")
    if any(r["flops_matched"] for r in rows):
        lines.append("\n* r chosen so that the GFLOPs match the default's (the paper compares these at similar FLOPs).")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``staprune ablate``."""
    add_model_arguments(parser, default="demo-vit")
    parser.add_argument("--data", help="list file or folder per class (default: generated held-out demo clips)")
    parser.add_argument("--root", help="base directory of relative paths in --data")
    parser.add_argument("--dataset", default="k400", choices=("k400", "ssv2"), help="view protocol with --data")
    parser.add_argument("--tables", default=",".join(TABLES), help=f"comma-separated, from {', '.join(TABLES)} "
                        "(default: all)")
    parser.add_argument("--r", type=int, help="the default setting's r (default: the model's largest level, as "
                        "the paper's STA64 on ViT-L)")
    parser.add_argument("--views", help="CLIPSxCROPS of every table but s2 (default: the protocol's)")
    parser.add_argument("--temporal-views", help="temporal views of table s2, comma-separated (default 1,2,4 on "
                        "demo clips, 2,4,6,8 with --data)")
    parser.add_argument("--clips", type=int, default=600, help="without --data: how many demo clips (default 600)")
    parser.add_argument("--frames", type=int, help="frames per clip (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=32, help="clips per forward")
    parser.add_argument("--workers", type=int, default=2, help="decoding workers (--data)")
    add_device_arguments(parser, dtype=False)
    parser.add_argument("--out", default="ablate-results", help="folder for rows.jsonl, results.json, results.csv")
    parser.add_argument("--resume", action="store_true", help="skip the settings already in --out")
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list (tables to stderr)")


def interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves behind (printed by the CLI): resuming is offered only when something was."""
    rows = Path(args.out) / "rows.jsonl"
    if not any("key" in row for row in read_jsonl(rows)):
        return "no setting had finished; nothing was written"
    return f"every finished setting is in {rows}; run the same command with --resume to measure only the rest"


def _int_list(text: str, flag: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UsageError(f"{flag} {text!r}: give positive integers separated by commas, e.g. 1,2,4")
    return [int(p) for p in parts]


def _list_evaluation(args: argparse.Namespace, device: torch.device, info: dist_utils.DistInfo) -> ListEvaluation:
    """``--data``: the model, the list and its protocol, as ``staprune eval`` checks them."""
    loaded = load(args.model, args.weights, frames=args.frames)
    proto = resolve_protocol(loaded.protocol(args.dataset), args.views, args.frames, None)
    items, _ = load_items(args.data, args.root)
    check_compatible(loaded, proto, items)
    loaded.model.to(device=device, dtype=torch.float32)
    return ListEvaluation(loaded, items, proto, Path(args.out), str(args.data), device, batch_size=args.batch_size,
                          workers=args.workers, resume=True, quiet=True, info=info)


def _definition(args: argparse.Namespace, loaded: LoadedModel, source, frames: int, size: int, r: int,
                temporal: Sequence[int]) -> dict[str, Any]:
    """What defines this ablation's rows: resuming reuses them only when every field is the same."""
    if isinstance(source, ListClips):
        p = source.evaluation.protocol
        data = {"data": str(args.data), "list_sha1": list_fingerprint(source.evaluation.items),
                "videos": len(source.evaluation.items), "views": f"{p.clips}x{p.crops}", "stride": p.stride,
                "sampling": p.sampling}
    else:
        data = {"data": "demo clips", "clips": source.count, "seed": HELD_OUT_SEED}
    return {"model": loaded.source, "model_digest": loaded.digest(), **data, "frames": frames, "size": size,
            "default_r": r, "temporal_views": list(temporal)}


def _resumable_rows(out: Path, definition: dict[str, Any], resume: bool) -> dict[str, dict[str, Any]]:
    """The rows already in ``out`` that this run may reuse (all of them, or it refuses)."""
    done = {row["key"]: row for row in read_jsonl(out / "rows.jsonl") if "key" in row and "top1" in row}
    check_no_results(out, bool(done), resume, "ablation rows")
    meta = out / "meta.json"
    if done:
        stored = json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}
        changed = differences(stored, definition)
        if changed:
            raise UsageError(f"cannot resume {out}: its rows were measured on another definition ({changed}); "
                             "use another --out")
    atomic_write_json(meta, definition)
    return done


def run(args: argparse.Namespace) -> int:
    """``staprune ablate``: returns 0."""
    tables = [t.strip().lower() for t in args.tables.split(",") if t.strip()]
    unknown = [t for t in tables if t not in TABLES]
    if unknown or not tables:
        raise UsageError(f"--tables: unknown table(s) {unknown or args.tables!r}; choose from {', '.join(TABLES)}")
    if args.clips < 1 or args.batch_size < 1:
        raise UsageError("--clips and --batch-size must be >= 1")
    apply_threads(args)
    require_model_kind(args.model, VIDEO_CLASSIFIER, "staprune ablate", INSTEAD)
    out = writable_dir(args.out)
    claim_folder(out, "ablate")
    # Refuse existing rows without --resume before anything is loaded (the definition is checked below).
    check_no_results(out, any("key" in row for row in read_jsonl(out / "rows.jsonl")), args.resume, "ablation rows")
    device = resolve_device(args.device)

    if args.data:
        evaluation = _list_evaluation(args, device, dist_utils.init(device.type))
        loaded, proto = evaluation.loaded, evaluation.protocol
        source = ListClips(evaluation, out)
        frames, size = proto.frames, loaded.preprocessing.size
        temporal_default = [2, 4, 6, 8]
    else:
        loaded = load(args.model, args.weights, frames=args.frames)
        loaded.model.to(device)
        frames, size = args.frames or loaded.frames or 16, loaded.image_size or loaded.preprocessing.size
        source = None  # the demo clips are made once every setting is known to fit (below)
        temporal_default = [1, 2, 4]
    loaded.model.eval()
    require_kind(loaded.family, VIDEO_CLASSIFIER, "staprune ablate", INSTEAD)  # a hub id or file: known once loaded
    if not loaded.family.block_locations:
        raise UsageError(f"staprune ablate runs the paper's ablations of columnar ViTs (blocks 0, L/3, 2L/3); "
                         f"{loaded.family.title} prunes at its stages instead")
    spec = loaded.family.spec_of(loaded.model, frames, size)
    levels = loaded.default_levels(frames, size)
    r = args.r if args.r is not None else levels[-1]
    step = levels[-1] - levels[-2]
    temporal = _int_list(args.temporal_views, "--temporal-views") if args.temporal_views else temporal_default
    rows_to_measure = settings_for(tables, r, loaded, spec, temporal, (*levels[1:], levels[-1] + step))
    # Every configuration must fit before anything is measured.
    check_settings_fit(loaded.family, loaded.model, [row.setting for row in rows_to_measure], frames, size)
    if source is None:
        source = DemoClips(args.clips, args.batch_size, frames)
    with RunLock(out, command="ablate"):
        done = _resumable_rows(out, _definition(args, loaded, source, frames, size, r, temporal), args.resume)
        print(f"staprune ablate: {loaded.source}, {len(rows_to_measure)} settings ({len(done)} already done), "
              f"default r={r}", file=sys.stderr, flush=True)
        rows = _measure_all(rows_to_measure, done, loaded, source, frames, size, out / "rows.jsonl")
        report = {"model": loaded.source, "default_r": r, "clips": None if args.data else args.clips,
                  "data": args.data, "rows": rows}
        print(format_tables(rows), file=sys.stderr if args.json else sys.stdout)
        _report_failures(rows)
        atomic_write_json(out / "results.json", report)
        _write_csv(out / "results.csv", rows)
    if args.json:
        print(json.dumps([{k: v for k, v in row.items() if k != "key"} for row in rows], indent=2))
    return 0


def _measure_all(rows_to_measure: Sequence[Row], done: dict[str, dict[str, Any]], loaded: LoadedModel, source,
                 frames: int, size: int, rows_path: Path) -> list[dict[str, Any]]:
    """Every row, measured (or reused from ``done``), each appended to ``rows_path`` as it finishes."""
    rows: list[dict[str, Any]] = []
    began, measured = time.perf_counter(), 0
    todo = sum(spec_row.key not in done for spec_row in rows_to_measure)
    for i, spec_row in enumerate(rows_to_measure):
        if spec_row.key in done:
            rows.append(done[spec_row.key])
            continue
        start = time.perf_counter()
        # The default configuration is a row of almost every table: measure it once, report it in each.
        same = next((row for s, row in zip(rows_to_measure, rows, strict=False)
                     if s.config() == spec_row.config() and s.views == spec_row.views), None)
        if same is not None:
            row = {**same, "key": spec_row.key, "table": spec_row.table, "setting": spec_row.name,
                   "options": recorded(dict(spec_row.options)), "flops_matched": spec_row.matched}
        else:
            row = measure(spec_row, loaded, source, frames, size)
        append_jsonl(rows_path, row)
        rows.append(row)
        measured += 1
        left = (time.perf_counter() - began) / measured * (todo - measured)
        eta = f"; about {format_duration(left)} left" if todo > measured else ""
        print(f"  [{i + 1}/{len(rows_to_measure)}] {spec_row.table} {spec_row.name} r={spec_row.r}: "
              f"top-1 {row['top1']:.2f}, {row['gflops']:.3f} GFLOPs ({time.perf_counter() - start:.0f} s{eta})",
              file=sys.stderr, flush=True)
    return rows


def _report_failures(rows: Sequence[dict[str, Any]]) -> None:
    """Videos that could not be read (``--data``): said once, with the first reason."""
    failed = next((row for row in rows if row.get("failed")), None)
    if failed is not None:
        first = next(iter(failed["failed_reasons"].items()))
        print(f"staprune ablate: {failed['failed']} of {failed['failed'] + failed['videos']} videos could not be read "
              f"and are left out of every row (first: {first[0]}: {first[1]})", file=sys.stderr)


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    fields = ["table", "setting", "r", "options", "flops_matched", "gflops", "selection_gflops", "top1", "top5",
              "clips_per_s", "videos", "views", "failed"]
    try:
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, "options": json.dumps(row["options"])})
    except OSError as err:
        raise write_error(path, err) from err


__all__ = ["Row", "add_arguments", "format_tables", "placements", "run", "settings_for"]

"""``staprune export --model M [--r R] [options] -o model.onnx [--onnx-int8]``: a pruned video
model as ONNX, verified with ONNX Runtime on fresh clips.

The patched model is exported with the stock ``torch.onnx.export(dynamo=True)`` at the model's clip
shape with a dynamic batch axis; the kept set is computed inside the graph. ONNX Runtime then runs
clips that are not the export example and the largest difference from PyTorch is printed (exit 1
above ``--tolerance``). ``--onnx-int8`` also writes ONNX Runtime's dynamic int8 of the model
beside it (``model.int8.onnx``) and prints its difference and top-1 agreement with PyTorch fp32.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from ..api.deploy import export_onnx, max_difference, onnx_session, quantize_onnx_int8, run_onnx
from ..api.loading import load, require_model_kind
from ..api.patching import patch
from ..core.errors import UsageError
from ..families import VIDEO_CLASSIFIER, require_kind
from ..runs.arguments import (
    add_model_arguments,
    add_pruning_arguments,
    add_retired_flag,
    check_pruning_options,
    default_r,
    pruning_options,
)
from ..storage.outputs import writable_file, write_error
from ..storage.runfolder import RunLock


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, required=True)
    parser.add_argument("--r", type=int, help="tokens dropped per unit at the first stage (r1 for Swin); default: the "
                        "model's saved pruning, else the middle of its three levels; 0 exports the dense model")
    parser.add_argument("--method", choices=("sta", "random", "tome"), default="sta", help="pruning method")
    parser.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    parser.add_argument("--onnx-int8", action="store_true", help="also write ONNX Runtime's dynamic int8 model "
                        "(OUTPUT with .int8.onnx)")
    add_retired_flag(parser, "--quantize", "--quantize is now --onnx-int8 (ONNX Runtime's dynamic int8, written "
                     "beside OUTPUT)")
    add_retired_flag(parser, "--int8", "--int8 is PyTorch's dynamic int8 of bench and eval; export writes ONNX "
                     "Runtime's int8 with --onnx-int8")
    parser.add_argument("--frames", type=int, help="clip length (default: the model's)")
    parser.add_argument("--size", type=int, help="input side (default: the model's)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted |ONNX Runtime - PyTorch| logit difference (fp32 model)")
    parser.add_argument("--force", action="store_true", help="replace OUTPUT (and its .int8.onnx) when they exist")
    add_pruning_arguments(parser)


INSTEAD = "a video LLM deploys through its serving stack (transformers, vLLM, SGLang) with the patched model"

def int8_path(output: Path) -> Path:
    """Where ``--onnx-int8`` writes: ``model.onnx`` -> ``model.int8.onnx``."""
    return output.with_name(f"{output.stem}.int8.onnx")


def run(args: argparse.Namespace) -> int:
    output = writable_file(args.output, "-o", (".onnx",), replace=args.force)  # before any work
    quantized = writable_file(int8_path(output), "the int8 model", (".onnx",), replace=args.force) if args.onnx_int8 else None
    check_pruning_options(args)
    require_model_kind(args.model, VIDEO_CLASSIFIER, "staprune export", INSTEAD)  # before the model is built
    try:
        import onnxruntime  # noqa: F401  (checked before the export, which takes a while)
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise UsageError(f"staprune export needs the export extra: pip install 'staprune[export]' ({err.name} is "
                         "missing)") from err
    # One export writes a folder at a time (a second stops at once instead of reading a half-written
    # file); the folder is created now, not after the export.
    with RunLock(output.parent, "the folder of -o"):
        writable_file(output, "-o", (".onnx",), replace=args.force)  # again, now that no other export can write
        with tempfile.TemporaryDirectory(dir=output.parent, prefix=".staprune-export-") as staging:
            status = _export(args, output.name, Path(staging))
            # Published only whole: the model (with its external data, if the exporter wrote any) and the
            # int8 model move into place by rename; --force without --onnx-int8 drops an older int8 model,
            # which no longer matches the model beside it.
            for path in sorted(Path(staging).iterdir()):
                os.replace(path, output.parent / path.name)
            if args.force and quantized is None:
                int8_path(output).unlink(missing_ok=True)
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB)")
    if quantized is not None:
        print(f"wrote {quantized} ({quantized.stat().st_size / 2**20:.1f} MiB, ONNX Runtime dynamic int8)")
    return status


def _export(args: argparse.Namespace, name: str, staging: Path) -> int:
    """Export, verify and (``--onnx-int8``) quantize into the empty folder ``staging``; returns the exit
    status (1: ONNX Runtime differs beyond ``--tolerance``)."""
    loaded = load(args.model, args.weights, frames=args.frames, image_size=args.size)
    family = loaded.family
    require_kind(family, VIDEO_CLASSIFIER, "staprune export", INSTEAD)
    spec = family.spec_of(loaded.model, args.frames or loaded.frames, args.size or loaded.image_size)
    r = default_r(args, loaded.default_r(spec.frames, spec.size))
    patch(loaded.model, r=r, method=args.method if r else "none", **(pruning_options(args) if r else {}))
    loaded.model.eval()
    example = family.example_input(spec, 2)  # batch 2: an exporter specialises a batch of 1 to a constant
    print(f"exporting {loaded.source}, {args.method} r={r}, clips of {tuple(example.shape[1:])} (batch dynamic)",
          file=sys.stderr)
    try:
        path = export_onnx(loaded.model, example, staging / name)
    except OSError as err:
        raise write_error(staging / name, err) from err
    g = torch.Generator().manual_seed(1234)  # fresh clips, not the export example
    clips = [torch.randn(b, *example.shape[1:], generator=g) for b in (1, 3)]
    difference = max_difference(onnx_session(path), loaded.model, clips, family.logits)
    print(f"  ONNX Runtime vs PyTorch on {len(clips)} fresh clips: max |logit difference| = {difference:.2e}")
    status = 0
    if difference > args.tolerance:
        print(f"staprune export: error: ONNX Runtime differs from PyTorch by {difference:.2e} > --tolerance "
              f"{args.tolerance:g}", file=sys.stderr)
        status = 1
    if args.onnx_int8:
        quantized = quantize_onnx_int8(path, int8_path(path))
        session = onnx_session(quantized)
        with torch.no_grad():
            agree = sum(int((run_onnx(session, x).argmax(-1) == family.logits(loaded.model(x)).argmax(-1)).sum())
                        for x in clips)
        shift = max_difference(session, loaded.model, clips, family.logits)
        print(f"  int8 vs PyTorch fp32: max |logit difference| = {shift:.2e}, top-1 agrees on {agree}/"
              f"{sum(x.shape[0] for x in clips)} clips")
    return status


__all__ = ["add_arguments", "int8_path", "run"]

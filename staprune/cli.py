"""``staprune <command>``: each command lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``; this file only dispatches."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from functools import partial
from types import ModuleType

from . import __version__
from .core.errors import StapruneError
from .runs.arguments import DefaultsHelpFormatter

# name -> (module, one-line help)
COMMANDS = {
    "flops": ("staprune.commands.flops", "GFLOPs per view of a model under a pruning config (paper Tables 2, 3)"),
    "bench": ("staprune.commands.bench", "throughput, latency and peak memory: dense vs pruned"),
    "visualize": ("staprune.commands.visualize", "kept-token pictures per pruning stage (paper Fig. 4)"),
    "analyze": ("staprune.commands.analyze", "trajectory sum (Eq. 6) and GradNorm (Eq. 7) analyses"),
    "demo": ("staprune.commands.demo", "dense vs STA vs baselines on the bundled demo models (needs their weights)"),
    "finetune": ("staprune.commands.finetune", "fine-tune dense or pruned (STA/random) models; resumable; torchrun"),
    "eval": ("staprune.commands.evaluate", "multi-view accuracy on a video list (one machine or torchrun), resumable"),
    "export": ("staprune.commands.export", "a pruned model as ONNX, verified with ONNX Runtime; optional int8"),
    "ablate": ("staprune.commands.ablate", "the paper's ablation tables (6a-e, supp. 2-3) on a model and data, resumable"),
}


class OneLineParser(argparse.ArgumentParser):
    """A command-line mistake is one line, as every other mistake is (not argparse's usage block);
    the subcommands' parsers are of this class too (argparse makes them of their parent's)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="staprune",
        description="Training-free spatio-temporal token pruning (STA, ICCV 2023) for video transformers.",
    )
    parser.add_argument("--version", action="version", version=f"staprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text,
                                    formatter_class=DefaultsHelpFormatter)
        sub_parser.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. A :class:`~staprune.core.errors.StapruneError` (something the user can fix) is one
    line on stderr and exit status 2; Ctrl-C says what was kept and how to go on, exit 130. Set
    ``STAPRUNE_TRACEBACK=1`` to get the traceback instead."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "eval" and args.model is None and args.data is None:
        module, call = _demo_instead(args)
    else:
        module = importlib.import_module(args._module)
        call = partial(module.run, args)
    keep_traceback = bool(os.environ.get("STAPRUNE_TRACEBACK"))
    try:
        return int(call() or 0)
    except StapruneError as error:
        if keep_traceback:
            raise
        print(f"staprune {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if keep_traceback:
            raise
        kept = getattr(module, "interrupted", None)
        print(f"staprune {args.command}: interrupted; " + (kept(args) if kept else "nothing was written"),
              file=sys.stderr)
        return 130


def _demo_instead(args: argparse.Namespace) -> tuple[ModuleType, Callable[[], int]]:
    """``staprune eval`` with neither ``--model`` nor ``--data``: the bundled demo (said so), with the
    flags both commands share."""
    demo_args = ["--json"] if args.json else []
    if args.out != "eval-results":
        demo_args += ["--out", args.out]
    print("staprune eval: no --model and --data: running the bundled demo (`staprune demo`)", file=sys.stderr)
    demo = importlib.import_module("staprune.commands.demo")
    return demo, lambda: demo.main(demo_args)


if __name__ == "__main__":
    sys.exit(main())

"""Argument groups every command shares: the model, the device, and the pruning options.

``--model`` takes the same forms in every command (:data:`MODEL_FORMS`, resolved by
:func:`staprune.load`); each command may give it a default of its own.

The pruning options: one argument group, the same in every command.

Every :class:`~staprune.core.config.STAConfig` field has a named flag (``--schedule``, ``--order``,
``--first-unit``, ``--similarity``, ``--score``, ``--first-transition``, ``--locations``,
``--tome-mode``, ``--prune-seed``; ``--seed`` as well where the command has no seed of its own),
listed in ``--help`` with its values. Values are validated by :class:`STAConfig` itself, so a bad
one exits 2 with STAConfig's message; :func:`pruning_options` gives the ones that were set, which
commands record beside their results.

An explicit schedule is ``UNITSxR,...``, one pair per stage (``8x64,4x64,2x64`` is the paper's
decreasing schedule at r=64 for 8 tubelet-frames); locations are block indices, ``0,4,8``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch

from ..core.config import (
    CLASSIFIER_METHODS,
    FIRST_TRANSITION,
    FIRST_UNIT,
    SCHEDULES,
    SCORES,
    SIMILARITY,
    TOME_MODES,
    STAConfig,
    method_option_names,
)
from ..core.errors import UsageError
from ..core.video_methods import video_method, video_method_names
from .devices import DTYPES

MODEL_FORMS = (
    "a registry name (ViT-B, VideoSwin-T, ViViT-B, demo-vit, Qwen2.5-VL-7B, LLaVA-OneVision-0.5B, ...: `staprune "
    "flops` lists the paper's; random weights except the bundled demo models), a Hugging Face folder or hub id, a VideoMAE / VideoMAE V2 release "
    ".pth, swin3d_t|s|b[:WEIGHTS], or a `staprune finetune` checkpoint or run folder"
)

# flag -> STAConfig field
FIELDS = {
    "schedule": "schedule",
    "order": "order",
    "first_unit": "first_unit",
    "similarity": "similarity",
    "score": "score",
    "first_transition": "first_transition",
    "locations": "locations",
    "tome_mode": "tome_mode",
    "prune_seed": "seed",
}


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` that states every default a flag has (unless its help already says it): the value
    a run uses when the flag is left out is never a guess."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS) or not action.option_strings
                or isinstance(action, argparse._HelpAction | argparse._VersionAction)):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, list | tuple) else default
        return f"{text} (default: {shown})".replace("%", "%%") if text else f"(default: {shown})".replace("%", "%%")


def add_model_arguments(parser: argparse.ArgumentParser, *, default: str | None = None, required: bool = False,
                        note: str = "") -> None:
    """``--model`` (:data:`MODEL_FORMS`) and ``--weights`` (the weights file of an architecture name)."""
    shown = f" (default {default})" if default else ""
    parser.add_argument("--model", default=default, required=required, help=MODEL_FORMS + shown + note)
    parser.add_argument("--weights", help="weights file for an architecture name (swin3d_t|s|b)")


def add_device_arguments(parser: argparse.ArgumentParser, *, dtype: bool = True, device_default: str | None = None,
                         threads: bool = True) -> None:
    """``--device``, ``--dtype`` (the forward pass's number format) and ``--threads``."""
    default = f"default {device_default}" if device_default else "default: cuda if available"
    parser.add_argument("--device", default=device_default, help=f"cpu, cuda or cuda:N ({default})")
    if dtype:
        parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES),
                            help="number format of the model and its inputs (default fp32)")
    if threads:
        parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def check_threads(args: argparse.Namespace) -> None:
    """``--threads``, when given, must be a positive count."""
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads} (leave it out for torch's choice)")


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU threads from ``--threads`` (when given; checked by :func:`check_threads`)."""
    check_threads(args)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def parse_schedule(text: str) -> str | tuple[tuple[int, int], ...]:
    """A preset name, or ``UNITSxR,...`` -> ``((units, r), ...)``."""
    text = text.strip()
    if "x" not in text.lower():
        return text  # a preset name: STAConfig says whether it is one
    pairs = []
    for part in text.split(","):
        units, sep, r = part.strip().lower().partition("x")
        if not sep or not units.strip().isdigit() or not r.strip().isdigit():
            raise UsageError(
                f"--schedule {text!r}: an explicit schedule is UNITSxR pairs, one per stage, e.g. 8x64,4x64,2x64"
            )
        pairs.append((int(units), int(r)))
    return tuple(pairs)


def parse_locations(text: str) -> tuple[int, ...]:
    """``0,4,8`` -> ``(0, 4, 8)``."""
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(p.isdigit() for p in parts):
        raise UsageError(f"--locations {text!r}: give block indices after which to prune, e.g. 0,4,8")
    return tuple(int(p) for p in parts)


def add_pruning_arguments(parser: argparse.ArgumentParser, *, seed_flag: bool = True) -> None:
    """The pruning-options group. ``seed_flag``: also accept ``--seed`` for the pruning seed (off
    for commands whose ``--seed`` means something else: the demo's clips, training)."""
    group = parser.add_argument_group("pruning options (each an STAConfig field; default: the paper's)")
    group.add_argument("--schedule", help=f"{' | '.join(SCHEDULES)}, or UNITSxR,... per stage, e.g. 8x64,4x64,2x64 "
                       "(default decreasing)")
    group.add_argument("--order", help="F (forward) / B (backward) per stage, e.g. FFF (default: alternating FBF)")
    group.add_argument("--first-unit", help=f"{' | '.join(FIRST_UNIT)}: the first unit's pruner (default bipartite)")
    group.add_argument("--similarity", help=f"{' | '.join(SIMILARITY)}: what the transitions compare (default key)")
    group.add_argument("--score", help=f"{' | '.join(SCORES)}: A*(1-F), A alone, 1-F alone (default sta)")
    group.add_argument("--first-transition", help=f"{' | '.join(FIRST_TRANSITION)}: the second unit's transition "
                       "uses all tokens of the first (published code) or its kept ones (Algorithm 1) (default all)")
    group.add_argument("--locations", help="block indices after which to prune, e.g. 0,4,8 (default 0, L/3, 2L/3)")
    group.add_argument("--tome-mode", help=f"{' | '.join(TOME_MODES)}: ToMe at STA's locations and counts, or r per "
                       "block (default locations)")
    group.add_argument("--method-option", action="append", metavar="NAME=VALUE",
                       help="a video-token method's own option, e.g. fastv_layer=3 (repeatable; default: the "
                       "published values; docs/families/methods.md lists them)")
    flags = ["--prune-seed", "--seed"] if seed_flag else ["--prune-seed"]
    group.add_argument(*flags, dest="prune_seed", type=int,
                       help="seed of the random choices (random first unit, grid, random drop) (default 0)")


def pruning_options(args: argparse.Namespace) -> dict[str, Any]:
    """The STAConfig fields set on the command line, parsed (schedule pairs, location tuples)."""
    options: dict[str, Any] = {}
    for flag, field in FIELDS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if flag == "schedule":
            value = parse_schedule(value)
        elif flag == "locations":
            value = parse_locations(value)
        options[field] = value
    given = getattr(args, "method_option", None)
    if given:
        options["method_options"] = dict(parse_method_option(text) for text in given)
    return options


def parse_method_option(text: str) -> tuple[str, int | float | bool | str]:
    """``fastv_layer=3`` -> ``("fastv_layer", 3)``: an integer, a number, true/false, else the text."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise UsageError(f"--method-option {text!r}: give NAME=VALUE, e.g. fastv_layer=3")
    value = value.strip()
    if value.lower() in ("true", "false"):
        return name.strip(), value.lower() == "true"
    for kind in (int, float):
        try:
            return name.strip(), kind(value)
        except ValueError:
            pass
    return name.strip(), value


def config_from_args(args: argparse.Namespace, r: int = 0, method: str | None = None) -> STAConfig:
    """The command line's STAConfig at ``r`` (validated: :class:`ConfigError` with STAConfig's message)."""
    method = method or getattr(args, "method", None) or "sta"
    return STAConfig(r=r, method=method, **pruning_options(args))


def explicit_schedule(options: dict[str, Any]) -> bool:
    """Whether the options give every stage's r themselves (``--schedule UNITSxR,...``)."""
    return not isinstance(options.get("schedule", "decreasing"), str)


def check_pruning_options(args: argparse.Namespace) -> None:
    """Validate the options before any work (:class:`ConfigError`; r is checked against the model later).

    An explicit schedule gives every stage's r, so an ``--r`` beside it would be ignored: refused.
    """
    methods = [m for m in getattr(args, "methods", None) or [_method(args)] if m not in ("none", "dense")] or ["sta"]
    for method in methods:
        options = _options_for(method, methods, pruning_options(args))
        STAConfig(method=method, **options)
    r = getattr(args, "r", None)
    if explicit_schedule(pruning_options(args)) and r not in (None, []):
        raise UsageError(f"--schedule {args.schedule} gives every stage's r; drop --r (got {r})")


def default_levels(options: dict[str, Any], levels: Sequence[int]) -> list[int]:
    """The r values a command sweeps without ``--r``: the model's ``levels``, or one value, 0, under an
    explicit schedule (which gives every stage's r itself)."""
    return [0] if explicit_schedule(options) else list(dict.fromkeys(levels))


def default_r(args: argparse.Namespace, model_r: int) -> int:
    """The one r a command runs: ``--r`` when given, else the model's (``model_r``), or 0 under an
    explicit schedule."""
    if args.r is not None:
        return args.r
    return 0 if explicit_schedule(pruning_options(args)) else model_r


class RetiredFlag(argparse.Action):
    """A flag that no longer exists under this name: giving it (with or without a value) is one line that
    names the flag to use instead, exit 2, before any work. Hidden from ``--help``; sets nothing."""

    def __init__(self, option_strings, dest, *, message: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(self.message)


def add_retired_flag(parser: argparse.ArgumentParser, flag: str, message: str) -> None:
    """``flag`` answers ``message`` (:class:`RetiredFlag`)."""
    parser.add_argument(flag, action=RetiredFlag, message=message)


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    """``--int8``: PyTorch's dynamic int8 on the linear layers, the pruning kept (CPU); sets
    ``args.quantize`` to ``"int8"`` (else None), the quantization :func:`staprune.api.deploy.quantize_loaded`
    applies. The former ``--quantize int8`` names it (``staprune export`` writes ONNX Runtime's int8
    with ``--onnx-int8``)."""
    parser.add_argument("--int8", dest="quantize", action="store_const", const="int8",
                        help="PyTorch's dynamic int8 on every linear layer, after patching (CPU, fp32 activations "
                        "in and out)")
    add_retired_flag(parser, "--quantize", "--quantize is now --int8 (PyTorch's dynamic int8 of the linear layers)")


def check_quantize(args: argparse.Namespace, device: torch.device) -> None:
    """``--int8`` runs on CPU in fp32: anything else is one clear line before any work."""
    if getattr(args, "quantize", None) and (device.type != "cpu" or getattr(args, "dtype", "fp32") != "fp32"):
        raise UsageError("--int8 is PyTorch's dynamic int8 on CPU with fp32 activations: use --device cpu --dtype fp32")


def add_method_argument(parser: argparse.ArgumentParser) -> None:
    """``--method`` of the commands that run on both kinds: the classifiers' methods and every
    registered video-token method (:mod:`staprune.core.video_methods`); the family refuses what it
    does not take, in one line."""
    video = [m for m in video_method_names() if m not in CLASSIFIER_METHODS]
    parser.add_argument("--method", default="sta", nargs="+", action=MethodsAction, metavar="METHOD",
                        choices=tuple(dict.fromkeys(("sta", "random", "tome", *video))),
                        help=f"pruning method; a video LLM takes several, compared at each budget (video LLMs "
                        f"only: {', '.join(video)}; {'; '.join(f'{m}: {video_method(m).description}' for m in video)})")
    parser.set_defaults(methods=["sta"])


class MethodsAction(argparse.Action):
    """``--method A [B ...]``: ``args.methods`` all of them (several: a video LLM's comparison),
    ``args.method`` the first (what a classifier command runs)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        namespace.methods = list(dict.fromkeys(values))
        namespace.method = values[0]


def add_keep_argument(parser: argparse.ArgumentParser) -> None:
    """``--keep``: keep ratios, the video LLMs' budget (besides or instead of ``--r``)."""
    parser.add_argument("--keep", type=float, nargs="+", metavar="RATIO",
                        help="video LLMs: share of each video's tokens kept, e.g. 0.5 0.3 (default 0.5 0.3 0.15 "
                        "when no --r is given)")


def video_llm_settings(keeps: Sequence[float] | None, rs: Sequence[int] | None, methods: str | Sequence[str] | None,
                       options: dict[str, Any], default_keep: Sequence[float]) -> list[STAConfig | None]:
    """The settings a video-LLM command runs: the stock model (None), then per method, one per keep
    ratio in ``keeps`` and per non-zero ``rs`` (neither given: ``default_keep``), each with the pruning
    ``options`` (a method's own options go to the methods that take them).

    Raises:
        UsageError: a method option that none of ``methods`` takes.
    """
    rs = [r for r in (rs or []) if r]
    keeps = list(keeps or ([] if rs else default_keep))
    methods = [methods] if isinstance(methods, str) else list(methods or ["sta"])
    settings: list[STAConfig | None] = [None]
    for method in methods:
        own = _options_for(method, methods, options)
        settings += [STAConfig(keep_ratio=k, method=method, **own) for k in keeps]
        settings += [STAConfig(r=r, method=method, **own) for r in rs]
    return settings


def _options_for(method: str, methods: Sequence[str], options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with only the method options ``method`` takes (with one method: all, so that
    STAConfig names what it does not take)."""
    given = dict(options.get("method_options") or {})
    if len(methods) == 1 or not given:
        return options
    taken = set().union(*(method_option_names(m) for m in methods))
    unknown = sorted(set(given) - taken)
    if unknown:
        raise UsageError(f"--method-option {', '.join(unknown)}: none of the methods {', '.join(methods)} takes it")
    own = {name: value for name, value in given.items() if name in method_option_names(method)}
    return {**options, "method_options": own}


def refuse_keep(args: argparse.Namespace, title: str) -> None:
    """``--keep``, or several ``--method``, on a model that is not a video LLM: one clear line."""
    if getattr(args, "keep", None):
        raise UsageError(f"--keep is a video-LLM budget; {title} prunes r tokens per temporal unit: use --r")
    methods = getattr(args, "methods", None) or []
    if len(methods) > 1:
        raise UsageError(f"--method {' '.join(methods)}: several methods compare a video LLM's; {title} takes one")


def _method(args: argparse.Namespace) -> str:
    method = getattr(args, "method", None) or "sta"
    return "sta" if method in ("none", "dense") else method


__all__ = [
    "MODEL_FORMS",
    "RetiredFlag",
    "add_keep_argument",
    "add_quantize_argument",
    "add_retired_flag",
    "check_quantize",
    "refuse_keep",
    "video_llm_settings",
    "DefaultsHelpFormatter",
    "add_device_arguments",
    "add_model_arguments",
    "add_pruning_arguments",
    "apply_threads",
    "check_pruning_options",
    "config_from_args",
    "explicit_schedule",
    "check_threads",
    "default_levels",
    "default_r",
    "parse_locations",
    "parse_method_option",
    "MethodsAction",
    "parse_schedule",
    "pruning_options",
]

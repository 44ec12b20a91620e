"""Pruning configuration: the options (docs/algorithm/options.md), schedule presets, and
stage planning for every backbone.

A :class:`STAConfig` is model-independent. Stage planning turns it into a concrete
:class:`PruningPlan` for one backbone geometry, checking everything that can go wrong before any
forward pass runs: :func:`resolve_plan` for a columnar ViT (depth, tubelet-frames ``T``, tokens per
frame ``N``), :func:`resolve_swin_plan` for a Video Swin (one stage per Swin stage after the first).
Both share the stage directions, the feasibility rule and the search for the largest valid r, so
an error names the same limit whichever backbone it comes from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from .errors import ConfigError, UnknownOptionError

# The methods of video classifiers; video LLMs take "none" and the video-token methods, each of
# which registers its name here when its module is imported (staprune.core.video_methods).
CLASSIFIER_METHODS = ("sta", "random", "tome", "none")
_method_names: list[str] = list(CLASSIFIER_METHODS)
# A video-token method's own options: name -> (its option names, the check of given values that
# raises ConfigError), registered with the method (staprune.core.video_methods.registry).
_method_options: dict[str, tuple[frozenset[str], Callable[[dict], None]]] = {}
SCHEDULES = ("decreasing", "constant", "increasing", "per_frame")
FIRST_UNIT = ("bipartite", "random", "grid")
SIMILARITY = ("key", "query", "value", "hidden")
# Video LLMs: the positions kept video tokens and the text after them take (docs/families/video-llms.md).
POSITIONS = ("original", "renumbered")
SCORES = ("sta", "temporal", "semantic")
FIRST_TRANSITION = ("all", "kept")
TOME_MODES = ("locations", "every_block")


def register_method_name(name: str, options: frozenset[str] = frozenset(),
                         check_options: Callable[[dict], None] | None = None) -> None:
    """Let ``STAConfig(method=name)`` through (a video-token method registering itself), with the
    names of the method's own options and the check of their values (raises :class:`ConfigError`)."""
    if name not in _method_names:
        _method_names.append(name)
    clash = set(options) & set(STAConfig.__dataclass_fields__)
    if clash:
        raise ConfigError(f"method {name!r} names options {sorted(clash)} that are STAConfig fields; rename them")
    _method_options[name] = (frozenset(options), check_options or (lambda given: None))


def method_option_names(method: str) -> frozenset[str]:
    """The names of ``method``'s own options (none for the classifier methods)."""
    return _method_options.get(method, (frozenset(), None))[0]


def method_names() -> tuple[str, ...]:
    """Every method a :class:`STAConfig` accepts (which family takes which: the family checks)."""
    return tuple(_method_names)


def _check_choice(name: str, value: object, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, valid))}")


@dataclass(frozen=True)
class STAConfig:
    """What to prune and how. Defaults reproduce the paper's published tables.

    Attributes:
        r: tokens dropped per temporal unit at the first stage (the paper's ``r_1``).
        method: ``sta`` (the paper), ``random`` (drop r random tokens per unit), ``tome``
            (ToMe bipartite soft-matching merge) or ``none`` (patched but never prunes); video
            LLMs take ``none`` and the video-token methods registered in
            :mod:`staprune.core.video_methods` (``sta``, ``random``, ``uniform``: whole temporal
            units evenly spaced, ``static``: drop the tokens whose pixels changed least since the
            previous unit, ...).
        schedule: a preset name or an explicit list of ``(units, r_per_unit)``, one per stage.
            Presets, stage ``k`` with ``units = T / 2**k``:
            ``decreasing``: r per unit (per frame r, r/2, r/4: the paper's {8x64, 8x32, 8x16});
            ``constant``: r * 2**k per unit (per frame r at every stage);
            ``increasing``: r * 4**k per unit (per frame r, 2r, 4r: the paper's {8x27, 8x54, 8x108});
            ``per_frame``: the paper's text variant, one frame per unit, ``r // 2**k`` per frame
            (rounded down).
        order: one ``F`` (forward) or ``B`` (backward) per stage: the direction the temporal
            accumulation walks the units. ``None`` alternates F, B, F, ... (the paper's FBF for its
            three stages); a single letter applies to every stage.
        first_unit: image-based pruner for the first unit in processing order.
        similarity: which tensor gives the token-to-token affinity (attention key / query /
            value averaged over heads, or the block output ``hidden``).
        score: ``sta`` = A*(1-F), ``temporal`` = A, ``semantic`` = 1-F.
        first_transition: ``all`` (published code: the second unit's transition uses every token
            of the first unit) or ``kept`` (paper Algorithm 1: only its kept tokens).
        locations: 0-based block indices after which to prune; ``None`` = ``0, L//3, 2L//3``.
        tome_mode: for ``method="tome"``: ``locations`` (merge STA's token counts at STA's
            locations) or ``every_block`` (the usual ToMe: merge ``r`` tokens in every block).
        seed: seeds every random choice (random first unit, grid, random baseline). Each clip
            draws from its own stream derived from the seed and its pixels, so results repeat
            exactly and do not depend on what else is in the batch.
        keep_ratio: video LLMs only: the share of each video's tokens kept (how video-LLM papers
            state a budget), instead of ``r`` tokens dropped per temporal unit.
        positions: video LLMs only: ``original`` (every kept token and the text after it keep
            the stock positions) or ``renumbered`` (consecutive positions after pruning; 1D
            positions only, i.e. LLaVA-OneVision).
        method_options: a video-token method's own options by name (FastV's ``fastv_layer``, ...),
            those not given at the method's published defaults; pairs sorted by name (a mapping is
            accepted). ``patch(model, method="fastv", fastv_layer=3)`` puts them here.
    """

    r: int = 0
    method: str = "sta"
    schedule: str | tuple[tuple[int, int], ...] = "decreasing"
    order: str | None = None
    first_unit: str = "bipartite"
    similarity: str = "key"
    score: str = "sta"
    first_transition: str = "all"
    locations: tuple[int, ...] | None = None
    tome_mode: str = "locations"
    seed: int = 0
    keep_ratio: float | None = None
    positions: str = "original"
    method_options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 0:
            raise ConfigError(f"r={self.r!r} must be a non-negative integer (tokens dropped per unit)")
        _check_choice("method", self.method, method_names())
        _check_choice("first_unit", self.first_unit, FIRST_UNIT)
        _check_choice("similarity", self.similarity, SIMILARITY)
        _check_choice("score", self.score, SCORES)
        _check_choice("first_transition", self.first_transition, FIRST_TRANSITION)
        _check_choice("tome_mode", self.tome_mode, TOME_MODES)
        _check_choice("positions", self.positions, POSITIONS)
        if self.keep_ratio is not None:
            ratio = self.keep_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
                raise ConfigError(
                    f"keep_ratio={ratio!r} must be in (0, 1]: the share of each video's tokens kept "
                    "(1.0 keeps every token)"
                )
            if self.r:
                raise ConfigError(f"give r or keep_ratio, not both (r={self.r}, keep_ratio={ratio})")
        if isinstance(self.schedule, str):
            _check_choice("schedule", self.schedule, SCHEDULES)
        else:
            stages = tuple(tuple(int(v) for v in s) for s in self.schedule)
            if not stages or any(len(s) != 2 or s[0] < 1 or s[1] < 0 for s in stages):
                raise ConfigError(
                    f"schedule={self.schedule!r}: an explicit schedule is a non-empty list of "
                    "(units >= 1, r_per_unit >= 0) pairs, one per stage"
                )
            object.__setattr__(self, "schedule", stages)
        if self.order is not None:
            if not isinstance(self.order, str) or not self.order or set(self.order.upper()) - {"F", "B"}:
                raise ConfigError(
                    f"order={self.order!r} must be a string of 'F' and 'B', one per stage, e.g. 'FBF'"
                )
            object.__setattr__(self, "order", self.order.upper())
        if self.locations is not None:
            locs = tuple(int(i) for i in self.locations)
            if not locs or any(b <= a for a, b in zip(locs, locs[1:], strict=False)) or locs[0] < 0:
                raise ConfigError(
                    f"locations={self.locations!r} must be strictly increasing block indices >= 0"
                )
            object.__setattr__(self, "locations", locs)
        self._check_method_options()

    def _check_method_options(self) -> None:
        given = self.method_options
        if isinstance(given, Mapping):
            given = tuple(given.items())
        try:
            pairs = tuple(sorted((str(name), value) for name, value in given))
        except (TypeError, ValueError):
            raise ConfigError(f"method_options={self.method_options!r} must map option names to values") from None
        object.__setattr__(self, "method_options", pairs)
        if not pairs:
            return
        names, check = _method_options.get(self.method, (frozenset(), None))
        unknown = sorted({name for name, _ in pairs} - names)
        if unknown:
            takes = f"takes {', '.join(sorted(names))}" if names else "takes no options of its own"
            raise ConfigError(f"method={self.method!r} has no option {', '.join(unknown)}; it {takes}")
        check(dict(pairs))

    @property
    def budget(self) -> str:
        """The budget as tables, titles and logs write it: ``keep 0.3`` (a keep ratio) or ``r=8``."""
        return f"keep {self.keep_ratio:g}" if self.keep_ratio is not None else f"r={self.r}"

    def with_options(self, **options: object) -> STAConfig:
        """Copy with some fields replaced, and the method's own options (any name its method takes,
        :func:`method_option_names`) added to ``method_options``; other names raise TypeError listing
        the valid ones."""
        valid = set(self.__dataclass_fields__)
        method = options.get("method", self.method)
        own = method_option_names(method) if isinstance(method, str) else frozenset()
        unknown = set(options) - valid - own
        if unknown:
            extra = f"; method {method!r} also takes {sorted(own)}" if own else ""
            raise UnknownOptionError(f"unknown option(s) {sorted(unknown)}; valid options: {sorted(valid)}{extra}")
        fields = {k: v for k, v in options.items() if k in valid}
        method_options = {k: v for k, v in options.items() if k not in valid}
        if method_options:
            kept = dict(fields.get("method_options", self.method_options))
            fields["method_options"] = tuple({**kept, **method_options}.items())
        return replace(self, **fields)


@dataclass(frozen=True)
class Stage:
    """One pruning point: after block ``layer``, regroup the sequence into ``units`` temporal
    units of ``tokens_in`` tokens each and drop ``r`` tokens per unit."""

    layer: int
    units: int
    r: int
    forward: bool
    tokens_in: int

    @property
    def tokens_out(self) -> int:
        return self.tokens_in - self.r


@dataclass(frozen=True)
class PruningPlan:
    """A config resolved for one geometry: ``T`` tubelet-frames of ``N`` tokens, ``depth`` blocks."""

    config: STAConfig
    depth: int
    frames: int
    tokens_per_frame: int
    stages: tuple[Stage, ...] = field(default_factory=tuple)

    @property
    def tokens_after(self) -> list[int]:
        """Sequence length after each stage."""
        return [s.units * s.tokens_out for s in self.stages]

    def tokens_per_block(self) -> list[int]:
        """Sequence length entering each block (for FLOP counts)."""
        n = self.frames * self.tokens_per_frame
        counts = []
        by_layer = {s.layer: s for s in self.stages}
        for layer in range(self.depth):
            counts.append(n)
            if layer in by_layer:
                s = by_layer[layer]
                n = s.units * s.tokens_out
        return counts


def default_locations(depth: int, num_stages: int = 3) -> tuple[int, ...]:
    """The paper's placement: after blocks 0, L//3, 2L//3 (0-based)."""
    return tuple(sorted({(k * depth) // num_stages for k in range(num_stages)}))


def _preset_stages(schedule: str, r: int, frames: int, num_stages: int,
                   tubelet: int | None = None) -> list[tuple[int, int]]:
    stages = []
    for k in range(num_stages):
        if schedule == "per_frame":
            stages.append((frames, r // 2**k))
            continue
        if frames % 2**k:
            multiple = 2 ** (num_stages - 1)
            units = ", ".join(str(2**i) for i in range(num_stages))
            message = (
                f"{frames} temporal positions (tubelet-frames) cannot be grouped into the {num_stages} stages' units "
                f"of {units} tubelet-frames: their number must be a multiple of {multiple}; change the clip length, "
                "prune at fewer --locations, or give an explicit schedule"
            )
            if tubelet is not None:  # say it in input frames too, with the nearest clip lengths that fit
                lower, upper = frames // multiple * multiple, (frames // multiple + 1) * multiple
                fits = " or ".join(str(f * tubelet) for f in (lower, upper) if f)
                message = (f"a clip of {frames * tubelet} frames is {frames} tubelet-frames of {tubelet}: {message} "
                           f"(e.g. {fits} frames)")
            raise ConfigError(message)
        per_unit = {"decreasing": r, "constant": r * 2**k, "increasing": r * 4**k}[schedule]
        stages.append((frames // 2**k, per_unit))
    return stages


def stage_directions(config: STAConfig, num_stages: int) -> str:
    """One direction letter per stage (default: alternate F, B, F, ...)."""
    if config.order is None:
        return ("FB" * num_stages)[:num_stages]
    order = config.order * num_stages if len(config.order) == 1 else config.order
    if len(order) != num_stages:
        raise ConfigError(f"order={config.order!r} has {len(order)} letters for {num_stages} stages")
    return order


def _stages_for(config: STAConfig, r: int, depth: int, frames: int, n: int,
                tubelet: int | None = None) -> list[Stage]:
    """Build stages for a given first-stage r, raising ValueError for infeasible geometry
    (``tubelet``: see :func:`resolve_plan`)."""
    locations = config.locations if config.locations is not None else default_locations(depth)
    if locations[-1] >= depth:
        raise ConfigError(
            f"locations={locations} reach past the model's {depth} blocks (valid: 0..{depth - 1})"
        )
    if isinstance(config.schedule, str):
        pairs = _preset_stages(config.schedule, r, frames, len(locations), tubelet)
    else:
        pairs = list(config.schedule)
        if len(pairs) != len(locations):
            raise ConfigError(
                f"explicit schedule has {len(pairs)} stages but there are {len(locations)} locations {locations}"
            )
    order = stage_directions(config, len(pairs))
    stages = []
    prev_units, per_unit = frames, n
    for layer, (units, r_k), direction in zip(locations, pairs, order, strict=True):
        if prev_units % units:
            raise ConfigError(
                f"cannot regroup {prev_units} temporal units into {units} at block {layer}: each unit must be "
                f"whole consecutive units of the previous stage (frames={frames}); adjust the frame count or "
                "the schedule"
            )
        tokens_in = per_unit * (prev_units // units)
        stages.append(Stage(layer, units, r_k, direction == "F", tokens_in))
        prev_units, per_unit = units, tokens_in - r_k
    return stages


def stage_feasible(config: STAConfig, stage: Stage) -> bool:
    """Whether ``stage`` can drop its r tokens per unit under ``config``'s method."""
    if stage.r == 0:
        return True
    if config.method == "tome":
        # ToMe merges globally: at most half of the whole sequence per step.
        return stage.units * stage.r <= (stage.units * stage.tokens_in) // 2
    return stage.r < stage.tokens_in


def resolve_plan(
    config: STAConfig, depth: int, frames: int, tokens_per_frame: int, *, tubelet: int | None = None
) -> PruningPlan:
    """Check ``config`` against a geometry and return the concrete stages.

    ``tubelet``: input frames per tubelet-frame, for error messages in input frames (None: say
    tubelet-frames only).

    Args:
        depth: number of transformer blocks.
        frames: tubelet-frames ``T`` (input frames / tubelet size).
        tokens_per_frame: ``N`` spatial tokens per tubelet-frame.

    Raises:
        ValueError: frames not divisible into the stages' units, locations outside the model, or
            r too large for the token count (the message states the largest valid r).
    """
    if config.method == "tome" and config.tome_mode == "every_block":
        # Usual ToMe: r tokens merged in every block, capped at half the sequence as ToMe does.
        stages, n = [], frames * tokens_per_frame
        for layer in range(depth):
            r_k = min(config.r, n // 2)
            stages.append(Stage(layer, 1, r_k, True, n))
            n -= r_k
        return PruningPlan(config, depth, frames, tokens_per_frame, tuple(stages))

    stages = _stages_for(config, config.r, depth, frames, tokens_per_frame, tubelet)
    if not all(stage_feasible(config, s) for s in stages):
        largest = _largest_valid_r(
            config, lambda r: _stages_for(config, r, depth, frames, tokens_per_frame), frames * tokens_per_frame
        )
        bad = next(s for s in stages if not stage_feasible(config, s))
        raise ConfigError(
            f"r={config.r} is too large for this input: at block {bad.layer} each of the {bad.units} units has "
            f"{bad.tokens_in} tokens and would drop {bad.r} (method={config.method}, "
            f"first_unit={config.first_unit}, schedule={config.schedule!r}). The largest valid r for "
            f"{frames}x{tokens_per_frame} tokens is {largest}."
        )
    return PruningPlan(config, depth, frames, tokens_per_frame, tuple(stages))


def _largest_valid_r(config: STAConfig, stages_for: Callable[[int], list[Stage]], limit: int) -> int:
    """The largest first-stage r in ``1 .. limit - 1`` whose stages all fit (0 if none does).

    ``stages_for(r)`` builds the stages of one backbone for a first-stage r; the search stops at
    the first r whose stages cannot be built or leave a unit without tokens.
    """
    best = 0
    for r in range(1, limit):
        try:
            stages = stages_for(r)
        except ValueError:
            break
        if any(s.tokens_out < 1 for s in stages):
            break
        if all(stage_feasible(config, s) for s in stages):
            best = r
    return best


# --- Video Swin: one stage per Swin stage after the first ---------------------------------------
def swin_stage_drops(r1: int) -> tuple[int, int, int]:
    """Per-frame drops at the start of Swin stages 2, 3 and 4: ``r1, 1.5*r1/4, 2*r1/16``.

    Rounded half-up to whole tokens (r1 = 192/256/320 give exact integers: 72/96/120, 24/32/40).
    """
    return (r1, int(1.5 * r1 / 4 + 0.5), int(2 * r1 / 16 + 0.5))


def _swin_stages(config: STAConfig, r1: int, frames: int, grids: Sequence[tuple[int, int]]) -> list[Stage]:
    """The stages of a Video Swin for a first-stage ``r1`` (see :func:`resolve_swin_plan`)."""
    if isinstance(config.schedule, str):
        # Smaller Swins (2 or 3 stages) prune after each of their patch mergings with the first
        # drops of the paper's schedule; a deeper one has no published drops for stage 5 on.
        if len(grids) > 3:
            raise ConfigError(
                f"this Video Swin has {len(grids) + 1} stages; the paper's r1 schedule covers stages 2-4 "
                f"only: pass schedule=[(units, r), ...] with {len(grids)} pairs"
            )
        drops = swin_stage_drops(r1)[: len(grids)]
        units = [frames] * len(drops)
    else:
        if len(config.schedule) != len(grids):
            raise ConfigError(
                f"explicit Swin schedule needs {len(grids)} (units, r) pairs, got {config.schedule}"
            )
        units = [u for u, _ in config.schedule]
        drops = tuple(r for _, r in config.schedule)
    order = stage_directions(config, len(grids))
    stages = []
    for k, ((h, w), u, r_k, direction) in enumerate(zip(grids, units, drops, order, strict=True)):
        if frames % u:
            raise ConfigError(
                f"{frames} temporal positions cannot be split into {u} units at Swin stage {k + 2}"
            )
        stages.append(Stage(k + 1, u, r_k, direction == "F", frames // u * h * w))
    return stages


def resolve_swin_plan(config: STAConfig, frames: int, grids: Sequence[tuple[int, int]]) -> PruningPlan:
    """Stages for a Video Swin: one per pruned Swin stage (2, 3, 4; 2 and 3 in smaller Swins), each per frame.

    Each Swin stage starts from a full grid (the grid is refilled before patch merging), so every
    stage prunes ``frames`` units of ``h*w`` tokens independently. ``Stage.layer`` is the 0-based
    Swin stage index (1, 2, 3). Methods the Swin family refuses (ToMe) are its own check, made
    before this one.

    Args:
        frames: temporal positions ``T`` after patch embedding (16 for 32-frame input).
        grids: spatial token grid ``(h, w)`` of Swin stages 2, 3 and 4 (of every stage after the
            first, for models with fewer stages).

    Raises:
        ValueError: a schedule that does not fit the stages or the frames, or r1 too large for a
            stage's tokens per frame (the message states the largest valid r1).
    """
    stages = _swin_stages(config, config.r, frames, grids)
    for stage in stages:
        if not stage_feasible(config, stage):
            h, w = grids[stage.layer - 1]
            largest = _largest_valid_r(config, lambda r: _swin_stages(config, r, frames, grids), grids[0][0] * grids[0][1])
            raise ConfigError(
                f"r={config.r} is too large for this Video Swin input: stage {stage.layer + 1} has {h}x{w} "
                f"tokens per frame and would drop {stage.r} per unit; the largest valid r1 is {largest}"
            )
    return PruningPlan(config, len(grids) + 1, frames, grids[0][0] * grids[0][1], tuple(stages))


def as_config(config: STAConfig | None = None, r: int | None = None, **options: object) -> STAConfig:
    """Merge ``patch(model, r=..., config=..., **options)`` arguments into one config."""
    base = config if config is not None else STAConfig()
    if r is not None:
        options["r"] = r
    return base.with_options(**options) if options else base


def config_record(config: STAConfig) -> dict:
    """``config`` as JSON values (every field; schedule pairs and locations as lists): what
    ``save_pretrained`` of a patched model writes under ``"staprune"`` in ``config.json``."""
    record = {}
    for name in STAConfig.__dataclass_fields__:
        value = getattr(config, name)
        if name == "schedule" and not isinstance(value, str):
            value = [list(pair) for pair in value]
        elif name == "method_options":
            value = dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        record[name] = value
    return record


def config_from_record(record: object) -> STAConfig:
    """The :class:`STAConfig` :func:`config_record` wrote (validated as any config).

    Raises:
        ConfigError: not a mapping of STAConfig fields, or a value STAConfig refuses.
    """
    if not isinstance(record, dict) or not set(record) <= set(STAConfig.__dataclass_fields__):
        unknown = sorted(set(record) - set(STAConfig.__dataclass_fields__)) if isinstance(record, dict) else record
        raise ConfigError(f"not a staprune pruning record (unknown entries: {unknown})")
    values = dict(record)
    if isinstance(values.get("schedule"), list):
        values["schedule"] = tuple(tuple(pair) for pair in values["schedule"])
    if isinstance(values.get("locations"), list):
        values["locations"] = tuple(values["locations"])
    return STAConfig(**values)


def largest_square_grid(r: int) -> int:
    """Cells per side of the grid first-unit pruner: ``ceil(sqrt(r))`` (exactly sqrt(r) for squares)."""
    return max(1, math.isqrt(r - 1) + 1) if r > 0 else 1

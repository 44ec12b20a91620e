"""STA on the video tokens of a video LLM, between the vision encoder and the language model
(docs/families/video-llms.md).

What the video-LLM families share, written once: a family only says where its video tokens are
(:class:`VideoLayout` per video, the placeholder token id, how to read the vision keys) and this
module does the rest:

* at prefill, a forward-pre hook on the language model receives the stock ``inputs_embeds``,
  ``attention_mask`` and ``position_ids`` (the full sequence, every video scattered in), picks each
  video's kept tokens with STA (one selection per video, over its temporal units), and hands the
  language model the shorter sequence: left-padded again when rows drop different counts, every
  kept token at its stock position (or renumbered, for 1D positions);
* at every decoding step it maps the stock-length attention mask and positions that ``generate``
  keeps onto the pruned cache (the KV cache holds only kept tokens; the prefill's
  :class:`PrunedPrompt` travels on the cache object, so only that cache's decoding steps use it).

Only the videos the model's own forward consumes are pruned: those its forward encodes, or those
``generate`` encoded for it just before (``mm_encoder_outputs``). Everything else reaches the
language model as in the stock model: text, images, the video's special tokens (vision start/end,
LLaVA's newline), prompts without a video, rows of a batch without a video, and direct calls of the
language model. ``generate`` with ``num_beams`` or ``num_return_sequences`` > 1 encodes each video
once and repeats the prompt; every copy then reuses the selection of its source video.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..core.baselines import random_keep_indices, static_keep_indices, uniform_unit_indices
from ..core.config import STAConfig
from ..core.errors import ConfigError, UsageError
from ..core.score import PerSampleRandom, gather_tokens, normalize_metric, sample_seeds, sta_keep_indices
from .state import Patch, needs_noise


@dataclass(frozen=True)
class VideoLayout:
    """One video's placeholder tokens: ``units`` temporal units of ``rows x cols`` tokens (units in
    temporal order, each unit row-major), then ``tail`` tokens that are never dropped (LLaVA's newline)."""

    units: int
    rows: int
    cols: int
    tail: int = 0

    @property
    def per_unit(self) -> int:
        return self.rows * self.cols

    @property
    def tokens(self) -> int:
        return self.units * self.per_unit + self.tail


def kept_per_unit(config: STAConfig, per_unit: int) -> int:
    """Tokens a temporal unit of ``per_unit`` tokens keeps under ``r`` or ``keep_ratio``.

    Raises:
        ConfigError: the budget empties a unit.
    """
    if config.keep_ratio is not None:
        keep = math.floor(per_unit * config.keep_ratio + 0.5)
        if keep < 1:
            raise ConfigError(
                f"keep_ratio={config.keep_ratio} keeps no token of a temporal unit of {per_unit} tokens; "
                f"the smallest keep_ratio for this video is {1 / per_unit:.4g}"
            )
        return keep
    if config.r >= per_unit:
        raise ConfigError(
            f"r={config.r} drops every token of a temporal unit of {per_unit} tokens; use r <= {per_unit - 1} "
            "or keep_ratio"
        )
    return per_unit - config.r


def select_video_tokens(tokens: Tensor, metric: Tensor, layout: VideoLayout, config: STAConfig,
                        rng: PerSampleRandom | None, change: Tensor | None = None) -> Tensor:
    """The kept tokens of one video, as indices into its placeholder sequence (ascending).

    Args:
        tokens: ``(L_v, C)`` the video's projected tokens (the semantic score), ``L_v = layout.tokens``.
        metric: ``(L_v, c)`` the similarity features (the projected tokens or the vision keys).
        change: ``(units, per_unit)`` each token's pixel change (``method="static"`` only).
    Returns:
        ``(K,)`` long, ascending; the ``tail`` tokens always included.
    """
    units, n = layout.units, layout.per_unit
    keep = kept_per_unit(config, n)
    body = units * n
    if keep == n or config.method == "none":
        picked = torch.arange(body, device=tokens.device)
    elif config.method == "random":
        picked = random_keep_indices(rng, 1, units, n, n - keep)[0]
    elif config.method == "uniform":
        picked = uniform_unit_indices(units, n, keep, tokens.device)
    elif config.method == "static":
        picked = static_keep_indices(change, keep)
    else:
        forward = (config.order or "F")[0] == "F"
        picked = sta_keep_indices(
            tokens[None, :body], metric[None, :body], units, n - keep, forward=forward,
            first_unit=config.first_unit, score=config.score, first_transition=config.first_transition,
            rng=rng, positions=torch.arange(body, device=tokens.device)[None], grid_hw=(layout.rows, layout.cols),
        )[0]
    tail = torch.arange(body, layout.tokens, device=tokens.device)
    return torch.cat([picked.sort().values, tail])


# --- one sequence, shorter ------------------------------------------------------------------------
def pack_kept(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Columns of the shorter sequence: each row's kept columns in order, left-padded.

    Args:
        keep: ``(B, L)`` bool, True for the columns that stay.
    Returns:
        ``index`` ``(B, L')`` the stock column each new column takes (padding reads column 0) and
        ``valid`` ``(B, L')`` False on the new left padding; ``L'`` the longest row.
    """
    counts = keep.sum(1)
    length = int(counts.max())
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :length]
    src = torch.arange(length, device=keep.device)[None] - (length - counts)[:, None]
    valid = src >= 0
    return order.gather(1, src.clamp(min=0)), valid


def take_columns(x: Tensor, index: Tensor) -> Tensor:
    """``x`` ``(..., B, L)`` (positions, masks) at columns ``index`` ``(B, L')`` -> ``(..., B, L')``."""
    return x.gather(-1, index.expand(*x.shape[:-2], *index.shape))


@dataclass
class PrunedPrompt:
    """What the prefill of one prompt decided, for the decoding steps that follow it.

    Attributes:
        kept: :func:`staprune.kept_tokens`: rows in batch order, each row's videos in prompt order,
            one ``(K,)`` long tensor per video (original indices into that video's placeholder
            tokens, ascending); a row without a video has one empty ``(0,)`` entry in its place.
        stock_length: columns of the stock prompt ``L``.
        mask: ``(B, L')`` the pruned prompt's attention mask; None when nothing was dropped (the
            hooks then change nothing). dropped: ``(B,)`` tokens each row dropped.
        columns, valid: :func:`pack_kept`'s ``(B, L')`` stock column of each pruned column and
            False on the new left padding (labels follow their tokens through them).
    """

    kept: list[Tensor] = field(default_factory=list)
    stock_length: int = 0
    mask: Tensor | None = None
    dropped: Tensor | None = None
    columns: Tensor | None = None
    valid: Tensor | None = None

    def shorten(self, per_column: Tensor, fill: int) -> Tensor:
        """A stock-length ``(B, L)`` tensor (labels) at the pruned columns ``(B, L')``, ``fill`` on padding."""
        return take_columns(per_column, self.columns).masked_fill(~self.valid, fill)

    @property
    def pruned(self) -> bool:
        return self.mask is not None

    @property
    def pruned_length(self) -> int:
        """``L'``, the columns of the pruned prompt."""
        return self.mask.shape[1]


@dataclass
class VideoLLMModel:
    """Where a family's video LLM keeps what the hooks need.

    Attributes:
        inner: the ``*Model`` (vision tower, projector, language model): its forward receives
            ``input_ids``, its ``get_video_features(pixel_values_videos, grid)`` encodes the videos
            (``generate`` calls it before the first forward).
        outer: the ``*ForConditionalGeneration`` around ``inner`` (its loss reads ``labels``), or None.
        language_model: the decoder the pruned sequence goes to.
        video_token_id: the placeholder token of video features.
        layouts: ``(pixel_values_videos, grid or None)`` -> one :class:`VideoLayout` per video, in
            the order the model scatters them (row-major over the batch).
        install_keys: registers hooks that record the vision tower's keys while
            ``p.encoding_video`` is set and returns a reader ``(pixel_values_videos, grid) -> (P, d)``,
            one row per video token (``similarity="key"``); None if unavailable.
        pixel_change: ``(pixel_values_videos, grid or None)`` -> per video ``(units, per_unit)``,
            how much each token's pixels changed since the previous unit (``method="static"``).
        one_d_positions: the language model takes 1D positions (``positions="renumbered"`` allowed).
    """

    inner: nn.Module
    outer: nn.Module | None
    language_model: nn.Module
    video_token_id: int
    layouts: Callable[[Tensor, Tensor | None], list[VideoLayout]]
    install_keys: Callable[[Patch, nn.Module], Callable[[Tensor, Tensor | None], Tensor]] | None = None
    pixel_change: Callable[[Tensor, Tensor | None], list[Tensor]] | None = None
    one_d_positions: bool = False


class VideoPatch(Patch):
    """A patched video LLM's undo log and the state of the forward in flight.

    Attributes:
        encoding_video: set while ``get_video_features`` runs (the key hooks record only then).
        videos: the videos of the forward in flight, as ``get_video_features`` encoded them
            (``layouts``, ``keys``, ``change``): in the forward, or before it by ``generate`` (then
            read off the ``mm_encoder_outputs`` it passes); empty outside a forward.
        input_ids: the input_ids of the forward in flight; None outside it.
        in_forward: the model's (``inner``'s) forward is running; a language-model call outside it
            is somebody else's and passes unchanged.
        foreign_videos: this forward received video features that staprune's ``get_video_features`` did not make.
        state: the last prefill's :class:`PrunedPrompt` (:func:`staprune.kept_tokens`).
        applied: the :class:`PrunedPrompt` the language model's last call in a forward used (None:
            it ran unchanged), for the loss.
        labels: the labels the loss hook held back.
    """

    def __init__(self, config: STAConfig) -> None:
        super().__init__(config)
        self.encoding_video = False
        self.videos: dict = {}
        self.input_ids: Tensor | None = None
        self.in_forward = False
        self.foreign_videos = False
        self.state: PrunedPrompt | None = None
        self.applied: PrunedPrompt | None = None
        self.labels: Tensor | None = None
        self._prefilled: PrunedPrompt | None = None  # to put on the cache the language model returns


CACHE_ATTR = "_staprune_pruned"  # the PrunedPrompt a KV cache was filled with (absent: a stock cache)
VIDEOS_ATTR = "_staprune_videos"  # on get_video_features' output: its VideoPatch.videos


def install(p: VideoPatch, model: VideoLLMModel) -> None:
    """Hook ``model`` so its language model sees each prompt with the videos pruned."""
    read_keys = None
    if p.config.similarity != "hidden" and p.config.method == "sta":
        if model.install_keys is None:
            raise ConfigError("this model has no vision keys staprune can read; use similarity='hidden'")
        read_keys = model.install_keys(p, model.inner)
    if p.config.method == "static" and model.pixel_change is None:
        raise ConfigError("this model does not say which pixels each video token covers; method='static' is "
                          "unavailable: use sta, random or uniform")
    inner = model.inner

    # generate() passes get_video_features the model kwargs its signature names: keep the stock one.
    @functools.wraps(inner.get_video_features)
    def get_video_features(*args, **kwargs):
        pixels = args[0] if args else kwargs["pixel_values_videos"]
        grid = args[1] if len(args) > 1 else kwargs.get("video_grid_thw")
        p.encoding_video = True
        try:
            out = type(inner).get_video_features(inner, *args, **kwargs)
        finally:
            p.encoding_video = False
        videos = {"layouts": model.layouts(pixels, grid),
                  "keys": None if read_keys is None else read_keys(pixels, grid),
                  "change": model.pixel_change(pixels, grid) if p.config.method == "static" else None}
        if p.in_forward:  # the forward encodes its own videos
            p.videos = videos
        # generate encodes before its first forward and hands the output over as mm_encoder_outputs
        # (repeated in place per beam): what the selection needs travels with it.
        with contextlib.suppress(AttributeError, TypeError):  # a tuple output (return_dict=False) takes none
            setattr(out, VIDEOS_ATTR, videos)
        return out

    def start_forward(module, args, kwargs):
        p.input_ids = args[0] if args else kwargs.get("input_ids")
        p.in_forward, p.applied, p._prefilled = True, None, None
        given = (kwargs.get("mm_encoder_outputs") or {}).get("video")
        p.videos = {} if given is None else getattr(given, VIDEOS_ATTR, {})
        p.foreign_videos = given is not None and not p.videos

    def end_forward(module, args, kwargs, output):
        p.input_ids, p.videos, p.in_forward, p.foreign_videos, p._prefilled = None, {}, False, False, None

    p.override_method(inner, "get_video_features", get_video_features)
    p.hook(inner, start_forward, pre=True, with_kwargs=True)
    # always_call: a forward that raised must not leave its input_ids or videos to the next call.
    p.hook(inner, end_forward, with_kwargs=True, always_call=True)
    p.hook(model.language_model, lambda module, args, kwargs: _language_model_inputs(p, model, kwargs),
           pre=True, with_kwargs=True)
    p.hook(model.language_model, lambda module, args, output: _remember_on_cache(p, output))
    if model.outer is not None:
        _install_pruned_loss(p, model.outer)


def _cache_of(values: object) -> object | None:
    """The KV cache in the language model's kwargs or output (a ``ModelOutput`` is a mapping; a tuple
    output names none): ``cache``, or ``past_key_values`` as transformers called it before."""
    if not isinstance(values, Mapping):
        return None
    cache = values.get("cache")
    return values.get("past_key_values") if cache is None else cache


def _remember_on_cache(p: VideoPatch, output) -> None:
    """Put the prefill's :class:`PrunedPrompt` on the cache it filled: that cache's decoding steps
    (and only those) map onto the pruned columns, whichever calls come in between."""
    state, p._prefilled = p._prefilled, None
    cache = None if state is None else _cache_of(output)
    if cache is not None:
        setattr(cache, CACHE_ATTR, state)


def _install_pruned_loss(p: VideoPatch, outer: nn.Module) -> None:
    """The stock loss compares stock-length labels with the pruned logits: hold the labels back and
    compute the same loss on the labels of the kept columns (a label follows its token)."""

    def hold_labels(module, args, kwargs):
        p.applied = None
        p.labels = kwargs.get("labels")
        if p.labels is None:
            return None
        kwargs["labels"] = None
        return args, kwargs

    def pruned_loss(module, args, kwargs, output):
        labels, p.labels = p.labels, None
        state, p.applied = p.applied, None
        if labels is None:
            return None
        if state is not None and state.pruned and labels.shape[-1] == state.stock_length:
            labels = state.shorten(labels, fill=-100)  # -100: the loss's ignore index
        extra = {k: kwargs[k] for k in ("num_items_in_batch",) if k in kwargs}
        output.loss = module.loss_function(logits=output.logits, labels=labels,
                                           vocab_size=module.config.text_config.vocab_size, **extra)
        return output

    p.hook(outer, hold_labels, pre=True, with_kwargs=True)
    p.hook(outer, pruned_loss, with_kwargs=True)


def _language_model_inputs(p: VideoPatch, model: VideoLLMModel, kwargs: dict):
    if not p.in_forward:  # a direct call of the language model: no video of ours in it
        return None
    cache = _cache_of(kwargs)
    past = 0 if cache is None else cache.get_seq_length()
    if past == 0:
        state = _prefill(p, model, kwargs)
        p.state = p._prefilled = state
        p.applied = state if state.pruned else None
        return ((), kwargs) if state.pruned else None
    if p.videos or p.foreign_videos:
        raise UsageError("a pruned video LLM prunes a video only in a prompt's first forward (an empty cache); "
                         "start the prompt anew instead of adding a video to a cached conversation")
    state = getattr(cache, CACHE_ATTR, None)  # None: a cache staprune did not fill, e.g. a text-only prompt's
    if state is None or not state.pruned:
        return None
    p.applied = state
    return (), _decode(state, kwargs, past, model.one_d_positions and p.config.positions == "renumbered")


def videos_of_rows(ids: Tensor, video_token_id: int, layouts: list[VideoLayout]) -> list[list[int]]:
    """Which encoded video each row's placeholders hold: per row, indices into ``layouts`` in prompt order.

    The model scatters the videos into the placeholders row-major, each video whole in one row.
    ``generate`` with ``num_beams`` or ``num_return_sequences`` = ``k`` > 1 encodes each prompt's
    videos once and repeats the prompt ``k`` times in a row (``repeat_interleave``), its features
    with it: then the rows come in groups of ``k`` equal rows, and every row of a group holds the
    videos of the group's one source row.

    Args:
        ids: ``(B, L)`` the forward's input_ids.
        layouts: the encoded videos, in the order the model consumes them.
    Raises:
        UsageError: the placeholders hold neither the videos whole and in order nor ``k`` copies of them.
    """
    counts = (ids == video_token_id).sum(1).tolist()
    total, encoded = sum(counts), sum(v.tokens for v in layouts)
    rows = _fill_rows(counts, layouts) if total == encoded else None
    copies = total // encoded if encoded and total % encoded == 0 else 0
    if rows is None and copies > 1 and ids.shape[0] % copies == 0:
        groups = ids.reshape(ids.shape[0] // copies, copies, -1)
        if bool((groups == groups[:, :1]).all()):
            sources = _fill_rows(counts[::copies], layouts)
            rows = None if sources is None else [held for held in sources for _ in range(copies)]
    if rows is None:
        raise UsageError(f"the prompt has {total} video placeholder tokens (per row {counts}) but its videos make "
                         f"{encoded} ({[v.tokens for v in layouts]} per video), neither whole videos per row nor "
                         "copies of each row's; pass the processor's input_ids with its video tensors")
    return rows


def _fill_rows(counts: list[int], layouts: list[VideoLayout]) -> list[list[int]] | None:
    """The videos, in order, filling rows of ``counts`` placeholders exactly (None: they do not)."""
    rows, video = [], 0
    for count in counts:
        held = []
        while count and video < len(layouts) and layouts[video].tokens <= count:
            count -= layouts[video].tokens
            held.append(video)
            video += 1
        if count:
            return None
        rows.append(held)
    return rows if video == len(layouts) else None


def _prefill(p: VideoPatch, model: VideoLLMModel, kwargs: dict) -> PrunedPrompt:
    """Prune this forward's videos out of the language model's prefill ``kwargs`` (in place).

    Returns the :class:`PrunedPrompt`; ``mask`` None (``kwargs`` untouched) when nothing was dropped,
    e.g. a prompt without a video.
    """
    embeds, ids = kwargs["inputs_embeds"], p.input_ids
    bsz, length = embeds.shape[:2]
    layouts = p.videos.get("layouts", [])
    state = PrunedPrompt(stock_length=length)
    no_video = torch.empty(0, dtype=torch.long, device=embeds.device)
    if p.foreign_videos:
        raise UsageError("a pruned video LLM prunes only videos its own get_video_features encoded: pass "
                         "pixel_values_videos, or mm_encoder_outputs made by the patched model, whole "
                         "(not with generate's prefill_chunk_size)")
    if not layouts:  # no video in this forward: placeholder ids, if any, are plain tokens as in the stock model
        state.kept = [no_video] * bsz
        return state
    if ids is None:
        raise UsageError("a pruned video LLM finds a video's tokens by their placeholder id: pass input_ids with "
                         "pixel_values_videos, not inputs_embeds")
    cfg = p.config
    placeholders = ids == model.video_token_id
    keys = p.videos.get("keys")
    starts = [0]  # each encoded video's first row in keys
    for layout in layouts:
        starts.append(starts[-1] + layout.tokens)
    chosen: dict[int, Tensor] = {}
    keep = torch.ones(bsz, length, dtype=torch.bool, device=ids.device)
    for row, held in enumerate(videos_of_rows(ids, model.video_token_id, layouts)):
        if not held:
            state.kept.append(no_video)
            continue
        cols, start = placeholders[row].nonzero().flatten(), 0
        for video in held:
            layout = layouts[video]
            span = cols[start : start + layout.tokens]
            start += layout.tokens
            if video not in chosen:  # a copy of a prompt (beams, returned sequences) reuses its selection
                tokens = embeds[row, span]
                metric = keys[starts[video] : starts[video + 1]] if keys is not None else normalize_metric(tokens)
                rng = PerSampleRandom(sample_seeds(tokens[None], cfg.seed), tokens.device) if needs_noise(cfg) else None
                change = p.videos["change"][video] if cfg.method == "static" else None
                chosen[video] = select_video_tokens(tokens, metric, layout, cfg, rng, change)
            kept = chosen[video]
            state.kept.append(kept)
            dropped = torch.ones(layout.tokens, dtype=torch.bool, device=ids.device)
            dropped[kept] = False
            keep[row, span[dropped]] = False
    if bool(keep.all()):
        return state
    index, valid = pack_kept(keep)
    mask = kwargs.get("attention_mask")
    mask = torch.ones(bsz, length, dtype=torch.long, device=ids.device) if mask is None else mask
    state.mask = take_columns(mask, index) * valid
    state.columns, state.valid = index, valid
    state.dropped = (~keep).sum(1)
    positions = kwargs.get("position_ids")
    if positions is None:  # what the language model would use: 0 .. L-1
        positions = torch.arange(length, device=ids.device).expand(bsz, -1)
    if model.one_d_positions and cfg.positions == "renumbered":
        positions = positions - torch.cumsum(~keep, dim=1)
    kwargs["position_ids"] = take_columns(positions, index)
    kwargs["inputs_embeds"] = gather_tokens(embeds, index)
    kwargs["attention_mask"] = state.mask
    if kwargs.get("visual_pos_masks") is not None:  # Qwen3-VL's deepstack features follow the visual tokens
        visual = kwargs["visual_pos_masks"]
        kept_visual = keep[visual]
        kwargs["visual_pos_masks"] = take_columns(visual, index) & valid
        kwargs["deepstack_visual_embeds"] = [e[kept_visual] for e in kwargs["deepstack_visual_embeds"]]
    return state


def _decode(state: PrunedPrompt, kwargs: dict, past: int, renumbered: bool) -> dict:
    """Map a decoding step's stock-length mask and positions onto the pruned cache."""
    steps = kwargs["inputs_embeds"].shape[1]
    mask = kwargs.get("attention_mask")
    if mask is not None and not isinstance(mask, dict) and mask.dim() == 2:
        kwargs["attention_mask"] = torch.cat([state.mask, mask[:, state.stock_length :]], dim=1)
    positions = kwargs.get("position_ids")
    if positions is None:  # stock: the next columns of the full-length sequence
        shift = state.stock_length - state.pruned_length
        positions = torch.arange(past + shift, past + shift + steps, device=state.mask.device)
        positions = positions.expand(state.mask.shape[0], -1)
    if renumbered:
        positions = positions - state.dropped.view(-1, 1)
    kwargs["position_ids"] = positions
    return kwargs

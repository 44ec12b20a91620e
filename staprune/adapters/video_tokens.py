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
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core.baselines import unit_change
from ..core.config import STAConfig
from ..core.errors import ConfigError, UsageError
from ..core.score import PerSampleRandom, gather_tokens, sample_seeds
from ..core.video_methods import (
    Selection,
    VideoLayout,
    VideoTokens,
    in_language_model,
    needs_of,
    select_video_tokens,
)
from .in_language_model import LanguageModelCut, PendingVideo, install_cut
from .state import Patch


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


VideoInputs = Mapping[str, Any]  # the encoder method's arguments by name (``pixel_values_videos``, ...)


@dataclass
class VideoLLMModel:
    """Where a family's video LLM keeps what the hooks need; what differs between models is declared
    here, so the mechanism below never names a model.

    Attributes:
        inner: the ``*Model`` (vision tower, projector, language model): its forward receives
            ``input_ids``, its :attr:`encoder` method encodes the videos (``generate`` calls it
            before the first forward).
        outer: the ``*ForConditionalGeneration`` around ``inner`` (its loss reads ``labels``), or None.
        language_model: the decoder the pruned sequence goes to.
        video_token_id: the placeholder token of video features.
        layouts: the encoder's arguments -> one :class:`VideoLayout` per video, in the order the
            model scatters them (row-major over the batch); an empty list when the call encodes no
            video (a model that sends frames as images encodes images with the same method).
        encoder: the ``inner`` method that encodes videos (``get_video_features``).
        modality: the key of that method's output in ``generate``'s ``mm_encoder_outputs``.
        install_keys: registers hooks that record the vision tower's keys while
            ``p.encoding_video`` is set and returns a reader ``(encoder arguments) -> (P, d)``,
            one row per video token; None if unavailable (methods that need keys are refused).
        install_attention: as ``install_keys``, for the attention each video token received in the
            vision tower (``(P,)``, one value per video token; what it is for each tower:
            docs/families/methods.md); None if unavailable (methods that need it are refused).
        unit_pixels: the encoder's arguments -> per encoded item ``(units, per_unit, P)``, the
            (normalised) pixels each token covers, from which a method reads how much they changed
            since the previous unit (:func:`staprune.core.baselines.unit_change` over a whole video);
            None if unavailable.
        side_inputs: ``(kwargs, keep, index, valid)``: make the language model's other inputs
            follow the kept tokens (Qwen3-VL's DeepStack features), given ``keep`` ``(B, L)`` bool
            and :func:`pack_kept`'s ``index`` and ``valid``; None when there are none.
        group_videos: for a model that encodes a video's frames as images: ``(input_ids (L,), spans)``
            of one row, ``spans`` the placeholder columns of each encoded item the row holds, in
            order -> the videos, each a list of indices into ``spans`` (its frames, in order); items
            in no video are images and stay whole. None: every encoded item is one video.
        one_d_positions: the language model takes 1D positions (``positions="renumbered"`` allowed).
        follow_cut: ``(patch, language_model, active cut)``: hooks that make inputs the language model
            adds inside its layers follow the kept columns of a method inside it (FastV; Qwen3-VL's
            DeepStack features), given a function returning the
            :class:`~staprune.adapters.in_language_model.Cut` of the forward in flight or None.
    """

    inner: nn.Module
    outer: nn.Module | None
    language_model: nn.Module
    video_token_id: int
    layouts: Callable[[VideoInputs], list[VideoLayout]]
    encoder: str = "get_video_features"
    modality: str = "video"
    install_keys: Callable[[Patch, nn.Module], Callable[[VideoInputs], Tensor]] | None = None
    install_attention: Callable[[Patch, nn.Module], Callable[[VideoInputs], Tensor]] | None = None
    unit_pixels: Callable[[VideoInputs], list[Tensor]] | None = None
    side_inputs: Callable[[dict, Tensor, Tensor, Tensor], None] | None = None
    group_videos: Callable[[Tensor, list[Tensor]], list[list[int]]] | None = None
    one_d_positions: bool = False
    follow_cut: Callable[[Patch, nn.Module, Callable[[], object]], None] | None = None


class VideoPatch(Patch):
    """A patched video LLM's undo log and the state of the forward in flight.

    Attributes:
        encoding_video: set while the encoder method runs (the key hooks record only then).
        videos: the items of the forward in flight (videos, or a model's frames sent as images), as
            the encoder method encoded them (``layouts``, ``keys``, ``pixels``): in the forward, or
            before it by ``generate`` (then read off the ``mm_encoder_outputs`` it passes); empty
            outside a forward.
        input_ids: the input_ids of the forward in flight; None outside it.
        in_forward: the model's (``inner``'s) forward is running; a language-model call outside it
            is somebody else's and passes unchanged.
        foreign_videos: this forward received video features that staprune's encoder method did not make.
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
        self.cut: LanguageModelCut | None = None  # a method inside the language model (FastV)


CACHE_ATTR = "_staprune_pruned"  # the PrunedPrompt a KV cache was filled with (absent: a stock cache)
VIDEOS_ATTR = "_staprune_videos"  # on the encoder's output: its VideoPatch.videos


def install(p: VideoPatch, model: VideoLLMModel) -> None:
    """Hook ``model`` so its language model sees each prompt with the videos pruned."""
    needs = needs_of(p.config)
    read_keys = read_attention = None
    if "keys" in needs:
        if model.install_keys is None:
            raise ConfigError("this model has no vision keys staprune can read; use similarity='hidden'")
        read_keys = model.install_keys(p, model.inner)
    if "pixel_change" in needs and model.unit_pixels is None:
        raise ConfigError(f"method={p.config.method!r} reads each token's pixel change, which this model does not "
                          "give: use sta, random or uniform")
    layer = in_language_model(p.config)
    if layer is not None:
        p.cut = LanguageModelCut(p.config, layer)
        p.cut.on_cut = lambda made: _loss_follows_cut(p, made)
        install_cut(p, model.language_model, p.cut, model.follow_cut)
    elif "attention" in needs:
        if model.install_attention is None:
            raise ConfigError(f"method={p.config.method!r} reads the attention each token received in the vision "
                              "tower, which this model does not give")
        read_attention = model.install_attention(p, model.inner)
    inner = model.inner
    stock = getattr(type(inner), model.encoder)
    signature = inspect.signature(stock)

    # generate() passes the encoder the model kwargs its signature names: keep the stock one.
    @functools.wraps(getattr(inner, model.encoder))
    def encode(*args, **kwargs):
        bound = signature.bind(inner, *args, **kwargs)
        bound.apply_defaults()
        inputs = bound.arguments
        p.encoding_video = True
        try:
            out = stock(inner, *args, **kwargs)
        finally:
            p.encoding_video = False
        layouts = model.layouts(inputs)
        if not layouts:  # images only (a model that encodes frames and images with one method)
            return out
        videos = {"layouts": layouts,
                  "keys": None if read_keys is None else read_keys(inputs),
                  "attention": None if read_attention is None else read_attention(inputs),
                  "pixels": model.unit_pixels(inputs) if "pixel_change" in needs else None}
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
        given = (kwargs.get("mm_encoder_outputs") or {}).get(model.modality)
        p.videos = {} if given is None else getattr(given, VIDEOS_ATTR, {})
        p.foreign_videos = given is not None and not p.videos

    def end_forward(module, args, kwargs, output):
        p.input_ids, p.videos, p.in_forward, p.foreign_videos, p._prefilled = None, {}, False, False, None
        if p.cut is not None:
            p.cut.finish()

    p.override_method(inner, model.encoder, encode)
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
    needs = needs_of(cfg)
    merged_rows: list[tuple[int, Tensor, Tensor]] = []
    placeholders = ids == model.video_token_id
    keys, attention = p.videos.get("keys"), p.videos.get("attention")
    starts = [0]  # each encoded video's first row in keys
    for layout in layouts:
        starts.append(starts[-1] + layout.tokens)
    chosen: dict[tuple[int, ...], Selection] = {}
    pending: list[PendingVideo] = []  # a method inside the language model selects there
    keep = torch.ones(bsz, length, dtype=torch.bool, device=ids.device)
    for row, held in enumerate(videos_of_rows(ids, model.video_token_id, layouts)):
        cols, start, spans = placeholders[row].nonzero().flatten(), 0, []
        for item in held:
            spans.append(cols[start : start + layouts[item].tokens])
            start += layouts[item].tokens
        groups = model.group_videos(ids[row], spans) if model.group_videos else [[k] for k in range(len(held))]
        if not groups:
            state.kept.append(no_video)
            continue
        for group in groups:
            video = tuple(held[k] for k in group)  # the encoded items (a video, or a model's frames) it joins
            layout = joined_layout([layouts[item] for item in video])
            span = torch.cat([spans[k] for k in group])
            if p.cut is not None:
                pending.append(PendingVideo(row, span, layout, len(state.kept)))
                state.kept.append(no_video)
                continue
            if video not in chosen:  # a copy of a prompt (beams, returned sequences) reuses its selection
                tokens = embeds[row, span]
                rng = PerSampleRandom(sample_seeds(tokens[None], cfg.seed), tokens.device) if "noise" in needs else None
                chosen[video] = select_video_tokens(VideoTokens(
                    tokens, layout, keys=None if keys is None else torch.cat([keys[starts[i] : starts[i + 1]] for i in video]),
                    change=unit_change(torch.cat([p.videos["pixels"][i] for i in video])) if "pixel_change" in needs
                    else None,
                    attention=None if attention is None else torch.cat([attention[starts[i] : starts[i + 1]]
                                                                        for i in video]),
                    rng=rng), cfg)
            selection = chosen[video]
            kept = selection.kept
            if selection.merged is not None:  # a merging method: kept tokens carry what merged into them
                merged_rows.append((row, span[kept], selection.merged))
            state.kept.append(kept)
            dropped = torch.ones(layout.tokens, dtype=torch.bool, device=ids.device)
            dropped[kept] = False
            keep[row, span[dropped]] = False
    if pending:
        p.cut.start(pending, state.kept)
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
    if merged_rows:
        embeds = embeds.clone()
        for row, columns, values in merged_rows:
            embeds[row, columns] = values.to(embeds.dtype)
    kwargs["inputs_embeds"] = gather_tokens(embeds, index)
    kwargs["attention_mask"] = state.mask
    if model.side_inputs is not None:
        model.side_inputs(kwargs, keep, index, valid)
    return state


def _loss_follows_cut(p: VideoPatch, made) -> None:
    """The logits of a forward cut inside the language model cover the kept columns: so do its labels."""
    p.applied = PrunedPrompt(kept=p.state.kept if p.state else [], stock_length=made.stock_length,
                             mask=made.valid.long(), columns=made.index, valid=made.valid)


def joined_layout(items: list[VideoLayout]) -> VideoLayout:
    """One video of encoded items laid out alike (a model that sends frames as images: one unit
    each), in order; a single item is its own layout."""
    if len(items) == 1:
        return items[0]
    first = items[0]
    if any((i.rows, i.cols, i.tail) != (first.rows, first.cols, 0) for i in items) or first.tail:
        raise UsageError(f"the frames of one video differ in layout ({items}); pass each video's frames at one size")
    return VideoLayout(sum(i.units for i in items), first.rows, first.cols)


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

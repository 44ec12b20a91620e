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
  keeps onto the pruned cache (the KV cache holds only kept tokens).

Nothing else changes: text, images and the video's special tokens (vision start/end, LLaVA's
newline) stay, so ``processor.apply_chat_template`` inputs and ``generate`` work unchanged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
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
        kept: per video (in the order the model consumed them), original indices into that
            video's placeholder tokens (:func:`staprune.kept_tokens`).
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
    """A patched video LLM's undo log, the videos last encoded and the prompt in flight."""

    def __init__(self, config: STAConfig) -> None:
        super().__init__(config)
        self.encoding_video = False
        self.videos: dict = {}
        self.input_ids: Tensor | None = None
        self.state: PrunedPrompt | None = None
        self.labels: Tensor | None = None


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
        p.videos = {"layouts": model.layouts(pixels, grid),
                    "keys": None if read_keys is None else read_keys(pixels, grid),
                    "change": model.pixel_change(pixels, grid) if p.config.method == "static" else None}
        return out

    def remember_input_ids(module, args, kwargs):
        p.input_ids = args[0] if args else kwargs.get("input_ids")

    p.override_method(inner, "get_video_features", get_video_features)
    p.hook(inner, remember_input_ids, pre=True, with_kwargs=True)
    p.hook(model.language_model, lambda module, args, kwargs: _language_model_inputs(p, model, kwargs),
           pre=True, with_kwargs=True)
    if model.outer is not None:
        _install_pruned_loss(p, model.outer)


def _install_pruned_loss(p: VideoPatch, outer: nn.Module) -> None:
    """The stock loss compares stock-length labels with the pruned logits: hold the labels back and
    compute the same loss on the labels of the kept columns (a label follows its token)."""

    def hold_labels(module, args, kwargs):
        p.labels = kwargs.get("labels")
        if p.labels is None:
            return None
        kwargs["labels"] = None
        return args, kwargs

    def pruned_loss(module, args, kwargs, output):
        labels, p.labels = p.labels, None
        if labels is None:
            return None
        state = p.state
        if state is not None and state.pruned and labels.shape[-1] == state.stock_length:
            labels = state.shorten(labels, fill=-100)  # -100: the loss's ignore index
        extra = {k: kwargs[k] for k in ("num_items_in_batch",) if k in kwargs}
        output.loss = module.loss_function(logits=output.logits, labels=labels,
                                           vocab_size=module.config.text_config.vocab_size, **extra)
        return output

    p.hook(outer, hold_labels, pre=True, with_kwargs=True)
    p.hook(outer, pruned_loss, with_kwargs=True)


def _language_model_inputs(p: VideoPatch, model: VideoLLMModel, kwargs: dict):
    cache = kwargs.get("cache")
    past = 0 if cache is None else cache.get_seq_length()
    ids = p.input_ids
    has_video = ids is not None and bool((ids == model.video_token_id).any())
    if past == 0:
        p.state = _prefill(p, model, kwargs, ids, has_video)
        return None if not p.state.pruned else ((), kwargs)
    state = p.state
    if has_video:
        raise UsageError("a pruned video LLM cannot add a video to a cached conversation; start the prompt anew")
    if state is None or not state.pruned:
        return None
    return (), _decode(state, kwargs, past, model.one_d_positions and p.config.positions == "renumbered")


def _prefill(p: VideoPatch, model: VideoLLMModel, kwargs: dict, ids: Tensor | None, has_video: bool) -> PrunedPrompt:
    embeds = kwargs.get("inputs_embeds")
    if ids is None:
        raise UsageError("a pruned video LLM needs input_ids (it finds the video tokens by their placeholder id), "
                         "not inputs_embeds")
    if not has_video:
        raise UsageError("this prompt has no video: staprune prunes video tokens, so a patched video LLM needs "
                         "pixel_values_videos with video placeholders (processor(videos=...)); "
                         "staprune.unpatch(model) for text or image prompts")
    cfg = p.config
    layouts = p.videos.get("layouts", [])
    bsz, length = ids.shape
    rows, cols = (ids == model.video_token_id).nonzero(as_tuple=True)
    if sum(v.tokens for v in layouts) != rows.numel():
        raise UsageError(f"the prompt has {rows.numel()} video placeholder tokens but its videos make "
                         f"{sum(v.tokens for v in layouts)}; pass the processor's input_ids with its video tensors")
    keys = p.videos.get("keys")
    keep = torch.ones(bsz, length, dtype=torch.bool, device=ids.device)
    state = PrunedPrompt(stock_length=length)
    start = 0
    for video, layout in enumerate(layouts):
        row, span = rows[start], cols[start : start + layout.tokens]
        if not bool((rows[start : start + layout.tokens] == row).all()):
            raise UsageError("a video's placeholder tokens must all be in one prompt")
        tokens = embeds[row, span]
        metric = keys[start : start + layout.tokens] if keys is not None else normalize_metric(tokens)
        rng = PerSampleRandom(sample_seeds(tokens[None], cfg.seed), tokens.device) if needs_noise(cfg) else None
        change = p.videos["change"][video] if cfg.method == "static" else None
        kept = select_video_tokens(tokens, metric, layout, cfg, rng, change)
        state.kept.append(kept)
        dropped = torch.ones(layout.tokens, dtype=torch.bool, device=ids.device)
        dropped[kept] = False
        keep[row, span[dropped]] = False
        start += layout.tokens
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

"""A video-token method that acts inside the language model (FastV): after decoder layer ``K`` the
later layers, and their KV cache, see only the kept video tokens.

The language model runs its stock forward; hooks on its decoder layers do the rest:

1. layer ``K - 1``'s attention is tapped (:mod:`.attention_tap`): it runs as it did, and the last
   query's attention over every key, averaged over heads, is kept (``(B, L)``: one row of one
   layer's map);
2. before layer ``K``, each video's method picks its tokens from that row; the hidden states, the
   rotary embeddings, the positions and the mask of every later layer follow the kept columns
   (:class:`Cut`), the kept tokens keeping their stock positions;
3. a decoding step's mask (over the full-length cache of the first ``K`` layers) is mapped onto the
   later layers' shorter cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.config import STAConfig
from ..core.errors import ConfigError, UsageError
from ..core.video_methods import VideoLayout, VideoTokens, last_query_attention, select_video_tokens
from .attention_tap import tap_attention
from .state import Patch

CUT_ATTR = "_staprune_cut"  # on a KV cache: the Cut its later layers were filled with


@dataclass
class Cut:
    """The columns the layers after ``K`` keep of a prompt of ``stock_length`` columns.

    Attributes:
        index: ``(B, L')`` the stock column of each kept column (left padding reads column 0).
        valid: ``(B, L')`` False on the left padding rows with fewer kept tokens get.
        keep: ``(B, L)`` bool, the kept stock columns.
    """

    index: Tensor
    valid: Tensor
    keep: Tensor
    stock_length: int


@dataclass
class PendingVideo:
    """One video of the prefill in flight, to select at layer ``K``: its row, its placeholder columns
    ``(L_v,)``, its layout, and where its kept indices go in :func:`staprune.kept_tokens`."""

    row: int
    span: Tensor
    layout: VideoLayout
    slot: int


class LanguageModelCut:
    """The state of an in-language-model method on one patched model (see the module docstring)."""

    def __init__(self, config: STAConfig, layer: int) -> None:
        self.config = config
        self.layer = layer
        self.pending: list[PendingVideo] = []  # this prefill's videos (set before the language model runs)
        self.kept: list[Tensor] | None = None  # the prefill's kept_tokens list, filled at layer K
        self.attention: Tensor | None = None  # (B, L) layer K - 1's last-query row
        self.active: Cut | None = None  # the cut of the forward in flight
        self.memo: dict[int, object] = {}  # per forward: a stock tensor's id -> its cut form
        self.on_cut: Callable[[Cut], None] = lambda made: None  # told each cut made (the loss follows it)

    def start(self, pending: list[PendingVideo], kept: list[Tensor]) -> None:
        self.pending, self.kept, self.attention, self.active, self.memo = pending, kept, None, None, {}

    def finish(self) -> None:
        self.pending, self.kept, self.attention, self.active, self.memo = [], None, None, None, {}


def install_cut(p: Patch, language_model: nn.Module, cut: LanguageModelCut,
                follow_cut: Callable[[Patch, nn.Module, Callable[[], Cut | None]], None] | None) -> None:
    """Hook ``language_model``'s decoder layers for ``cut`` (undone with ``p``).

    Raises:
        ConfigError: ``K`` is not below the language model's depth, or its attention cannot be read.
    """
    layers = getattr(language_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"{p.config.method} prunes inside the language model, whose decoder layers this model "
                          "does not list as .layers")
    if not 1 <= cut.layer < len(layers):
        raise ConfigError(f"fastv_layer={cut.layer} must be between 1 and {len(layers) - 1}: the language model "
                          f"has {len(layers)} decoder layers")
    attention = getattr(layers[cut.layer - 1], "self_attn", None)
    if attention is None:
        raise ConfigError(f"{p.config.method} reads the attention of decoder layer {cut.layer - 1}, which has no "
                          "self_attn here")

    def keep_last_query(module: nn.Module, query: Tensor, key: Tensor, mask: Tensor | None, scaling: float) -> None:
        if cut.pending and query.shape[2] > 1:  # a prefill with videos to cut
            cut.attention = last_query_attention(query, key, mask, scaling)

    tap_attention(p, attention, keep_last_query, p.config.method)
    for number, layer in enumerate(layers):
        if number >= cut.layer:
            p.hook(layer, _cut_hook(cut, number), pre=True, with_kwargs=True)
    if follow_cut is not None:
        follow_cut(p, language_model, lambda: cut.active)


def _cut_hook(cut: LanguageModelCut, number: int):
    """The pre-hook of decoder layer ``number`` after ``K`` (at layer ``K`` the cut is made)."""
    first = number == cut.layer

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if first and cut.pending:
            cut.active = _make_cut(cut, hidden)
            cut.on_cut(cut.active)
            if cache is not None:
                setattr(cache, CUT_ATTR, cut.active)
        state = cut.active if cut.active is not None else getattr(cache, CUT_ATTR, None)
        if state is None:
            return None
        prefill = cut.active is not None
        if prefill and hidden.shape[1] == state.stock_length:
            hidden = hidden.gather(1, state.index[..., None].expand(-1, -1, hidden.shape[-1]))
        kwargs = dict(kwargs)
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        mask = kwargs.get("attention_mask")
        if mask is None and not bool(state.valid.all()):  # the cut padded a row: the mask must say so
            past = 0 if prefill or cache is None else cache.get_seq_length(number)
            mask = _padding_mask(state, prefill, hidden.shape[1], past, module)
        else:
            mask = _memo(cut, mask, lambda m: _cut_mask(m, state, prefill))
        kwargs["attention_mask"] = mask
        if prefill:
            for name in ("position_embeddings", "position_ids"):
                if kwargs.get(name) is not None:
                    kwargs[name] = _memo(cut, kwargs[name], lambda v: _cut_columns(v, state))
        return args, kwargs

    return hook


def _make_cut(cut: LanguageModelCut, hidden: Tensor) -> Cut:
    """Select every pending video's tokens from layer ``K - 1``'s last-query row."""
    if cut.attention is None:
        raise UsageError(f"{cut.config.method} found no attention from decoder layer {cut.layer - 1} in this "
                         "forward; the language model's layers ran in an order it does not know")
    bsz, length = hidden.shape[:2]
    keep = torch.ones(bsz, length, dtype=torch.bool, device=hidden.device)
    for video in cut.pending:
        selection = select_video_tokens(VideoTokens(hidden[video.row, video.span], video.layout,
                                                    attention=cut.attention[video.row, video.span]), cut.config)
        cut.kept[video.slot] = selection.kept
        dropped = torch.ones(video.span.numel(), dtype=torch.bool, device=hidden.device)
        dropped[selection.kept] = False
        keep[video.row, video.span[dropped]] = False
    cut.pending = []
    counts = keep.sum(1)
    width = int(counts.max())
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    source = torch.arange(width, device=keep.device)[None] - (width - counts)[:, None]
    return Cut(order.gather(1, source.clamp(min=0)), source >= 0, keep, length)


def _memo(cut: LanguageModelCut, value, make):
    """Every layer after ``K`` gets the same stock mask and embeddings: cut them once per forward
    (None, causal over columns that keep their order, stays None)."""
    if value is None or isinstance(value, dict):
        return value
    key = id(value)
    if key not in cut.memo:
        cut.memo[key] = (value, make(value))  # the stock tensor held: its id stays its own
    return cut.memo[key][1]


def _cut_columns(value, state: Cut):
    """Rotary ``(cos, sin)`` ``(B, L, d)`` or positions ``(..., B, L)`` at the kept columns."""
    if isinstance(value, tuple):
        return tuple(_cut_columns(v, state) for v in value)
    index = state.index
    if value.dim() == 3 and value.shape[1] == state.stock_length:  # (B or 1, L, d)
        value = value.expand(index.shape[0], -1, -1)
        return value.gather(1, index[..., None].expand(-1, -1, value.shape[-1]))
    value = value.expand(*value.shape[:-2], index.shape[0], -1)  # (..., 1, L): one row for the batch
    return value.gather(-1, index.expand(*value.shape[:-2], *index.shape))


def _padding_mask(state: Cut, prefill: bool, queries: int, past: int, layer: nn.Module) -> Tensor:
    """Where the stock model had no mask (causal, no padding) but the cut padded a row: causal over
    the kept columns (the prefill) or every kept and generated one (a decoding step of ``queries``
    tokens after ``past`` in this layer's cache), the new padding masked; bool, or additive for eager
    attention."""
    valid = state.valid
    bsz, kept = valid.shape
    keys = kept if prefill else past + queries
    mask = torch.ones(queries, keys, dtype=torch.bool, device=valid.device).tril(keys - queries)
    mask = mask[None, None].expand(bsz, 1, -1, -1)
    padding = torch.cat([~valid, valid.new_zeros(bsz, keys - kept)], dim=1)[:, None, None, :]
    mask = mask & ~padding
    if prefill:  # a padding row attends to itself (no row without a key: no NaN)
        mask = mask | torch.eye(kept, dtype=torch.bool, device=mask.device)[None, None] & ~valid[:, None, :, None]
    attention = getattr(layer, "self_attn", None)
    if getattr(getattr(attention, "config", None), "_attn_implementation", "sdpa") == "eager":
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask


def _cut_mask(mask: Tensor, state: Cut, prefill: bool) -> Tensor:
    """The mask a layer after ``K`` needs from the stock ``(B, 1, q, k)`` (bool: True attends; float:
    added): the stock prompt's key columns mapped onto the kept ones (and, at the prefill, its query
    rows too); the new left padding masked as a key."""
    index, valid = state.index, state.valid
    bsz, kept = index.shape
    mask = mask.expand(bsz, -1, -1, -1)
    tail = mask[..., state.stock_length :]  # the decoding steps' own columns
    columns = index[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1)
    cut = torch.cat([mask[..., : state.stock_length].gather(3, columns), tail], dim=3)
    if prefill and cut.shape[2] == state.stock_length:
        cut = cut.gather(2, index[:, None, :, None].expand(-1, cut.shape[1], -1, cut.shape[3]))
    padding = torch.cat([~valid, valid.new_zeros(bsz, cut.shape[3] - kept)], dim=1)[:, None, None, :]
    if cut.dtype == torch.bool:
        cut = cut & ~padding
        if prefill:  # a padding row attends to itself (no row without a key: no NaN)
            cut = cut | torch.eye(kept, dtype=torch.bool, device=cut.device)[None, None] & ~valid[:, None, :, None]
        return cut
    low = torch.finfo(cut.dtype).min
    cut = cut.masked_fill(padding, low)
    if prefill:
        own = torch.eye(kept, dtype=torch.bool, device=cut.device)[None, None] & ~valid[:, None, :, None]
        cut = cut.masked_fill(own, 0.0)
    return cut


__all__ = ["CUT_ATTR", "Cut", "LanguageModelCut", "PendingVideo", "install_cut"]

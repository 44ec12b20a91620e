"""VisionZip (Yang et al., CVPR 2025, "VisionZip: Longer is Better but Not Necessary in Vision Language
Models"), as its released code selects (github.com/dvlab-research/VisionZip: ``visionzip/clip_encoder.py``
for LLaVA, ``Qwen2_5_VL/qwen2_5vl_visionzip.py`` for Qwen2.5-VL): each temporal unit keeps its
*dominant* tokens, those the vision tower attends to most, and a few *contextual* tokens into which the
rest are merged.

Per temporal unit (a frame, or Qwen's two-frame temporal patch), on the tokens the language model
receives:

1. split the unit's ``keep`` into ``dominant + contextual``: ``contextual = int(keep * share)``, at least
   one when the share is above zero (the Qwen release's ``max(int(.), 1)``), at most ``keep - 1`` so one
   token is always dominant; ``share`` is ``visionzip_contextual_share``, 10/64 by default, the
   release's LLaVA-1.5 split (54 dominant + 10 contextual of 64);
2. dominant: the ``dominant`` tokens of highest ``video.attention``, the attention each token receives in
   the vision tower (the [CLS] row for CLIP, the mean over queries for towers without one: the model
   adapter computes it);
3. the other tokens, in position order, are L2-normalised keys (``video.keys``: the vision keys of the
   same layer, averaged over heads); every ``step = max(1, rest // contextual)``-th of them, the first
   ``contextual``, is a *target*;
4. each remaining token goes to its target of highest cosine similarity (the first on a tie);
5. a contextual token is its target's token plus the mean of the tokens assigned to it (the target
   alone when none is): the release adds the mean to the target, it does not average them together.

A contextual token takes its target's stock position, as the Qwen2.5-VL release places it (it writes the
merged value into the target's column and keeps that column's position ids); dominant tokens keep
theirs. Departures from the release:

- the count: exactly ``keep`` per unit (staprune's budget), split by the share; the LLaVA release takes
  two integers, the Qwen release ``int(0.65 N)`` dominant and ``max(int(0.05 N), 1)`` contextual of the
  ``N`` tokens (a share of all tokens, not of the kept ones);
- no [CLS]: LLaVA's release keeps CLIP's [CLS] token as one of its dominant tokens (``dominant=54`` is
  [CLS] and 53 patches); the language model here receives no [CLS], so every dominant slot is a patch;
- where it merges: the LLaVA release merges CLIP features before the projector; this merges the
  projected tokens, as the Qwen2.5-VL release does (it merges ``inputs_embeds``);
- order: the LLaVA release concatenates the dominant tokens, then the contextual ones; here every token
  sits at its stock position (ascending), as in the Qwen release;
- per unit: the Qwen release selects over all of an image's tokens at once and has no video path; here
  each temporal unit gets its own dominant and contextual tokens (what VisionZip's video use and its
  LLaVA-OneVision follow-up, DyToK's static VisionZip, do per frame);
- ties among attention scores go by position (the release's ``topk`` leaves them unspecified).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import STAConfig
from ..errors import ConfigError
from ..score import stable_argsort
from .registry import MethodOption, Selection, VideoMethod, VideoTokens, method_options, register_video_method

SHARE = MethodOption(
    "visionzip_contextual_share",
    10 / 64,
    lambda v: 0 <= v <= 1,
    "a number in [0, 1]",
    "the share of each unit's kept tokens that are contextual (merged); the rest are dominant (the release's "
    "LLaVA-1.5 split, 10 of 64)",
)


def _share(config: STAConfig) -> float:
    return float(method_options(config).get(SHARE.name, SHARE.default))


def split_budget(keep: int, share: float) -> tuple[int, int]:
    """``(dominant, contextual)`` of a unit keeping ``keep >= 1`` tokens: ``int(keep * share)``
    contextual, at least one when ``share > 0``, and always at least one dominant."""
    contextual = math.floor(keep * share)
    if share > 0:
        contextual = max(contextual, 1)  # the Qwen release's max(int(.), 1)
    contextual = min(contextual, keep - 1)
    return keep - contextual, contextual


def visionzip_select(video: VideoTokens, keep: int, config: STAConfig) -> Selection:
    """``keep`` tokens of each unit: its dominant tokens and its contextual (merged) ones.

    Reads ``video.attention`` ``(L_v,)`` and, when any token is contextual, ``video.keys`` ``(L_v, c)``.

    Returns:
        :class:`Selection`: ``kept`` ``(units * keep,)`` ascending and ``merged`` ``(units * keep, C)``,
        a dominant token's own value or a contextual token's merged one.
    """
    layout = video.layout
    units, n = layout.units, layout.per_unit
    dominant, contextual = split_budget(keep, _share(config))
    if video.attention is None:
        raise ConfigError(
            "visionzip ranks tokens by the attention they receive in the vision tower; it runs on a "
            "patched video LLM whose adapter computes it, not on tokens alone"
        )
    if contextual and video.keys is None:
        raise ConfigError(
            "visionzip merges its contextual tokens by vision-key similarity; the model's adapter "
            "gives no keys (or set visionzip_contextual_share=0 to keep dominant tokens only)"
        )
    device = video.tokens.device
    attention = video.attention[: layout.body].float().view(units, n)
    is_dominant = torch.zeros(units, n, dtype=torch.bool, device=device)
    is_dominant.scatter_(1, stable_argsort(attention, descending=True)[:, :dominant], True)
    if not contextual:
        kept = is_dominant.view(-1).nonzero().flatten()
        return Selection(kept, video.tokens[kept])

    rest = n - dominant
    others = (~is_dominant).nonzero()[:, 1].view(units, rest)  # each unit's non-dominant tokens, ascending
    slots = torch.arange(0, rest, max(1, rest // contextual), device=device)[:contextual]
    is_target = torch.zeros(rest, dtype=torch.bool, device=device)
    is_target[slots] = True
    targets, merging = others[:, is_target], others[:, ~is_target]  # (U, contextual), (U, rest - contextual)

    row = torch.arange(units, device=device).unsqueeze(1)
    keys = video.keys[: layout.body].view(units, n, -1)
    to_merge, target_keys = (F.normalize(keys[row, idx].float(), dim=-1) for idx in (merging, targets))
    similarity = to_merge @ target_keys.transpose(1, 2)  # cosine similarity of the keys
    assigned = similarity.argmax(dim=-1)  # (U, rest - contextual): each token's most similar target
    x = video.tokens[: layout.body].view(units, n, -1)
    width = x.shape[-1]
    sums = torch.zeros(units, contextual, width, device=device).scatter_add_(
        1, assigned.unsqueeze(-1).expand(-1, -1, width), x[row, merging].float()
    )
    counts = torch.zeros(units, contextual, device=device)
    counts = counts.scatter_add_(1, assigned, torch.ones(assigned.shape, device=device)).clamp(min=1)
    merged_values = x[row, targets].float() + sums / counts.unsqueeze(-1)  # the target plus the mean merged into it

    chosen = is_dominant.clone()
    chosen[row, targets] = True
    kept = chosen.view(-1).nonzero().flatten()
    merged = video.tokens[kept].clone()
    flat_targets = (targets + row * n).flatten()
    merged[torch.searchsorted(kept, flat_targets)] = merged_values.view(-1, width).to(merged.dtype)
    return Selection(kept, merged)


METHOD = register_video_method(
    VideoMethod(
        "visionzip",
        visionzip_select,
        needs=lambda config: frozenset({"attention", "keys"}) if _share(config) > 0 else frozenset({"attention"}),
        options=(SHARE,),
        description="VisionZip: per unit, the tokens the vision tower attends to most, and the rest merged by key "
        "similarity into a few uniformly spaced contextual tokens",
    )
)

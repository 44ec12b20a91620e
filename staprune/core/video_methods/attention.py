"""The attention a video-token method reads, as tensor functions (no model here): FastV's row of one
language-model layer's attention."""

from __future__ import annotations

import torch
from torch import Tensor

from ..selection_hook import selection_function


@selection_function  # FastV's cost: one row of one layer's attention, beside the model's
def last_query_attention(query: Tensor, key: Tensor, mask: Tensor | None, scaling: float) -> Tensor:
    """The last query's attention over every key, averaged over heads: ``(B, L_k)``.

    Args:
        query: ``(B, H, L_q, d)``; key: ``(B, h, L_k, d)`` with ``H`` a multiple of ``h`` (grouped keys).
        mask: ``(B, 1, L_q, >= L_k)`` bool (True attends) or additive float, or None (causal: the last
            query sees every key).
    """
    q = query[:, :, -1:].float()
    k = key.float().repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * scaling  # (B, H, 1, L_k)
    if mask is not None:
        row = mask[:, :, -1:, : k.shape[2]]
        scores = scores.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else scores + row.float()
    return scores.softmax(-1).mean(1)[:, 0]


__all__ = ["last_query_attention"]

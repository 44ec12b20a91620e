"""The attention a video-token method reads, as tensor functions (no model here): FastV's row of one
language-model layer's attention, and the attention each vision token receives (VisionZip's
dominant tokens), neither keeping a whole attention map."""

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



QUERY_CHUNK = 1024  # queries per step: (B, H, 1024, L) scores at a time, never (B, H, L, L)


@selection_function  # VisionZip's cost: the layer's scores once more, a chunk of queries at a time
def attention_received(query: Tensor, key: Tensor, scaling: float, queries: slice | None = None) -> Tensor:
    """The attention each key receives, averaged over heads and over ``queries`` (default: every
    query): ``(B, L_k)``; each row of the softmax sums to one, so a row of the result does too.

    Args:
        query: ``(B, H, L_q, d)``; key: ``(B, h, L_k, d)``, ``H`` a multiple of ``h``; no mask (a vision
            tower's tokens see each other within each call).
        queries: the query rows to average over (``slice(0, 1)``: a [CLS] token's row).
    """
    q = query[:, :, queries] if queries is not None else query
    k = key.float().repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    total = k.new_zeros(k.shape[0], k.shape[2])
    for start in range(0, q.shape[2], QUERY_CHUNK):
        scores = (q[:, :, start : start + QUERY_CHUNK].float() @ k.transpose(-1, -2)) * scaling
        total += scores.softmax(-1).sum(dim=(1, 2))
    return total / (q.shape[1] * q.shape[2])


__all__ = ["attention_received", "last_query_attention"]

"""Temporal redundancy: the trajectory sum ``S`` of the paper's Eq. (6) (Sec. 3.3, Table 1).

For a clip with ``n_t`` frames whose last frame has tokens ``X_{-1}`` (``n_s x d``)::

    S = 1/n_s * sum_i sum_{t < n_t - 1} max_j cos(X_{-1,i}, X_{t,j})

Every last-frame token looks for its most similar token in each earlier frame; ``S`` sums those
best similarities over the earlier frames and averages over the last frame's tokens. Identical
frames give the maximum ``n_t - 1``.

Pruned models keep a different set of tokens in every frame, so the definition here works on
whatever tokens a frame still has: ``i`` runs over the *kept* tokens of the last frame and ``j``
over the *kept* tokens of frame ``t``. A token's frame is the original tubelet-frame of the
token (its kept index ``// tokens_per_frame``), not its position in the pruned sequence. An
earlier frame with no kept token contributes 0 (nothing in it resembles anything); a clip whose
last frame has no kept token has no ``S`` (NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def trajectory_sum(frames: Sequence[Tensor]) -> float:
    """Eq. (6) for one clip given its tokens frame by frame.

    Args:
        frames: ``n_t`` tensors, frame ``t`` of shape ``(n_s_t, d)``; counts may differ per frame
            (pruned models). The last one is the probe frame ``X_{-1}``.

    Returns:
        ``S`` as a float in ``[-(n_t - 1), n_t - 1]``; NaN when the last frame is empty.
    """
    if len(frames) < 2:
        raise ValueError(f"the trajectory sum needs at least 2 frames, got {len(frames)}")
    last = F.normalize(frames[-1].double(), dim=-1)
    if last.shape[0] == 0:
        return float("nan")
    total = torch.zeros((), dtype=torch.float64)
    for earlier in frames[:-1]:
        if earlier.shape[0] == 0:
            continue  # an emptied frame offers no similar token: contributes 0
        sims = last @ F.normalize(earlier.double(), dim=-1).T  # (n_s_last, n_s_t)
        total += sims.max(dim=1).values.sum()
    return float(total / last.shape[0])


def split_by_frame(tokens: Tensor, frame_of_token: Tensor, num_frames: int) -> list[Tensor]:
    """Group one clip's tokens by their original frame, in temporal order.

    Args:
        tokens: ``(L, d)`` tokens of one clip (any order, e.g. a pruned sequence).
        frame_of_token: ``(L,)`` original frame index of every token, in ``[0, num_frames)``.
        num_frames: ``n_t``; frames without tokens come back as ``(0, d)`` tensors.

    Returns:
        ``num_frames`` tensors ``(n_s_t, d)``.
    """
    if frame_of_token.shape != tokens.shape[:1]:
        raise ValueError(f"{tuple(frame_of_token.shape)} frame indices for {tokens.shape[0]} tokens")
    return [tokens[frame_of_token == t] for t in range(num_frames)]


def clip_trajectory_sums(
    tokens: Tensor, source: Tensor | None, num_frames: int, tokens_per_frame: int
) -> Tensor:
    """Trajectory sum of every clip of a batch of final-block tokens.

    Args:
        tokens: ``(B, L, d)`` final-block tokens.
        source: ``(B, L)`` original flat index ``t * tokens_per_frame + s`` of every token
            (``staprune.kept_tokens(model)[-1]``), or ``None`` for a dense model (token ``k`` is
            original token ``k``).
        num_frames: ``n_t`` frames (tubelet-frames for ViT, temporal positions for Swin).
        tokens_per_frame: ``n_s`` of the unpruned grid the indices refer to.

    Returns:
        ``(B,)`` float64 trajectory sums.
    """
    bsz, length, _ = tokens.shape
    if source is None:
        if length != num_frames * tokens_per_frame:
            raise ValueError(f"{length} dense tokens are not {num_frames} frames x {tokens_per_frame}")
        source = torch.arange(length, device=tokens.device).expand(bsz, -1)
    if source.shape != (bsz, length):
        raise ValueError(f"source indices {tuple(source.shape)} do not match tokens {tuple(tokens.shape)}")
    frame = source // tokens_per_frame
    sums = [trajectory_sum(split_by_frame(tokens[b], frame[b], num_frames)) for b in range(bsz)]
    return torch.tensor(sums, dtype=torch.float64)


__all__ = ["clip_trajectory_sums", "split_by_frame", "trajectory_sum"]

"""Token importance by gradient: GradNorm of the paper's Eq. (7) (Sec. 3.3, Fig. 3).

    GradNorm = sum_l sum_c | dL / dX^l_{., ., c} |      (one value per token, n_t x n_s)

Choices left open by the paper, fixed here:

* ``X^l`` is the **output** of transformer block ``l`` (l = 1..L), on the dense (unpatched) model.
  Block ``l``'s output is block ``l+1``'s input, so this differs from "inputs" only in counting the
  last block's output instead of the patch embedding.
* ``L`` is the cross-entropy of the model's own predicted label (argmax of its logits), since
  test videos have no label at hand; the model runs in eval mode (no dropout).
* Video Swin blocks live on four grids. Every block's map is resampled to one target grid with
  area averaging scaled by the area ratio, so each block contributes the same total as on its
  own grid (exact when the grids divide evenly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import Backbone, StageGrid, predicted_loss


def _resample_mass(heat: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, T, h, w)`` -> ``(B, T, *size)`` keeping each frame's total (area average x area ratio)."""
    bsz, frames, h, w = heat.shape
    if (h, w) == size:
        return heat
    pooled = F.adaptive_avg_pool2d(heat.reshape(bsz * frames, 1, h, w), size)
    return pooled.view(bsz, frames, *size) * (h * w / (size[0] * size[1]))


def gradnorm(model: nn.Module, backbone: Backbone, x: Tensor, grid: StageGrid | None = None) -> Tensor:
    """GradNorm per token of every clip of a batch.

    Args:
        model: a dense (unpatched) classifier in eval mode.
        backbone: its geometry (:func:`staprune.analysis.backbones.describe`).
        x: model input (in the family's layout, :meth:`Backbone.model_input`).
        grid: the grid to report on; default the first block's grid (ViT: the only one).

    Returns:
        float ``(B, grid.frames, grid.height, grid.width)``; clips are independent (each clip's
        loss only depends on its own tokens in eval mode).
    """
    grid = grid or backbone.blocks(model)[0][1]
    blocks = backbone.blocks(model)
    outputs: list[Tensor] = []
    handles = [
        block.register_forward_hook(lambda m, i, o: outputs.append(o[0] if isinstance(o, tuple) else o))
        for block, _ in blocks
    ]
    try:
        with torch.enable_grad():
            loss = predicted_loss(backbone.family.logits(model(x)))
            grads = torch.autograd.grad(loss, outputs)
    finally:
        for handle in handles:
            handle.remove()
    total = torch.zeros(x.shape[0], grid.frames, grid.height, grid.width, dtype=torch.float64)
    for grad, (_, block_grid) in zip(grads, blocks, strict=True):
        # Patch tokens only (a CLS token has no place on the grid), summed over channels.
        per_token = backbone.patch_tokens(grad.detach(), block_grid).abs().sum(-1).double()
        per_token = per_token.reshape(x.shape[0], block_grid.frames, block_grid.height, block_grid.width)
        total += _resample_mass(per_token, (grid.height, grid.width))
    return total


def mass_fraction(heat: Tensor, mask: Tensor) -> float:
    """Share of ``heat``'s total that lies where ``mask`` (same shape, bool) is True."""
    return float(heat[mask].sum() / heat.sum())


def random_mass_fraction(heat: Tensor, count: int, draws: int = 32, seed: int = 0) -> tuple[float, float]:
    """Mean and std of :func:`mass_fraction` over ``draws`` uniformly random sets of ``count`` tokens.

    The random sets are drawn over all tokens of the clip (no per-frame stratification); the
    expected value is ``count / heat.numel()``.
    """
    g = torch.Generator().manual_seed(seed)
    flat = heat.reshape(-1)
    fractions = torch.tensor(
        [
            float(flat[torch.randperm(flat.numel(), generator=g)[:count]].sum() / flat.sum())
            for _ in range(draws)
        ],
        dtype=torch.float64,
    )
    return float(fractions.mean()), float(fractions.std()) if draws > 1 else 0.0


__all__ = ["gradnorm", "mass_fraction", "random_mass_fraction"]

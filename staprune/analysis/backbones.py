"""What the analyses need to know about a backbone: input layout, token grids, blocks, final tokens.

Two families, both with a temporal tubelet of 2 input frames per token:

* ViT (transformers VideoMAE): input ``(B, T, 3, H, W)``; one token grid ``(T/2, H/p, W/p)``
  shared by every block and every pruning stage; ``kept_tokens`` indices ``t * N + s``.
* Video Swin (torchvision ``SwinTransformer3d``): input ``(B, 3, T, H, W)``; stage ``k``
  (0-based) has the grid ``(T/2, ceil(H / (4 * 2**k)), ceil(W / (4 * 2**k)))``; pruning happens
  per stage on that stage's own grid, ``t * h * w + row * w + col``.

Adding a backbone means adding one branch to :func:`describe` and to the three methods below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..patch import get_config, kept_stages, kept_tokens


@dataclass(frozen=True)
class StageGrid:
    """A token grid: ``frames`` temporal positions of ``height x width`` tokens, each token
    covering ``pixels x pixels`` input pixels (the last row/column may run into padding)."""

    name: str
    frames: int
    height: int
    width: int
    pixels: int

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def tokens(self) -> int:
        return self.frames * self.tokens_per_frame


@dataclass(frozen=True)
class Backbone:
    """Geometry of one model for one input size.

    Attributes:
        family: ``"vit"`` or ``"swin"`` (also the name used by :func:`staprune.data.protocol`).
        frames: input frames per clip; size: input side in pixels (square views).
        tubelet: input frames per temporal token position.
        grids: token grid of every block stage: ViT one grid; Swin one per stage (4).
        final_stage: index into ``grids`` of the final block's grid.
    """

    family: str
    frames: int
    size: int
    tubelet: int
    grids: tuple[StageGrid, ...]

    @property
    def final_grid(self) -> StageGrid:
        return self.grids[-1]

    def model_input(self, views: Tensor) -> Tensor:
        """``(B, T, 3, H, W)`` views -> the model's input layout."""
        return views if self.family == "vit" else views.transpose(1, 2).contiguous()

    def blocks(self, model: nn.Module) -> list[tuple[nn.Module, StageGrid]]:
        """Every transformer block with the grid of its output, in depth order."""
        if self.family == "vit":
            layers = _vit_backbone(model).encoder.layer
            return [(layer, self.grids[0]) for layer in layers]
        stages = [m for i, m in enumerate(model.features) if i % 2 == 0]
        return [(block, self.grids[k]) for k, stage in enumerate(stages) for block in stage]

    def kept_grids(self, model: nn.Module) -> list[StageGrid]:
        """The grid each entry of ``staprune.kept_tokens(model)`` refers to (after a forward)."""
        stages = kept_stages(model)
        if self.family == "vit":
            return [self.grids[0]] * len(stages)
        return [self.grids[s.layer] for s in stages]  # Swin stage plans use the stage index as layer

    def final_features(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Final-block tokens ``(B, L, C)`` and their original flat indices ``(B, L)`` on
        :attr:`final_grid` (``None``: dense, token ``k`` is index ``k``). ``x`` is model input.

        ViT: the encoder's last hidden state (VideoMAE with a mean-pooling head has no final
        norm there). Swin: the last stage's output before the final norm; when that stage was
        pruned only its kept positions (the refilled ones are copies).
        """
        if self.family == "vit":
            tokens = _vit_backbone(model)(x).last_hidden_state
            kept = _final_kept(model)
            return tokens, kept
        captured: list[Tensor] = []
        handle = model.features[-1].register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            model(x)
        finally:
            handle.remove()
        tokens = captured[0].flatten(1, 3)  # (B, T, h, w, C) -> (B, L, C)
        source = _final_kept(model)
        if source is None or self.kept_grids(model)[-1] != self.final_grid:
            return tokens, None
        return tokens.gather(1, source.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])), source


def _final_kept(model: nn.Module) -> Tensor | None:
    """Original indices kept after the last stage of the last forward; None if nothing was pruned."""
    if get_config(model) is None:
        return None
    kept = kept_tokens(model)
    return kept[-1] if kept else None


def _vit_backbone(model: nn.Module) -> nn.Module:
    return model.videomae if hasattr(model, "videomae") else model


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def is_swin(model: nn.Module) -> bool:
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    return isinstance(model, SwinTransformer3d)


def describe(model: nn.Module, frames: int | None = None, size: int | None = None) -> Backbone:
    """Geometry of ``model`` for ``frames`` x ``size``² input (defaults: a ViT's configured input;
    Swin 32 x 224², the paper's input)."""
    if is_swin(model):
        frames, size = frames or 32, size or 224
        pt, ph, _ = model.patch_embed.tuple_patch_size
        num_stages = (len(model.features) + 1) // 2
        t = _ceil_div(frames, pt)
        grids = []
        for k in range(num_stages):
            side = _ceil_div(size, ph * 2**k)
            grids.append(StageGrid(f"stage {k + 1}", t, side, side, ph * 2**k))
        return Backbone("swin", frames, size, pt, tuple(grids))
    hf = getattr(_vit_backbone(model), "config", None)
    if hf is None or getattr(hf, "model_type", None) != "videomae":
        raise TypeError(
            f"analysis supports VideoMAE ViTs and torchvision Video Swin, not {type(model).__name__}"
        )
    frames = frames or hf.num_frames
    size = size or (hf.image_size if isinstance(hf.image_size, int) else hf.image_size[0])
    side = size // hf.patch_size
    grid = StageGrid("tokens", frames // hf.tubelet_size, side, side, hf.patch_size)
    return Backbone("vit", frames, size, hf.tubelet_size, (grid,))


def predicted_loss(logits: Tensor) -> Tensor:
    """Cross-entropy of ``(B, classes)`` logits against their own argmax (summed over the batch)."""
    return torch.nn.functional.cross_entropy(logits, logits.argmax(-1).detach(), reduction="sum")


def logits_of(output) -> Tensor:
    """Logits from a HF output object or a plain tensor."""
    return output.logits if hasattr(output, "logits") else output


__all__ = ["Backbone", "StageGrid", "describe", "is_swin", "logits_of", "predicted_loss"]

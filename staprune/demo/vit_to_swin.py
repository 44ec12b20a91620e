"""Start the demo Swin's first stage from the trained demo ViT (``--init-stage1-from-vit``).

The two demo models share a front end by construction: a 2x16x16 tubelet embedding to 128
channels, VideoMAE's fixed sinusoidal positions, and then (Swin stage 1, one 8x7x7 window over
the whole 8x7x7 token grid, so global attention) four pre-norm transformer blocks of width 128,
4 heads, MLP 512, the same block as the ViT's first four layers. Copying those weights gives
the Swin the motion features the ViT learned over its whole training chain; its stage 2 and
head start fresh. Two differences remain and are left to training: Swin's LayerNorm after the
patch embedding (the ViT has none) and Swin's relative-position bias tables (set to 0, the
ViT's layers have no such term; VideoMAE also has no key bias, so the key third of ``qkv.bias``
is 0).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

STAGE1_DEPTH = 4  # demo Swin depths [4, 2]


def vit_to_swin_stage1(vit_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map a demo-ViT state dict to the demo-Swin keys of its patch embedding and stage 1.

    Returns:
        ``{swin_key: tensor}`` for ``patch_embed.proj.*`` and ``features.0.{0..3}.*``
        (relative-position tables zeroed), ready for ``load_state_dict(strict=False)``.

    Raises:
        KeyError: ``vit_state`` is not a demo-ViT (VideoMAE) state dict with 4+ layers.
    """
    prefix = "videomae.embeddings.patch_embeddings.projection."
    out = {
        "patch_embed.proj.weight": vit_state[prefix + "weight"],
        "patch_embed.proj.bias": vit_state[prefix + "bias"],
    }
    for i in range(STAGE1_DEPTH):
        v, s = f"videomae.encoder.layer.{i}.", f"features.0.{i}."
        attn = v + "attention.attention."
        q_bias = (
            vit_state[attn + "q_bias"] if attn + "q_bias" in vit_state else vit_state[attn + "query.bias"]
        )
        v_bias = (
            vit_state[attn + "v_bias"] if attn + "v_bias" in vit_state else vit_state[attn + "value.bias"]
        )
        out[s + "attn.qkv.weight"] = torch.cat(
            [
                vit_state[attn + "query.weight"],
                vit_state[attn + "key.weight"],
                vit_state[attn + "value.weight"],
            ]
        )
        # Swin splits qkv as (q, k, v) thirds, heads contiguous within each: the same order as
        # concatenating VideoMAE's query/key/value projections. VideoMAE has no key bias.
        out[s + "attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
        out[s + "attn.proj.weight"] = vit_state[v + "attention.output.dense.weight"]
        out[s + "attn.proj.bias"] = vit_state[v + "attention.output.dense.bias"]
        for swin_norm, vit_norm in (("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
            out[s + swin_norm + ".weight"] = vit_state[v + vit_norm + ".weight"]
            out[s + swin_norm + ".bias"] = vit_state[v + vit_norm + ".bias"]
        out[s + "mlp.0.weight"] = vit_state[v + "intermediate.dense.weight"]
        out[s + "mlp.0.bias"] = vit_state[v + "intermediate.dense.bias"]
        out[s + "mlp.3.weight"] = vit_state[v + "output.dense.weight"]
        out[s + "mlp.3.bias"] = vit_state[v + "output.dense.bias"]
    return {k: t.detach().clone().float() for k, t in out.items()}


def init_swin_stage1_from_vit(swin: nn.Module, vit: nn.Module) -> None:
    """Copy ``vit``'s tubelet embedding and first four layers into ``swin``'s patch embedding and
    stage 1 in place (relative-position tables zeroed); everything else in ``swin`` is untouched.

    Raises:
        ValueError: the shapes differ (not the demo ViT / demo Swin pair, or a changed config).
    """
    try:
        mapped = vit_to_swin_stage1(vit.state_dict())
    except KeyError as err:
        raise ValueError(f"not a demo-ViT (VideoMAE) state dict: missing {err}") from err
    own = swin.state_dict()
    for key, tensor in mapped.items():
        if key not in own or own[key].shape != tensor.shape:
            got = tuple(own[key].shape) if key in own else "absent"
            raise ValueError(
                f"cannot start the Swin from the ViT: {key} is {got} in the Swin, "
                f"{tuple(tensor.shape)} from the ViT (demo-vit and demo-swin configs must match)"
            )
    with torch.no_grad():
        swin.load_state_dict(mapped, strict=False)
        for i in range(STAGE1_DEPTH):
            swin.get_parameter(f"features.0.{i}.attn.relative_position_bias_table").zero_()

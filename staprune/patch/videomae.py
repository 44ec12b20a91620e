"""Adapter for Hugging Face ``transformers`` VideoMAE (``VideoMAEModel``, ``VideoMAEForVideoClassification``).

It only finds tensors and applies indices: the attention of a pruning block records the metric
(keys / queries / values), the block's output is handed to :mod:`staprune.score` (or the
baselines), and the returned indices are gathered. Blocks that do not prune keep the stock
forward, except under ToMe, whose proportional attention needs every block's attention.
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..baselines import tome_merge
from ..config import STAConfig, resolve_plan
from ..score import gather_tokens, head_mean
from .common import Patch


def is_videomae(model: nn.Module) -> bool:
    try:
        from transformers import VideoMAEForVideoClassification, VideoMAEModel
    except ImportError:  # transformers not installed: cannot be a VideoMAE
        return False
    return isinstance(model, VideoMAEModel | VideoMAEForVideoClassification)


def _backbone(model: nn.Module) -> nn.Module:
    return model.videomae if hasattr(model, "videomae") else model


def _geometry(config, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Tubelet-frames, tokens per frame and the token grid width for an input size."""
    patch = config.patch_size
    return frames // config.tubelet_size, (height // patch) * (width // patch), width // patch


def patch_videomae(model: nn.Module, config: STAConfig) -> nn.Module:
    """Patch a VideoMAE in place (see :func:`staprune.patch`)."""
    backbone = _backbone(model)
    hf = backbone.config
    layers = backbone.encoder.layer
    if config.method != "none" and getattr(model, "fc_norm", "absent") is None:
        raise ValueError(
            "this VideoMAE classifier represents the video by its first token (use_mean_pooling=False); "
            "pruning could drop that token. Only mean-pooling heads (all released VideoMAE "
            "checkpoints) are supported."
        )

    def build(frames: int, tokens: int):
        return resolve_plan(config, len(layers), frames, tokens)

    p = Patch(config)
    frames, tokens, _ = _geometry(hf, hf.num_frames, *_pair(hf.image_size))
    plan = p.plan_for(frames, tokens, build)  # validate now, before any forward pass

    def start(module, args, kwargs):
        pixels = args[0] if args else kwargs.get("pixel_values")
        if kwargs.get("bool_masked_pos") is not None or (len(args) > 1 and args[1] is not None):
            raise ValueError(
                "staprune cannot prune a VideoMAE run with bool_masked_pos (masked pre-training)"
            )
        t, n, w = _geometry(hf, pixels.shape[1], pixels.shape[-2], pixels.shape[-1])
        p.start(p.plan_for(t, n, build), pixels, (n // w, w), pixels.device)

    p.add_hook(backbone.register_forward_pre_hook(start, with_kwargs=True))

    stage_layers = {s.layer for s in plan.stages}
    uses_attention_metric = config.method == "tome" or (
        config.method == "sta" and config.similarity != "hidden"
    )
    for i, layer in enumerate(layers):
        taps_metric = i in stage_layers and uses_attention_metric
        if config.method == "tome" or taps_metric:
            self_attn = layer.attention.attention
            p.override_forward(self_attn, MethodType(_make_attention(p, i, taps_metric), self_attn))
        if i in stage_layers and config.method != "none":
            p.override_forward(layer, MethodType(_make_layer(p, i), layer))
    if config.method == "tome" and hasattr(model, "videomae"):
        p.override_forward(model, MethodType(_make_size_weighted_head(p), model))
    model._staprune = p
    return model


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def _qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys, values ``(B, heads, L, d)`` exactly as the stock module computes them.

    transformers >= 5 keeps VideoMAE's q/v biases inside ``query``/``value``; older releases
    stored them as separate ``q_bias``/``v_bias`` parameters.
    """
    shape = (*x.shape[:-1], -1, attn.attention_head_size)
    q_bias = getattr(attn, "q_bias", None)
    if q_bias is not None:
        q = F.linear(x, attn.query.weight, q_bias)
        k = F.linear(x, attn.key.weight, torch.zeros_like(attn.v_bias))
        v = F.linear(x, attn.value.weight, attn.v_bias)
    else:
        q, k, v = attn.query(x), attn.key(x), attn.value(x)
    return (t.view(shape).transpose(1, 2) for t in (q, k, v))


def _make_attention(p: Patch, index: int, taps_metric: bool):
    """Self-attention that records this block's metric and adds ToMe's proportional-attention
    bias ``log(size)``. SDPA stays SDPA: the bias is an additive ``attn_mask``, not the eager path."""

    def forward(self, hidden_states: Tensor, **kwargs) -> tuple[Tensor, Tensor | None]:
        q, k, v = _qkv(self, hidden_states)
        state = p.state
        if taps_metric:
            state.metric = {"key": k, "query": q, "value": v}.get(p.config.similarity, k)
        bias = None
        if state.size is not None and index > min(s.layer for s in state.plan.stages):
            bias = state.size.log().to(q.dtype)[:, None, None, :]
        scale = getattr(self, "scaling", self.attention_head_size**-0.5)
        dropout = (
            getattr(self, "dropout_prob", self.config.attention_probs_dropout_prob) if self.training else 0.0
        )
        probs = None
        if self.config._attn_implementation == "eager":
            scores = torch.matmul(q, k.transpose(2, 3)) * scale
            if bias is not None:
                scores = scores + bias
            probs = F.dropout(torch.softmax(scores, dim=-1), p=dropout, training=self.training)
            out = torch.matmul(probs, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)
        out = out.transpose(1, 2).contiguous()
        return out.reshape(*out.shape[:-2], -1), probs

    return forward


def _make_layer(p: Patch, index: int):
    """The stock VideoMAELayer forward, with the pruning step where the method puts it:
    STA/random after the block (the paper), ToMe between attention and MLP (ToMe's placement)."""

    def forward(self, hidden_states: Tensor, **kwargs) -> Tensor:
        state = p.state
        stage = next(s for s in state.plan.stages if s.layer == index)
        attention_output = self.attention(self.layernorm_before(hidden_states), **kwargs)
        hidden_states = attention_output + hidden_states
        if p.config.method == "tome" and stage.r:
            hidden_states, state.size, state.source = tome_merge(
                hidden_states, head_mean(state.metric), state.size, state.source, stage.units * stage.r
            )
            state.record(stage, state.source)
        out = self.output(self.intermediate(self.layernorm_after(hidden_states)), hidden_states)
        if p.config.method in ("sta", "random") and stage.r:
            tapped = p.config.method == "sta" and p.config.similarity != "hidden"
            metric = head_mean(state.metric) if tapped else None
            keep = p.keep_indices(stage, out, metric, state.source, state.grid_hw)
            out = gather_tokens(out, keep)
            state.source = state.source.gather(1, keep)
            state.record(stage, state.source)
        state.metric = None  # do not keep the block's keys alive
        return out

    return forward


def _make_size_weighted_head(p: Patch):
    """VideoMAEForVideoClassification.forward with ToMe's size-weighted mean pooling: a merged
    token stands for ``size`` original tokens, so the average must count it that many times."""
    from transformers.modeling_outputs import ImageClassifierOutput

    def forward(self, pixel_values: Tensor | None = None, labels: Tensor | None = None, **kwargs):
        outputs = self.videomae(pixel_values, **kwargs)
        seq = outputs.last_hidden_state
        weights = p.state.size.to(seq.dtype).unsqueeze(-1)
        pooled = self.fc_norm((seq * weights).sum(1) / weights.sum(1))
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    return forward


__all__ = ["is_videomae", "patch_videomae"]

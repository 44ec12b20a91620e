"""The video-LLM family kind: what every video-LLM family shares, written once. Recognising the
transformers classes, checking options (the video-token methods; classifier options refused),
patching through :mod:`staprune.adapters.video_tokens`, the named models' geometry
(:class:`VideoLLMSpec`), random-weight building, prompts and prefill FLOPs.

A family module subclasses :class:`VideoLLMFamily` and declares what differs between models
(:meth:`VideoLLMFamily.describe`: where the language model is, which method encodes a video and
with which inputs, the placeholder id, each video's temporal units, how to read the vision keys,
which side inputs follow the kept tokens), lays a video out as its processor does
(:meth:`VideoLLMFamily.video_inputs`) and counts its vision tower (:meth:`VideoLLMFamily.vision_flops`).
docs/families/add-a-video-llm.md walks through one.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...adapters.attention_tap import tap_attention
from ...adapters.video_tokens import VideoLLMModel, VideoPatch, install
from ...core.config import STAConfig
from ...core.errors import CheckpointError, ConfigError
from ...core.flops import FlopCount
from ...core.score import packed_slice, slice_metric
from ...core.video_methods import (
    VideoLayout,
    attention_received,
    in_language_model,
    kept_tokens_of,
    video_method_names,
)
from ...data.transforms import Preprocessing
from ..base import VIDEO_LLM, LoadedModel, Spec, side
from ..hf import TransformersFamily, load_hf_pretrained

TEXT_BEFORE = 16  # prompt tokens before the video (system prompt, the turn's start) in example prompts


@dataclass(frozen=True)
class VideoLLMSpec(Spec):
    """A video LLM's geometry as plain data: its transformers config and one video's input.

    Attributes:
        config: keyword arguments of the family's transformers config class (``text_config`` and
            ``vision_config`` nested), e.g. a published ``config.json``'s architecture fields.
        frames, size: the video: frames and side in pixels (frames are resized to ``size``²).
        prompt_tokens: text tokens of the prompt besides the video (system prompt, question).
    """

    family: ClassVar[str] = ""
    frames: int = 16
    size: int = 448
    num_classes: int = 0
    in_chans: int = 3
    config: Mapping[str, Any] = field(default_factory=dict)
    prompt_tokens: int = 64

    @property
    def text(self) -> Mapping[str, Any]:
        return self.config["text_config"]

    @property
    def vision(self) -> Mapping[str, Any]:
        return self.config["vision_config"]


@dataclass(frozen=True)
class FixedSideSpec(VideoLLMSpec):
    """A video LLM whose vision tower takes one side (LLaVA-OneVision, InternVL): every frame is
    resized to it, so a spec's ``size`` is always the tower's ``image_size``."""

    model_name: ClassVar[str] = ""  # how the refusal names the model

    def with_input(self, frames: int | None = None, size: int | None = None) -> FixedSideSpec:
        fixed = side(self.vision["image_size"])
        if size is not None and size != fixed:
            raise ConfigError(f"{self.model_name} resizes every frame to its vision tower's {fixed} px; leave out the "
                              f"image size or give {fixed}")
        return super().with_input(frames, fixed)


def language_model_flops(text: Mapping[str, Any], length: int) -> dict[str, float]:
    """Multiply-adds of a decoder's prefill over ``length`` tokens, by kind (the docs' FLOPs
    convention: matmuls only, attention ``2·L²·heads·head_dim`` as the dense kernels compute it, the
    head on the last token only, as ``generate``'s prefill does).

    Args:
        text: the text config's fields (``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
            ``num_attention_heads``, ``num_key_value_heads``, optional ``head_dim``, ``vocab_size``).
    """
    c, layers = text["hidden_size"], text["num_hidden_layers"]
    head_dim = text.get("head_dim") or c // text["num_attention_heads"]
    q, kv = text["num_attention_heads"] * head_dim, text["num_key_value_heads"] * head_dim
    return {
        "lm_qkv": layers * length * c * (q + 2 * kv),
        "lm_attention": layers * 2 * length**2 * q,
        "lm_proj": layers * length * q * c,
        "lm_mlp": layers * length * 3 * c * text["intermediate_size"],  # gate, up, down
        "lm_head": c * text["vocab_size"],
    }


def text_ids(spec: VideoLLMSpec, count: int, start: int = 0) -> list[int]:
    """``count`` ordinary text token ids (from the middle of the vocabulary: no special token)."""
    vocab = spec.text["vocab_size"]
    return [vocab // 2 + (start + i) % (vocab // 4) for i in range(count)]


def prefill_flops(count: FlopCount) -> float:
    """The language model's share of a video LLM's :class:`FlopCount` (the ``lm_*`` parts)."""
    return sum(value for key, value in count.parts.items() if key.startswith("lm_"))


def prompt_ids(video: list[int], spec: VideoLLMSpec) -> list[int]:
    """An example prompt: ``TEXT_BEFORE`` text tokens, the video's tokens, then the rest of
    ``spec.prompt_tokens``."""
    after = max(spec.prompt_tokens - TEXT_BEFORE, 1)
    return text_ids(spec, TEXT_BEFORE) + video + text_ids(spec, after, start=TEXT_BEFORE)


class VideoLLMFamily(TransformersFamily):
    """Base of the video-LLM families. Subclasses set :attr:`transformers_classes` (the
    ``*ForConditionalGeneration`` class first, then its ``*Model``) and implement :meth:`describe`."""

    kind = VIDEO_LLM
    config_class: ClassVar[str] = ""  # the transformers config class of :attr:`transformers_classes`
    spec_class: ClassVar[type[VideoLLMSpec]] = VideoLLMSpec
    default_keep: ClassVar[tuple[float, ...]] = (0.5, 0.3, 0.15)  # levels as keep ratios (video-LLM papers')
    fixed_size: ClassVar[bool] = False  # every frame is resized to one side (LLaVA-OneVision's vision tower)

    def inner(self, model: nn.Module) -> nn.Module:
        """The ``*Model`` (vision tower, projector, language model) of either class."""
        return model.model if hasattr(model, "lm_head") else model

    def outer(self, model: nn.Module) -> nn.Module | None:
        """The ``*ForConditionalGeneration`` (the one with the language-model head), or None for a ``*Model``."""
        return model if hasattr(model, "lm_head") else None

    def methods(self) -> tuple[str, ...]:
        """Every registered video-token method (:mod:`staprune.core.video_methods`), and ``none``."""
        return (*video_method_names(), "none")

    def check_method(self, config: STAConfig) -> None:
        """Refuse a method that is not a video-token method, and the video classifiers' options
        (a video LLM's tokens are chosen once per video, before the language model or, FastV, at one
        layer inside it: there are no stages)."""
        if config.method == "tome":
            raise ConfigError(f"method='tome' is not supported for {self.title}: ToMe merges in every block of a "
                              f"classifier; a video LLM's tokens are chosen once per video; use {self.method_choices()}")
        super().check_method(config)
        default = STAConfig()
        for option in ("schedule", "locations", "tome_mode"):
            if getattr(config, option) != getattr(default, option):
                raise ConfigError(f"{option} does not apply to {self.title}: a video's tokens are chosen once (no "
                                  "stages or block locations); leave it out")
        if config.similarity in ("query", "value"):
            raise ConfigError(f"similarity={config.similarity!r} does not apply to {self.title}: a video's tokens are "
                              "compared by the vision tower's keys (similarity='key') or by the tokens the language "
                              "model receives (similarity='hidden')")

    def describe(self, model: nn.Module) -> VideoLLMModel:
        """Where this model keeps what the pruning hooks need."""
        raise NotImplementedError

    def patch(self, model: nn.Module, config: STAConfig) -> nn.Module:
        """Hook ``model`` (either class) so that every video its forward consumes reaches the language
        model pruned (:mod:`staprune.adapters.video_tokens`); prompts and batch rows without a video,
        and direct calls of the language model, run as in the stock model. After a prompt,
        ``staprune.kept_tokens(model)`` lists, rows in batch order, each video's kept placeholder
        indices ``(K,)`` and one empty ``(0,)`` tensor for a row without a video
        (:attr:`~staprune.adapters.video_tokens.PrunedPrompt.kept`)."""
        self.check_method(config)
        described = self.describe(model)
        if config.positions == "renumbered" and not described.one_d_positions:
            raise ConfigError(f"positions='renumbered' needs 1D positions; {self.title} uses 3D M-RoPE, where kept "
                              "tokens keep their (time, row, column) positions: use positions='original'")
        p = VideoPatch(config)
        try:
            install(p, described)
        except BaseException:
            p.undo()  # a hook installed before the one that failed leaves with it
            raise
        model._staprune = p
        return model


    # geometry, prompts and FLOPs -------------------------------------------------------------------
    def spec_of(self, model: nn.Module, frames: int | None = None, size: int | None = None) -> VideoLLMSpec:
        """A built model's config, on a video of ``frames`` x ``size``² (default: its spec's)."""
        config = self.inner(model).config.to_dict()
        return self.spec_class(config=config).with_input(frames, size)

    def layout(self, spec: VideoLLMSpec) -> VideoLayout:
        """The placeholder tokens of one video of ``spec``'s input."""
        raise NotImplementedError

    def video_inputs(self, model: nn.Module, frames: Tensor, spec: VideoLLMSpec,
                     prep: Preprocessing | None = None) -> dict[str, Tensor]:
        """A prompt around one video, as the family's processor lays it out.

        Args:
            frames: ``(T, 3, S, S)`` float in ``[0, 1]`` at ``spec.size`` (``T = spec.frames``).
            prep: the normalisation (a loaded checkpoint's, :attr:`LoadedModel.preprocessing`);
                default: the family's processor's.
        Returns:
            the model's keyword arguments (``input_ids``, ``attention_mask``, ``pixel_values_videos``, ...), batch 1.
        """
        raise NotImplementedError

    def vision_flops(self, spec: VideoLLMSpec) -> dict[str, float]:
        """Multiply-adds of encoding one video (vision tower and projector), by kind."""
        raise NotImplementedError

    def prompt_length(self, spec: VideoLLMSpec, video_tokens: int) -> int:
        """Tokens of the example prompt when its video keeps ``video_tokens`` placeholder tokens."""
        return spec.prompt_tokens + video_tokens + self.video_extra_tokens(spec)

    def video_extra_tokens(self, spec: VideoLLMSpec) -> int:
        """Special tokens around a video that are not its placeholders (vision start/end, timestamps)."""
        return 0

    def kept_video_tokens(self, spec: VideoLLMSpec, config: STAConfig) -> int:
        """Placeholder tokens one video keeps under ``config`` (as its method counts: ``uniform`` whole units)."""
        self.check_method(config)
        return kept_tokens_of(self.layout(spec), config)

    def flops(self, spec: VideoLLMSpec, config: STAConfig) -> FlopCount:
        """Multiply-adds to the first token: the vision tower on the video (pruning does not change
        it) and the language model's prefill of the prompt with the kept video tokens (a method inside
        the language model, FastV: its first ``K`` layers on every token, the rest on the kept ones)."""
        parts = self.vision_flops(spec)
        length = self.prompt_length(spec, self.kept_video_tokens(spec, config))
        layer = in_language_model(config)
        if layer is None:
            parts.update(language_model_flops(spec.text, length))
            return FlopCount(sum(parts.values()), 0.0, parts)
        depth = spec.text["num_hidden_layers"]
        if not 1 <= layer < depth:
            raise ConfigError(f"fastv_layer={layer} must be between 1 and {depth - 1}: the language model has "
                              f"{depth} decoder layers")
        stock = self.prompt_length(spec, self.layout(spec).tokens)
        before = language_model_flops({**spec.text, "num_hidden_layers": layer}, stock)
        after = language_model_flops({**spec.text, "num_hidden_layers": depth - layer}, length)
        parts.update({kind: before[kind] + (after[kind] if kind != "lm_head" else 0) for kind in before})
        head_dim = spec.text.get("head_dim") or spec.text["hidden_size"] // spec.text["num_attention_heads"]
        selection = spec.text["num_attention_heads"] * head_dim * stock  # the last query's row, once
        return FlopCount(sum(parts.values()), selection, parts)

    def levels(self, spec: VideoLLMSpec) -> tuple[int, ...]:
        raise ConfigError(f"{self.title} prunes by keep ratio: give keep ratios (--keep 0.5 0.3), default "
                          f"{' '.join(map(str, self.default_keep))}")

    # building and loading ------------------------------------------------------------------------------
    def build(self, spec: VideoLLMSpec, attn_implementation: str = "sdpa") -> nn.Module:
        """A model of ``spec``'s config with random weights, in eval mode."""
        import transformers

        config = getattr(transformers, self.config_class)(**copy.deepcopy(dict(spec.config)))
        config._attn_implementation = attn_implementation
        model_class = getattr(transformers, self.transformers_classes[0])
        return model_class(config).eval()

    def preprocessing(self, size: int) -> Preprocessing:
        """Normalisation when a checkpoint brings none: SigLIP's 0.5 (LLaVA-OneVision, Qwen3-VL)."""
        return Preprocessing(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def wrap(self, model: nn.Module, source: str, folder: Path | None = None) -> LoadedModel:
        spec = self.spec_of(model)
        size = spec.size if self.fixed_size else None  # frames of any count (and Qwen's of any size) resize
        prep = folder_normalisation(folder, spec.size) or self.preprocessing(spec.size)
        return LoadedModel(model.eval(), self, prep, 0, None, size, source)

    def load_folder(self, folder: Path, name: str) -> LoadedModel:
        """The ``*ForConditionalGeneration`` from a HF folder, every stored tensor verified."""
        model_class = self.transformers_class(self.transformers_classes[0])
        if model_class is None:
            raise CheckpointError(f"{name}: this transformers release has no {self.transformers_classes[0]}")
        return self.wrap(load_hf_pretrained(model_class, folder, name), f"hf:{name}", folder)


def folder_normalisation(folder: Path | None, size: int) -> Preprocessing | None:
    """The mean and std a HF folder's video (or image) processor normalises with, if it has one."""
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        path = folder / name if folder is not None else None
        if path is None or not path.is_file():
            continue
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            return Preprocessing(size, tuple(document["image_mean"]), tuple(document["image_std"]))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: no usable image_mean/image_std ({err}); restore it from the checkpoint") from err
    return None


def normalised(frames: Tensor, prep: Preprocessing) -> Tensor:
    """Frames ``(T, 3, H, W)`` in ``[0, 1]`` normalised with ``prep``'s mean and std."""
    mean = torch.tensor(prep.mean, dtype=frames.dtype).view(1, 3, 1, 1)
    return (frames - mean) / torch.tensor(prep.std, dtype=frames.dtype).view(1, 3, 1, 1)


def token_pixels(frames: Tensor, side: int) -> Tensor:
    """Frames ``(F, C, H, W)`` -> each of a ``side x side`` token grid's pixels ``(F, side², C·16)``,
    average-pooled to 4x4 pixels per token (the grid need not tile the frame exactly)."""
    count, channels = frames.shape[:2]
    small = nn.functional.adaptive_avg_pool2d(frames.float(), 4 * side)
    per_token = small.view(count, channels, side, 4, side, 4).permute(0, 2, 4, 1, 3, 5)
    return per_token.reshape(count, side * side, -1)


def record_received_attention(p: VideoPatch, attention: nn.Module, queries: slice | None = None) -> list[Tensor]:
    """Tap a vision layer's ``attention`` module: while videos are encoded, each call's attention
    received by every token (heads and ``queries`` averaged: :func:`attention_received`) is appended
    to the returned list, ``(B, L)`` per call (a family's reader pops them)."""
    calls: list[Tensor] = []

    def keep(module: nn.Module, query: Tensor, key: Tensor, mask: Tensor | None, scaling: float) -> None:
        if p.encoding_video:
            calls.append(attention_received(query, key, scaling, queries))

    tap_attention(p, attention, keep, p.config.method)
    return calls


def merged_keys(qkv: Tensor, heads: int, group: int) -> Tensor:
    """STA's key metric for tokens that merge ``group`` vision patches each: the key slice of a
    packed qkv projection ``(P, 3C)``, head-averaged ``(P, d)``, then averaged over each group of
    ``group`` consecutive patches: ``(P / group, d)``."""
    keys = slice_metric(packed_slice(qkv, 1)[None], heads)[0]
    return keys.view(-1, group, keys.shape[-1]).mean(1)

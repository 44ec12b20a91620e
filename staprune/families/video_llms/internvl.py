"""InternVL (transformers ``InternVLForConditionalGeneration`` / ``InternVLModel``, the port of
InternVL3): the video tokens pruned before the language model (docs/families/video-llms.md).

InternVL has no video path in the model: its processor sends a video's frames as images, one
``pixel_values`` row each (frames are not tiled), and lays each out in the prompt as
``FrameK: <img>`` + the image-context token x ``(S/p)²/4`` + ``</img>``, frames joined by newlines.
So ``get_image_features`` encodes frames and images alike, and which image-context tokens belong to
a video is read off the prompt (:func:`frame_runs`): a temporal unit is one frame's
``(S/2p) x (S/2p)`` tokens (the vision tower's patches after InternVL's 2x2 pixel shuffle, 256 at
448 px), and the frame labels and ``<img>``/``</img>`` between frames stay as text. The language
model (Qwen2) takes 1D positions: kept tokens keep their stock positions, or are renumbered.
``similarity="key"`` reads the keys of the vision layer the projector reads (after InternViT's
query/key norm), the CLS token dropped, averaged over each 2x2 group the pixel shuffle merges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...adapters.video_tokens import VideoInputs, VideoLLMModel, VideoPatch
from ...core.score import slice_metric
from ...core.video_methods import VideoLayout
from ...data.transforms import Preprocessing
from ..base import FamilyModels, ModelEntry, side
from .base import (
    FixedSideSpec,
    VideoLLMFamily,
    normalised,
    prompt_ids,
    record_received_attention,
    text_ids,
    token_pixels,
)

# The text around one frame in an example prompt: "FrameK: " (about four tokens), <img>, then </img> and "\n".
FRAME_LABEL, FRAME_TEXT = 4, 7
# A run of one-tile images at most this many tokens apart is a video (a frame's label and <img>/</img>
# between two frames: about seven tokens, one more per digit of the frame number).
FRAME_GAP = 12


def _side(vision: Any, ratio: float) -> int:
    """Rows (= columns) of one frame's language-model tokens: the patch grid after the pixel shuffle
    (``vision``: the vision config, or its fields)."""
    fields = vision if isinstance(vision, dict) else vision.to_dict()
    return int(side(fields["image_size"]) // side(fields["patch_size"]) * ratio)


def frame_runs(max_gap: int = FRAME_GAP):
    """``group_videos`` of :class:`~staprune.adapters.video_tokens.VideoLLMModel` for frames sent as images.

    The encoded images a row holds are grouped into blocks of contiguous image-context tokens (the
    tiles of one image share a block); a block of one image is a frame candidate, and two or more
    candidates in a row, each at most ``max_gap`` tokens after the previous, are one video (its
    frames in order). Every other block is an image and stays whole.
    """

    def group(ids: Tensor, spans: list[Tensor]) -> list[list[int]]:
        blocks: list[list[int]] = []
        for k, span in enumerate(spans):
            if blocks and int(span[0]) == int(spans[blocks[-1][-1]][-1]) + 1:
                blocks[-1].append(k)  # the next tile of the same image
            else:
                blocks.append([k])
        videos, run = [], []
        for block in blocks:
            if len(block) == 1 and run and int(spans[block[0]][0]) - int(spans[run[-1]][-1]) - 1 <= max_gap:
                run.append(block[0])
                continue
            if len(run) > 1:
                videos.append(run)
            run = list(block) if len(block) == 1 else []
        if len(run) > 1:
            videos.append(run)
        return videos

    return group


def install_internvit_keys(p: VideoPatch, inner: nn.Module):
    """Hook the keys of the vision layer the projector reads; the reader gives one row per
    language-model token of every encoded image (CLS dropped, heads averaged, each pixel-shuffle
    2x2 group averaged), images in order."""
    layers = inner.vision_tower.encoder.layer
    chosen = inner.config.vision_feature_layer
    chosen = chosen[-1] if isinstance(chosen, (list, tuple)) else chosen
    # hidden_states[i] is the output of layer i - 1 (hidden_states[0]: the embeddings).
    attention = layers[chosen if chosen < 0 else chosen - 1].attention
    ratio = round(1 / inner.config.downsample_ratio)
    captured: dict = {}

    def keep_keys(module, args, output):
        if p.encoding_video:
            captured["keys"] = output

    def read(inputs: VideoInputs) -> Tensor:
        keys = captured.pop("keys")  # (images, 1 + patches, C) after the key norm
        if inner.config.vision_feature_select_strategy == "default":
            keys = keys[:, 1:]
        keys = slice_metric(keys, attention.num_heads)  # (images, patches, d)
        images, patches, d = keys.shape
        side = int(patches**0.5)
        grouped = keys.view(images, side // ratio, ratio, side // ratio, ratio, d).mean((2, 4))
        return grouped.reshape(-1, d)

    p.hook(attention.k_norm, keep_keys)  # nn.Identity without query/key norm: the projected keys
    return read


def install_internvit_attention(p: VideoPatch, inner: nn.Module):
    """Tap the vision layer the projector reads; the reader gives the attention each token received
    there from the [CLS] token (heads averaged), as VisionZip reads a tower with a [CLS]; the mean
    over each pixel-shuffle 2x2 group, one value per language-model token, images in order."""
    layers = inner.vision_tower.encoder.layer
    chosen = inner.config.vision_feature_layer
    chosen = chosen[-1] if isinstance(chosen, (list, tuple)) else chosen
    ratio = round(1 / inner.config.downsample_ratio)
    calls = record_received_attention(p, layers[chosen if chosen < 0 else chosen - 1].attention, queries=slice(0, 1))

    def read(inputs: VideoInputs) -> Tensor:
        received = torch.cat(calls)[:, 1:]  # (images, patches): the [CLS] column dropped, as the projector drops it
        calls.clear()
        images, patches = received.shape
        side = int(patches**0.5)
        return received.view(images, side // ratio, ratio, side // ratio, ratio).mean((2, 4)).reshape(-1)

    return read


@dataclass(frozen=True)
class InternVLSpec(FixedSideSpec):
    """An InternVL: every frame is resized to the vision tower's side (448 px)."""

    family: ClassVar[str] = "internvl"
    model_name: ClassVar[str] = "InternVL"

    @property
    def tokens_per_frame_side(self) -> int:
        return _side(self.vision, self.config.get("downsample_ratio", 0.5))


def internvit_flops(spec: InternVLSpec) -> dict[str, float]:
    """Multiply-adds of InternViT and the projector on one video (each frame alone, its CLS token
    included; the pixel shuffle is a reshape)."""
    v, text = spec.vision, spec.text
    c, patch = v["hidden_size"], side(v["patch_size"])
    patches = (side(v["image_size"]) // patch) ** 2
    tokens = patches + 1  # the CLS token
    merged, wide = spec.tokens_per_frame_side**2, c * round(1 / spec.config.get("downsample_ratio", 0.5)) ** 2
    blocks = v["num_hidden_layers"] * (tokens * (4 * c * c + 2 * c * v["intermediate_size"]) + 2 * tokens**2 * c)
    return {
        "vision_embed": spec.frames * patches * 3 * patch * patch * c,
        "vision_blocks": spec.frames * blocks,
        "vision_merger": spec.frames * merged * (wide * text["hidden_size"] + text["hidden_size"] ** 2),
    }


class InternVLFamily(VideoLLMFamily):
    name = "internvl"
    title = "InternVL (transformers)"
    transformers_classes = ("InternVLForConditionalGeneration", "InternVLModel")
    hf_model_types = ("internvl",)
    config_class = "InternVLConfig"
    spec_class = InternVLSpec
    fixed_size = True

    def preprocessing(self, size: int) -> Preprocessing:
        """ImageNet's statistics, as InternVL's processor normalises."""
        return Preprocessing.imagenet_default(size)

    def layout(self, spec: InternVLSpec) -> VideoLayout:
        rows = spec.tokens_per_frame_side
        return VideoLayout(spec.frames, rows, rows)

    def video_extra_tokens(self, spec: InternVLSpec) -> int:
        return spec.frames * FRAME_TEXT

    def video_inputs(self, model: nn.Module, frames: Tensor, spec: InternVLSpec,
                     prep: Preprocessing | None = None) -> dict[str, Tensor]:
        """A prompt around one video laid out as InternVL's processor does: per frame ``FrameK: <img>``,
        its image-context tokens, ``</img>`` and a newline (the label and brackets as ordinary text)."""
        context = self.inner(model).config.image_token_id
        video: list[int] = []
        for k in range(spec.frames):
            label = text_ids(spec, FRAME_LABEL + 1, start=200 + 10 * k)  # "FrameK: " and <img>
            video += label + [context] * spec.tokens_per_frame_side**2 + text_ids(spec, 2, start=190)  # </img>, "\n"
        ids = torch.tensor([prompt_ids(video, spec)])
        pixels = normalised(frames, prep or self.preprocessing(spec.size))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}

    def vision_flops(self, spec: InternVLSpec) -> dict[str, float]:
        return internvit_flops(spec)

    def describe(self, model: nn.Module) -> VideoLLMModel:
        inner = self.inner(model)
        rows = _side(inner.config.vision_config, inner.config.downsample_ratio)

        def layouts(inputs: VideoInputs) -> list[VideoLayout]:  # every encoded image: a frame, if a video holds it
            return [VideoLayout(1, rows, rows)] * inputs["pixel_values"].shape[0]

        return VideoLLMModel(
            inner=inner,
            outer=self.outer(model),
            language_model=inner.language_model,
            video_token_id=inner.config.image_token_id,
            layouts=layouts,
            encoder="get_image_features",
            modality="image",
            install_keys=install_internvit_keys,
            install_attention=install_internvit_attention,
            unit_pixels=lambda inputs: list(token_pixels(inputs["pixel_values"], rows)[:, None]),
            group_videos=frame_runs(),
            one_d_positions=True,
        )

    def tiny_model(self, seed: int = 0, **overrides: Any) -> nn.Module:
        """Two text and two vision layers (64 and 32 wide), 112 px in 14 px patches: 4x4 tokens per frame."""
        import transformers

        config = dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=112, patch_size=14),
                      text_config=dict(model_type="qwen2", vocab_size=100, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
                      image_token_id=11, image_seq_length=16)
        config.update(overrides)
        torch.manual_seed(seed)
        return transformers.InternVLForConditionalGeneration(transformers.InternVLConfig(**config)).eval()


# InternViT-300M (InternVL3-1B/2B/8B), as transformers' conversion writes it.
INTERNVIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=448, patch_size=14, attention_bias=True, use_qk_norm=False, norm_type="layer_norm",
                      layer_norm_eps=1e-6, hidden_act="gelu", use_mean_pooling=True, layer_scale_init_value=0.1,
                      use_absolute_position_embeddings=True)


def internvl3_config(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> dict:
    """An InternVL3 config: InternViT-300M, a Qwen2.5 language model of this shape (vocabulary 151674; the
    head is not tied to the embeddings, which the hub's parameter counts show: 938M, 2.09B, 7.94B)."""
    text = dict(model_type="qwen2", hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=151674,
                max_position_embeddings=32768, rms_norm_eps=1e-6, rope_parameters=dict(rope_type="default",
                                                                                      rope_theta=1e6))
    return dict(text_config=text, vision_config=dict(INTERNVIT_300M), image_token_id=151667, image_seq_length=256,
                downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
                vision_feature_select_strategy="default", tie_word_embeddings=False)


FAMILY = InternVLFamily()
REGISTRATION = FamilyModels(FAMILY, (
    ModelEntry("InternVL3-1B", FAMILY.name, InternVLSpec(size=448, config=internvl3_config(896, 4864, 24, 14, 2)),
               description="InternVL3-1B-hf, 16 frames at 448² (random weights)"),
    ModelEntry("InternVL3-2B", FAMILY.name, InternVLSpec(size=448, config=internvl3_config(1536, 8960, 28, 12, 2)),
               description="InternVL3-2B-hf, 16 frames at 448² (random weights)"),
    ModelEntry("InternVL3-8B", FAMILY.name, InternVLSpec(size=448, config=internvl3_config(3584, 18944, 28, 28, 4)),
               description="InternVL3-8B-hf, 16 frames at 448² (random weights)"),
))

__all__ = ["FAMILY", "REGISTRATION", "InternVLFamily", "InternVLSpec", "frame_runs", "install_internvit_keys",
           "internvl3_config", "internvit_flops"]

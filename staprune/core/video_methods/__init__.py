"""Video-token methods of video LLMs: which of a video's tokens reach the language model.

Each method is one module here that registers a :class:`~.registry.VideoMethod` when imported;
adding one is a new module plus its line below. Every method gets the same budget (``keep`` tokens
per temporal unit from ``keep_ratio`` or ``r``) through :func:`~.registry.select_video_tokens`.
"""

from __future__ import annotations

import importlib

from .attention import attention_received, last_query_attention
from .layout import VideoLayout, kept_per_unit
from .registry import (
    NEEDS,
    MethodOption,
    Selection,
    VideoMethod,
    VideoTokens,
    in_language_model,
    kept_tokens_of,
    method_options,
    needs_of,
    register_video_method,
    select_video_tokens,
    unregister_video_method,
    video_method,
    video_method_names,
    vision_needs_of,
)

# One line per method, in the order listings show them: importing a module registers its method
# (as staprune.families.FAMILY_MODULES registers the families).
METHOD_MODULES: tuple[str, ...] = (
    "staprune.core.video_methods.sta",
    "staprune.core.video_methods.random_tokens",
    "staprune.core.video_methods.uniform",
    "staprune.core.video_methods.static",
    "staprune.core.video_methods.evs",
    "staprune.core.video_methods.divprune",
    "staprune.core.video_methods.vidcom2",
    "staprune.core.video_methods.fastv",
    "staprune.core.video_methods.visionzip",
    "staprune.core.video_methods.fastvid",
    "staprune.core.video_methods.holitom",
)
for _module in METHOD_MODULES:
    importlib.import_module(_module)

__all__ = [
    "METHOD_MODULES",
    "MethodOption",
    "NEEDS",
    "Selection",
    "VideoLayout",
    "VideoMethod",
    "VideoTokens",
    "attention_received",
    "kept_per_unit",
    "in_language_model",
    "kept_tokens_of",
    "last_query_attention",
    "method_options",
    "needs_of",
    "register_video_method",
    "select_video_tokens",
    "unregister_video_method",
    "video_method",
    "video_method_names",
    "vision_needs_of",
]

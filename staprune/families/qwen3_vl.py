"""Qwen3-VL (transformers ``Qwen3VLForConditionalGeneration`` / ``Qwen3VLModel``): as Qwen2.5-VL
(:mod:`staprune.families.qwen2_5_vl`), plus DeepStack: the vision features Qwen3-VL adds to the
first decoder layers at the visual positions are pruned with their tokens. The processor puts a
timestamp between temporal patches, so a video's placeholders are not one run; they are found in
order all the same. The vision tower has no window order.
"""

from __future__ import annotations

from .base import FamilyModels
from .qwen2_5_vl import Qwen25VLFamily


class Qwen3VLFamily(Qwen25VLFamily):
    name = "qwen3_vl"
    title = "Qwen3-VL (transformers)"
    transformers_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")
    windowed_vision = False


FAMILY = Qwen3VLFamily()
REGISTRATION = FamilyModels(FAMILY, ())

__all__ = ["FAMILY", "REGISTRATION", "Qwen3VLFamily"]

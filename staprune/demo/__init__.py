"""The demo: synthetic action videos (:mod:`.data`), two small bundled models (:mod:`.models`,
registered as ``demo-vit`` and ``demo-swin`` through the ``staprune.models`` entry point) and their
training script (:mod:`.train`). The ``staprune demo`` command is :mod:`staprune.commands.demo`."""

from .data import CLASS_NAMES, generate
from .models import DEMO_MODELS, load_demo_model

__all__ = ["CLASS_NAMES", "DEMO_MODELS", "generate", "load_demo_model"]

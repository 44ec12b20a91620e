"""The demo: synthetic action videos (:mod:`.data`), two small bundled models (:mod:`.models`),
their training script (:mod:`.train`) and the ``staprune demo`` command (:mod:`.runner`)."""

from .data import CLASS_NAMES, generate
from .models import DEMO_MODELS, load_demo_model

__all__ = ["CLASS_NAMES", "DEMO_MODELS", "generate", "load_demo_model"]

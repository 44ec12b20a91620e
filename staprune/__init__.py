"""staprune: training-free spatio-temporal token pruning (STA, ICCV 2023) for video transformers.

import staprune
staprune.patch(model, r=64)      # VideoMAE / VideoMAE V2, ViViT, V-JEPA 2, TimeSformer (transformers),
                                 # Video Swin (torchvision): see staprune.families

The public API: patching (:func:`patch`, :func:`unpatch`, :func:`kept_tokens`, ...), the one loader
(:func:`load`), FLOPs (:func:`analytic_flops`, :func:`r_for_budget`), a pruning :class:`Setting`
and evaluation as functions (:func:`score_videos`, :func:`score_clips`). How the package is layered:
docs/development/layers.md.
"""

from .adapters.state import get_config, kept_stages, kept_tokens
from .api.evaluation import score_clips, score_videos
from .api.flops import analytic_flops, r_for_budget
from .api.loading import load
from .api.patching import patch, unpatch
from .api.settings import Setting
from .core.config import STAConfig, resolve_plan

__all__ = [
    "STAConfig",
    "Setting",
    "analytic_flops",
    "get_config",
    "kept_stages",
    "kept_tokens",
    "load",
    "patch",
    "r_for_budget",
    "resolve_plan",
    "score_clips",
    "score_videos",
    "unpatch",
]
__version__ = "0.1.0"

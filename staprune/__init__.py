"""staprune: training-free spatio-temporal token pruning (STA, ICCV 2023) for video transformers.

import staprune
staprune.patch(model, r=64)      # VideoMAE / VideoMAE V2, ViViT, V-JEPA 2, TimeSformer (transformers),
                                 # Video Swin (torchvision): see staprune.families
"""

from .adapters.state import get_config, kept_stages, kept_tokens
from .api.flops import r_for_budget
from .api.patching import patch, unpatch
from .core.config import STAConfig, resolve_plan

__all__ = ["STAConfig", "get_config", "kept_stages", "kept_tokens", "patch", "r_for_budget", "resolve_plan", "unpatch"]
__version__ = "0.1.0"

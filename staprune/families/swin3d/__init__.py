"""torchvision's Video Swin (``SwinTransformer3d``: ``swin3d_t``/``swin3d_s``/``swin3d_b``), one
module per job:

* :mod:`.windows`: stage grids and window layout (padding, cyclic shift, window partition), shift
  masks and the relative-position bias, as torchvision builds them;
* :mod:`.attention`: fused window attention (one SDPA call per shift pattern) and the kept-query
  subsets of a pruned stage;
* :mod:`.pruned_stage`: STA at the start of Swin stages 2-4 on a filled grid, and
  :func:`patch_swin3d`;
* :mod:`.family`: :class:`SwinSpec`, FLOPs, loading, :class:`Swin3dFamily` and the registry
  (:data:`REGISTRATION`, which the family registry reads off this package).

The r1 plan (drops ``r1, 1.5*r1/4, 2*r1/16`` per frame) is stage planning like every other schedule:
:func:`staprune.core.config.resolve_swin_plan`.
"""

from .attention import FusedWindowAttention, QuerySubset, query_subsets
from .family import (
    FAMILY,
    PAPER_R,
    REGISTRATION,
    SWIN_NAMES,
    Swin3dFamily,
    SwinSpec,
    is_swin3d,
    load_torchvision_swin,
    swin_flops,
    swin_kept_per_stage,
    swin_name_from_state,
    swin_selection_flops,
)
from .pruned_stage import patch_swin3d
from .windows import WindowLayout, relative_position_bias, shift_mask, stage_grids, window_layout

__all__ = [
    "FAMILY",
    "PAPER_R",
    "REGISTRATION",
    "SWIN_NAMES",
    "FusedWindowAttention",
    "QuerySubset",
    "Swin3dFamily",
    "SwinSpec",
    "WindowLayout",
    "is_swin3d",
    "load_torchvision_swin",
    "patch_swin3d",
    "query_subsets",
    "relative_position_bias",
    "shift_mask",
    "stage_grids",
    "swin_flops",
    "swin_kept_per_stage",
    "swin_name_from_state",
    "swin_selection_flops",
    "window_layout",
]

"""torchvision's Video Swin (``SwinTransformer3d``): the adapter, FLOPs, loading and registry.

The family's registry entry reads :data:`REGISTRATION` off this package.
"""

from .family import (
    FAMILY,
    REGISTRATION,
    SWIN_NAMES,
    FusedWindowAttention,
    Swin3dFamily,
    SwinSpec,
    WindowLayout,
    is_swin3d,
    nearest_kept_fill,
    patch_swin3d,
    resolve_swin_plan,
    shift_mask,
    stage_grids,
    swin_stage_drops,
    window_layout,
)

__all__ = [
    "FAMILY",
    "REGISTRATION",
    "SWIN_NAMES",
    "FusedWindowAttention",
    "SwinSpec",
    "Swin3dFamily",
    "WindowLayout",
    "is_swin3d",
    "nearest_kept_fill",
    "patch_swin3d",
    "resolve_swin_plan",
    "shift_mask",
    "stage_grids",
    "swin_stage_drops",
    "window_layout",
]

"""Kept-token pictures (the paper's Fig. 4) and heatmap overlays, as plain array functions.

Nothing here runs a model: masks come from ``staprune.kept_tokens`` indices, images are uint8
``(H, W, 3)`` numpy arrays, and :func:`render_grid` lays tiles out on an exact pixel canvas, so
a tile's pixels in the saved PNG are the tile's pixels (no resampling; tests rely on it).

Conventions: a dropped token's patch is painted pure white ``(255, 255, 255)``; under ToMe,
where tokens merge instead of disappearing, every token that is not the representative of a
merged token (``kept_tokens`` reports representatives) is painted white.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..storage.runfolder import atomic_write

WHITE = 255
BACKGROUND = (208, 208, 208)  # neutral grey: white patches at a tile's edge stay visible
TEXT_COLOR = "#202020"
GAP = 4  # px between tiles
MARGIN = 8  # px around everything
BAND = 22  # px title band above each row (and the column-label header)
FONT_PT = 9.0
DPI = 100


def kept_mask(kept: Tensor, frames: int, height: int, width: int) -> Tensor:
    """Boolean ``(frames, height, width)`` mask, True where a token was kept.

    Args:
        kept: ``(K,)`` flat indices ``t * height * width + row * width + col`` of one clip
            (one row of a ``staprune.kept_tokens`` entry).
    """
    total = frames * height * width
    kept = kept.reshape(-1).long().cpu()
    if kept.numel() and (kept.min() < 0 or kept.max() >= total):
        raise ValueError(f"kept index outside a {frames}x{height}x{width} grid")
    mask = torch.zeros(total, dtype=torch.bool)
    mask[kept] = True
    return mask.view(frames, height, width)


def mask_dropped(images: np.ndarray, mask: Tensor | np.ndarray, pixels: int) -> np.ndarray:
    """Paint the patches of dropped tokens white.

    Args:
        images: uint8 ``(T, H, W, 3)``, one image per temporal token position.
        mask: bool ``(T, h, w)`` kept mask; token ``(row, col)`` covers pixels
            ``[row*pixels, (row+1)*pixels) x [col*pixels, (col+1)*pixels)`` (clipped to the
            image: Swin pads the grid up, so the last patch may be partly outside).
        pixels: patch side in input pixels.

    Returns:
        a uint8 copy of ``images`` with dropped patches white.
    """
    mask = np.asarray(mask, dtype=bool)
    if images.ndim != 4 or images.shape[0] != mask.shape[0]:
        raise ValueError(f"{tuple(images.shape)} images for a {tuple(mask.shape)} mask")
    height, width = images.shape[1:3]
    if mask.shape[1] * pixels < height or mask.shape[2] * pixels < width:
        raise ValueError(
            f"a {mask.shape[1]}x{mask.shape[2]} grid of {pixels}px patches does not cover {height}x{width}"
        )
    dropped = ~mask.repeat(pixels, axis=1).repeat(pixels, axis=2)[:, :height, :width]
    out = images.copy()
    out[dropped] = WHITE
    return out


def heatmap_overlay(
    image: np.ndarray, heat: np.ndarray, alpha: float = 0.55, cmap: str = "jet"
) -> np.ndarray:
    """Blend a ``[0, 1]`` heat map over a uint8 ``(H, W, 3)`` image (heat resized bilinearly).

    The image is shown in grey underneath so the colour carries only the heat.
    """
    from matplotlib import colormaps

    heat_t = torch.as_tensor(heat, dtype=torch.float32)[None, None]
    heat_t = torch.nn.functional.interpolate(
        heat_t, size=image.shape[:2], mode="bilinear", align_corners=False
    )
    colour = colormaps[cmap](heat_t[0, 0].clamp(0, 1).numpy())[..., :3]
    grey = image.astype(np.float32).mean(axis=-1, keepdims=True) / 255.0
    blended = (1 - alpha) * grey + alpha * colour
    return (blended * 255).round().clip(0, 255).astype(np.uint8)


def resize_tile(image: np.ndarray, side: int) -> np.ndarray:
    """Scale a uint8 ``(H, W, 3)`` image so its longer side is ``side`` px (no-op if it already is).

    Integer upscales repeat pixels (patch edges stay sharp); anything else is bilinear.
    """
    from PIL import Image

    height, width = image.shape[:2]
    if max(height, width) == side:
        return image
    if side % max(height, width) == 0:
        factor = side // max(height, width)
        return image.repeat(factor, axis=0).repeat(factor, axis=1)
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def default_tile_side(native: int, columns: int) -> int:
    """Tile side for ``columns`` tiles of ``native`` px: small inputs are enlarged by an integer
    factor to at least 160 px (room for labels); more than 8 columns are shrunk to <= 112 px."""
    if columns > 8:
        return min(native, 112)
    return native * -(-160 // native) if native < 160 else native


def grid_size(rows: int, cols: int, tile_h: int, tile_w: int, header: bool = False) -> tuple[int, int]:
    """Pixel ``(height, width)`` of :func:`render_grid`'s output."""
    width = 2 * MARGIN + cols * tile_w + (cols - 1) * GAP
    height = 2 * MARGIN + rows * (BAND + tile_h) + (rows - 1) * GAP + (BAND if header else 0)
    return height, width


def tile_origin(row: int, col: int, tile_h: int, tile_w: int, header: bool = False) -> tuple[int, int]:
    """Top-left pixel ``(y, x)`` of tile ``(row, col)`` in :func:`render_grid`'s output."""
    y = MARGIN + (BAND if header else 0) + row * (BAND + tile_h + GAP) + BAND
    return y, MARGIN + col * (tile_w + GAP)


def render_grid(
    tiles: Sequence[Sequence[np.ndarray]],
    row_titles: Sequence[str],
    col_labels: Sequence[str] | None = None,
) -> np.ndarray:
    """Lay out equally sized uint8 ``(h, w, 3)`` tiles in rows, each under its title.

    Args:
        tiles: ``rows x cols`` images, all the same shape.
        row_titles: one title per row, written left-aligned in the band above the row.
        col_labels: optional labels in a header band above the first row, one per column.

    Returns:
        uint8 ``(H, W, 3)`` with ``(H, W) == grid_size(...)``; tile pixels are copied exactly.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = len(tiles), len(tiles[0])
    tile_h, tile_w = tiles[0][0].shape[:2]
    if len(row_titles) != rows or any(len(r) != cols for r in tiles):
        raise ValueError("tiles must be a full rows x cols table with one title per row")
    header = col_labels is not None
    height, width = grid_size(rows, cols, tile_h, tile_w, header)
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            if tile.shape[:2] != (tile_h, tile_w):
                raise ValueError(f"tile ({r}, {c}) is {tile.shape[:2]}, expected {(tile_h, tile_w)}")
            y, x = tile_origin(r, c, tile_h, tile_w, header)
            canvas[y : y + tile_h, x : x + tile_w] = tile[..., :3]

    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    fig.figimage(canvas, xo=0, yo=0, origin="upper")  # unresampled: one array pixel per output pixel

    def text(y_px: float, x_px: float, label: str, **kw) -> None:
        # Figure coordinates are fractions from the bottom-left; bands are measured from the top.
        fig.text(
            x_px / width, 1 - y_px / height, label, color=TEXT_COLOR, fontsize=FONT_PT, va="center", **kw
        )

    if header:
        for c, label in enumerate(col_labels):
            _, x = tile_origin(0, c, tile_h, tile_w, header)
            text(MARGIN + BAND / 2, x + tile_w / 2, label, ha="center")
    for r, title in enumerate(row_titles):
        y, _ = tile_origin(r, 0, tile_h, tile_w, header)
        text(y - BAND / 2, MARGIN, title, ha="left", fontweight="bold")
    agg = FigureCanvasAgg(fig)
    agg.draw()
    return np.asarray(agg.buffer_rgba())[..., :3].copy()


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 ``(H, W, 3)`` array as a picture, in the format its suffix names (PNG, JPEG,
    WebP; the name is kept from when PNG was the only one)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = IMAGE_FORMATS.get(path.suffix.lower(), "PNG")
    picture = Image.fromarray(image)
    atomic_write(path, lambda tmp: picture.save(tmp, format=fmt, **({"quality": 92} if fmt == "JPEG" else {})))
    return path


def save_gif(frames: Sequence[np.ndarray], path: str | Path, frame_ms: int = 500) -> Path:
    """Write uint8 ``(H, W, 3)`` arrays as a looping GIF (``frame_ms`` per frame)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # An adaptive palette per frame without dithering: GIF's default web palette dithers gradients.
    images = [Image.fromarray(f).quantize(colors=256, dither=Image.Dither.NONE) for f in frames]
    atomic_write(path, lambda tmp: images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                                                   duration=frame_ms, loop=0))
    return path


__all__ = [
    "default_tile_side",
    "grid_size",
    "heatmap_overlay",
    "kept_mask",
    "mask_dropped",
    "render_grid",
    "resize_tile",
    "save_gif",
    "save_png",
    "tile_origin",
]

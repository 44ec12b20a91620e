"""Deterministic synthetic action videos for the demo: ``generate(num_clips, seed)``.

Design rationale (fixed before any pruning result was looked at; not tuned afterwards)
-------------------------------------------------------------------------------------
STA rests on two premises about real video: most tokens are *temporally redundant* (the
background barely changes from frame to frame) and the class lives in a few *semantically
important*, moving tokens. A demo that is to test those premises, not assume them, needs
video that has the same structure, including the parts that make pruning hard:

* **Background**: a textured scene (a few random oriented sinusoidal gratings plus
  smoothed noise, random colours), static in half of the clips and slowly panning (up to
  0.5 px/frame, random direction) in the other half. Redundant in time, but not flat, so
  the background tokens are not trivially distinguishable from the object by their
  magnitude alone.
* **One foreground object whose motion is the class.** Twelve classes: translate left /
  right / up / down, rotate clockwise / counter-clockwise, grow / shrink (zoom), appear /
  disappear (a fast fade at a random frame), stay still, shake (horizontal oscillation).
  The object is two-toned (one half a second colour) so that rotation is visible for
  every shape.
* **Nuisances independent of the class**: shape (ellipse, square, triangle, cross,
  L-shape), both colours, size (radius 9-20 px, the size at mid-clip for zooms), speed
  (translation 1-2.5 px/frame, rotation 6-14 deg/frame, zoom 1.6-2.6x over the clip,
  shake amplitude 4-8 px), initial orientation, and position (the trajectory's mid-clip
  point is uniform over the frame's interior, so position says nothing about the class).
* **Distractors**: one to three small objects (radius 3-7 px) of random shape and colour
  moving in random directions at up to 2 px/frame, so "something moves" is not the class
  and a pruner that keeps every moving token keeps some useless ones too.
* **Sensor noise**: per-pixel Gaussian noise (sigma 0.03 on [0, 1]) in every frame and a
  small per-frame global brightness flicker, so no two frames are bit-identical even on a
  static background (as with a real camera).

Everything is drawn from one ``torch.Generator`` seeded by ``seed``, and rendered by
inverse-mapping pixel coordinates (vectorised over clips, frames and pixels), so a seed
gives the same clips on any machine with the same torch version, and thousands of clips
take seconds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

CLASS_NAMES: list[str] = [
    "move left",
    "move right",
    "move up",
    "move down",
    "rotate clockwise",
    "rotate counter-clockwise",
    "grow",
    "shrink",
    "appear",
    "disappear",
    "stay still",
    "shake",
]
class_names = CLASS_NAMES  # the name the brief / callers use
NUM_CLASSES = len(CLASS_NAMES)
# The seed of the held-out clips the demo models are scored on (their model cards, ablate, finetune
# --demo); disjoint from the training seed 0, and from the demo command's default seed.
HELD_OUT_SEED = 1_000_000
SHAPES = ("ellipse", "square", "triangle", "cross", "L")

# (dx, dy) unit direction of the four translation classes, image coordinates (y down).
_DIRECTIONS = {0: (-1.0, 0.0), 1: (1.0, 0.0), 2: (0.0, -1.0), 3: (0.0, 1.0)}
_CHUNK = 64  # clips rendered at once: bounds the (chunk, T, H, W) float temporaries


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _random_colours(g: torch.Generator, n: int) -> Tensor:
    """(n, 3) saturated-ish RGB colours in [0, 1]."""
    c = torch.rand(n, 3, generator=g)
    # Stretch each colour's channels apart so that objects are not grey.
    lo, hi = c.min(dim=1, keepdim=True).values, c.max(dim=1, keepdim=True).values
    return 0.15 + 0.8 * (c - lo) / (hi - lo).clamp_min(1e-3)


def _shape_inside(shape: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Signed 'insideness' (positive inside, ~distance in object-radius units) of each shape.

    shape: (n,) long indices into SHAPES, broadcast against u, v of shape (n, ...).
    """
    s = shape.view(-1, *([1] * (u.dim() - 1)))
    # Every shape fits in the unit circle, so a window of half-width ceil(radius) + 2 holds it.
    ellipse = 1.0 - torch.sqrt(u * u + (v / 0.6) ** 2)
    square = 0.7 - torch.maximum(u.abs(), v.abs())
    # Triangle pointing up (-v): three half-planes of an equilateral triangle, circumradius 1.
    tri = torch.minimum(torch.minimum(0.5 - v, 0.866 * u + 0.5 * v + 0.5), -0.866 * u + 0.5 * v + 0.5)
    cross = torch.maximum(
        torch.minimum(0.3 - u.abs(), 0.95 - v.abs()), torch.minimum(0.3 - v.abs(), 0.95 - u.abs())
    )
    ell = torch.maximum(  # vertical bar on the left, foot at the bottom
        torch.minimum(torch.minimum(-0.2 - u, 0.7 + u), 0.7 - v.abs()),
        torch.minimum(torch.minimum(0.7 - v, v - 0.2), 0.7 - u.abs()),
    )
    out = torch.where(s == 0, ellipse, square)
    out = torch.where(s == 2, tri, out)
    out = torch.where(s == 3, cross, out)
    return torch.where(s == 4, ell, out)


def _background(g: torch.Generator, n: int, frames: int, size: int) -> Tensor:
    """(n, T, 3, H, W) textured background, static or slowly panning."""
    margin = 12  # room for the pan (<= 0.5 px/frame over 16 frames = 8 px)
    big = size + 2 * margin
    ys, xs = torch.meshgrid(torch.arange(big, dtype=torch.float32), torch.arange(big, dtype=torch.float32),
                            indexing="ij")
    tex = torch.zeros(n, 3, big, big)
    for _ in range(3):  # oriented gratings, each with its own colour
        theta = _uniform(g, n, 0, math.pi).view(n, 1, 1)
        freq = _uniform(g, n, 2 * math.pi / 40, 2 * math.pi / 8).view(n, 1, 1)
        phase = _uniform(g, n, 0, 2 * math.pi).view(n, 1, 1)
        wave = torch.sin(freq * (xs * torch.cos(theta) + ys * torch.sin(theta)) + phase)
        amp = _uniform(g, n, 0.03, 0.12).view(n, 1, 1, 1)
        tex += amp * wave.unsqueeze(1) * _random_colours(g, n).view(n, 3, 1, 1)
    blobs = torch.randn(n, 3, big // 8, big // 8, generator=g)  # smoothed noise: blotches
    tex += 0.08 * F.interpolate(blobs, size=(big, big), mode="bicubic", align_corners=False)
    base = _random_colours(g, n).view(n, 3, 1, 1) * _uniform(g, n, 0.25, 0.6).view(n, 1, 1, 1)
    tex = (tex + base).clamp(0, 1)

    # Pan: per-clip velocity, zero for half the clips; sample crops with sub-pixel offsets.
    speed = _uniform(g, n, 0.1, 0.5) * (torch.rand(n, generator=g) < 0.5)
    angle = _uniform(g, n, 0, 2 * math.pi)
    t = torch.arange(frames, dtype=torch.float32) - (frames - 1) / 2
    off_x = (speed * torch.cos(angle)).view(n, 1) * t  # (n, T) pixels
    off_y = (speed * torch.sin(angle)).view(n, 1) * t
    lin = torch.arange(size, dtype=torch.float32) + margin
    gx = (lin.view(1, 1, 1, size) + off_x.view(n, frames, 1, 1)).expand(n, frames, size, size)
    gy = (lin.view(1, 1, size, 1) + off_y.view(n, frames, 1, 1)).expand(n, frames, size, size)
    grid = torch.stack([gx, gy], dim=-1) / (big - 1) * 2 - 1  # align_corners=True normalisation
    out = tex[:, None, :, margin:margin + size, margin:margin + size].repeat(1, frames, 1, 1, 1)
    pan = (speed > 0).nonzero().flatten()  # static clips need no resampling (the costly part)
    if pan.numel():
        m = pan.numel()
        src = tex[pan].unsqueeze(1).expand(m, frames, 3, big, big).reshape(m * frames, 3, big, big)
        moved = F.grid_sample(src, grid[pan].reshape(m * frames, size, size, 2), mode="bilinear",
                              align_corners=True)
        out[pan] = moved.view(m, frames, 3, size, size)
    return out


_PAD = 48  # canvas padding while painting, so object windows never leave the array


def _paint_local(canvas: Tensor, cx: Tensor, cy: Tensor, half: int, scale: Tensor, theta: Tensor | None,
                 shape: Tensor, colour_fn, opacity: Tensor, mask: Tensor | None = None) -> Tensor:
    """Alpha-composite one soft shape per (clip, frame) into the padded ``canvas`` (n, T, 3, H+2P, W+2P).

    Only a ``2*half`` square window around each centre is touched (objects are small, and
    full-frame rendering is what makes naive generators slow).

    cx, cy, scale, theta, opacity: (n, T) centre (unpadded pixels), radius (px), angle, alpha.
    colour_fn(v) -> colours broadcastable to (n, T, win, win, 3) given object coordinate v (n, T, win, win).
    mask: optional padded (n, T, H+2P, W+2P) array that receives the object's alpha (for analysis).
    """
    n, frames = cx.shape
    win = 2 * half
    x0 = cx.floor().long() - half  # window top-left, unpadded pixel coordinates
    y0 = cy.floor().long() - half
    off = torch.arange(win)
    # (n, T, 1, win) / (n, T, win, 1) padded indices. In clips longer than the 16 frames the demo is
    # made of, an object can travel past the padding: its window is clamped to the canvas edge
    # (invisible padding; before, this raised, so no clip that rendered before changes).
    xi = ((x0 + _PAD).view(n, frames, 1, 1) + off.view(1, 1, 1, win)).clamp(max=canvas.shape[-1] - 1)
    yi = ((y0 + _PAD).view(n, frames, 1, 1) + off.view(1, 1, win, 1)).clamp(max=canvas.shape[-2] - 1)
    rx = (x0.view(n, frames, 1, 1) + off.view(1, 1, 1, win) + 0.5) - cx.view(n, frames, 1, 1)
    ry = (y0.view(n, frames, 1, 1) + off.view(1, 1, win, 1) + 0.5) - cy.view(n, frames, 1, 1)
    s = scale.view(n, frames, 1, 1)
    if theta is None:
        u, v = rx / s, ry / s
    else:  # rotate by -theta into object coordinates
        cos, sin = torch.cos(theta).view(n, frames, 1, 1), torch.sin(theta).view(n, frames, 1, 1)
        u, v = (cos * rx + sin * ry) / s, (-sin * rx + cos * ry) / s
    inside = _shape_inside(shape, u, v) * s  # in pixels, for a ~1 px anti-aliased edge
    alpha = ((inside + 0.5).clamp(0, 1) * opacity.view(n, frames, 1, 1)).unsqueeze(-1)
    ni = torch.arange(n).view(n, 1, 1, 1)
    ti = torch.arange(frames).view(1, frames, 1, 1)
    patch = canvas[ni, ti, :, yi, xi]  # (n, T, win, win, 3): advanced dims first
    canvas[ni, ti, :, yi, xi] = patch + alpha * (colour_fn(v) - patch)
    if mask is not None:
        mask[ni, ti, yi, xi] = alpha.squeeze(-1)
    return canvas


def _foreground(g: torch.Generator, canvas: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """Paint the class-defining object into the padded ``canvas`` (n, T, 3, H+2P, W+2P)."""
    n, frames = canvas.shape[:2]
    size = canvas.shape[-1] - 2 * _PAD
    t = (torch.arange(frames, dtype=torch.float32) - (frames - 1) / 2).view(1, frames)  # centred time
    radius = _uniform(g, n, 9, 20)
    shape = torch.randint(len(SHAPES), (n,), generator=g)
    colour_a, colour_b = _random_colours(g, n), _random_colours(g, n)
    theta0 = _uniform(g, n, 0, 2 * math.pi)
    margin = 28.0  # mid-clip centre uniform over the interior, independent of the class
    cx0, cy0 = _uniform(g, n, margin, size - margin), _uniform(g, n, margin, size - margin)
    speed = _uniform(g, n, 1.0, 2.5)  # px / frame
    spin = _uniform(g, n, math.radians(6), math.radians(14))  # rad / frame
    zoom = _uniform(g, n, math.log(1.6), math.log(2.6)) / (frames - 1)  # log-scale / frame
    shake_amp, shake_period = _uniform(g, n, 4, 8), _uniform(g, n, 4, 8)
    shake_phase = _uniform(g, n, 0, 2 * math.pi)
    switch = _uniform(g, n, 4, frames - 4)  # frame at which appear / disappear happens

    dx = torch.zeros(n)
    dy = torch.zeros(n)
    for cls, (ux, uy) in _DIRECTIONS.items():
        dx = torch.where(labels == cls, torch.full_like(dx, ux), dx)
        dy = torch.where(labels == cls, torch.full_like(dy, uy), dy)
    lab = labels.view(n, 1)
    cx = cx0.view(n, 1) + (dx * speed).view(n, 1) * t
    cy = cy0.view(n, 1) + (dy * speed).view(n, 1) * t
    shake = shake_amp.view(n, 1) * torch.sin(2 * math.pi * t / shake_period.view(n, 1) + shake_phase.view(n, 1))
    cx = torch.where(lab == 11, cx + shake, cx)
    rot_dir = torch.where(lab == 4, 1.0, torch.where(lab == 5, -1.0, 0.0))  # clockwise on screen (y down)
    theta = theta0.view(n, 1) + rot_dir * spin.view(n, 1) * t
    zoom_dir = torch.where(lab == 6, 1.0, torch.where(lab == 7, -1.0, 0.0))
    scale = radius.view(n, 1) * torch.exp(zoom_dir * zoom.view(n, 1) * t)  # (n, T) radius in px
    frame_idx = torch.arange(frames, dtype=torch.float32).view(1, frames)
    ramp = ((frame_idx - switch.view(n, 1)) / 1.5 + 0.5).clamp(0, 1)  # 0 -> 1 over ~1.5 frames
    opacity = torch.where(lab == 8, ramp, torch.where(lab == 9, 1 - ramp, torch.ones(n, frames)))

    def two_tone(v: Tensor) -> Tensor:  # one half of the object in a second colour: rotation shows
        return torch.where((v < 0).unsqueeze(-1), colour_a.view(n, 1, 1, 1, 3), colour_b.view(n, 1, 1, 1, 3))

    half = int(math.ceil(float(scale.max()))) + 2 if n else 2
    return _paint_local(canvas, cx, cy, half, scale, theta, shape, two_tone, opacity, mask)


def _distractors(g: torch.Generator, canvas: Tensor) -> Tensor:
    """Paint one to three small, randomly moving objects into the padded ``canvas``."""
    n, frames = canvas.shape[:2]
    size = canvas.shape[-1] - 2 * _PAD
    count = torch.randint(1, 4, (n,), generator=g)
    t = torch.arange(frames, dtype=torch.float32).view(1, frames)
    for k in range(3):
        present = (count > k).float().view(n, 1).expand(n, frames)
        radius = _uniform(g, n, 3, 7).view(n, 1).expand(n, frames)
        shape = torch.randint(len(SHAPES), (n,), generator=g)
        colour = _random_colours(g, n).view(n, 1, 1, 1, 3)
        x0, y0 = _uniform(g, n, 0, size), _uniform(g, n, 0, size)
        speed, angle = _uniform(g, n, 0, 2), _uniform(g, n, 0, 2 * math.pi)
        cx = x0.view(n, 1) + (speed * torch.cos(angle)).view(n, 1) * t
        cy = y0.view(n, 1) + (speed * torch.sin(angle)).view(n, 1) * t
        canvas = _paint_local(canvas, cx, cy, 10, radius, None, shape, lambda v, c=colour: c, present)
    return canvas


def _render(g: torch.Generator, labels: Tensor, frames: int, size: int) -> tuple[Tensor, Tensor]:
    """Clips (n, T, 3, H, W) in [0, 1] and the foreground object's alpha (n, T, H, W)."""
    n = labels.numel()
    clips = F.pad(_background(g, n, frames, size), (_PAD,) * 4)
    mask = torch.zeros(n, frames, size + 2 * _PAD, size + 2 * _PAD)
    clips = _distractors(g, clips)  # behind the object: it may pass in front of them
    clips = _foreground(g, clips, labels, mask)
    clips = clips[..., _PAD:_PAD + size, _PAD:_PAD + size]
    flicker = 1 + 0.02 * torch.randn(n, frames, 1, 1, 1, generator=g)
    noise = 0.03 * torch.randn(clips.shape, generator=g)
    return (clips * flicker + noise).clamp_(0, 1), mask[..., _PAD:_PAD + size, _PAD:_PAD + size]


def generate(
    num_clips: int, seed: int, frames: int = 16, size: int = 112, *, dtype: torch.dtype = torch.uint8
) -> tuple[Tensor, Tensor]:
    """Generate ``num_clips`` labelled synthetic action clips, deterministically from ``seed``.

    Labels are balanced (each class ``num_clips // NUM_CLASSES`` times, the remainder going to
    the first classes) and shuffled.

    Args:
        num_clips: number of clips N.
        seed: the only source of randomness.
        frames: T. size: H = W.
        dtype: ``torch.uint8`` (0..255, compact) or a float dtype (values in [0, 1]).

    Returns:
        clips ``(N, T, 3, H, W)`` of ``dtype``; labels ``(N,)`` long in ``[0, NUM_CLASSES)``.
    """
    clips, labels, _ = generate_with_masks(num_clips, seed, frames, size, dtype=dtype, masks=False)
    return clips, labels


def generate_with_masks(
    num_clips: int, seed: int, frames: int = 16, size: int = 112, *, dtype: torch.dtype = torch.uint8,
    masks: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`generate` (same clips for the same arguments), plus the class-defining object's coverage.

    Returns:
        clips, labels as :func:`generate`; masks ``(N, T, H, W)`` float in [0, 1], the foreground
        object's alpha in each frame (None when ``masks=False``). For analysing which tokens a
        pruner keeps; the models never see it.
    """
    if num_clips < 0 or frames < 2 or size < 32:
        raise ValueError(f"need num_clips >= 0, frames >= 2, size >= 32 (got {num_clips}, {frames}, {size})")
    g = torch.Generator().manual_seed(int(seed))
    labels = torch.arange(num_clips) % NUM_CLASSES
    labels = labels[torch.randperm(num_clips, generator=g)]
    out = torch.empty(num_clips, frames, 3, size, size, dtype=dtype)
    alpha = torch.empty(num_clips, frames, size, size) if masks else None
    for start in range(0, num_clips, _CHUNK):
        # Each chunk has its own generator derived from (seed, chunk start), so the chunk size
        # bounds memory without making clips depend on anything but (seed, index).
        cg = torch.Generator().manual_seed(int(seed) * 1_000_003 + start)
        chunk, mask = _render(cg, labels[start:start + _CHUNK], frames, size)
        out[start:start + _CHUNK] = (chunk * 255).round_().to(dtype) if dtype == torch.uint8 else chunk.to(dtype)
        if alpha is not None:
            alpha[start:start + _CHUNK] = mask
    return out, labels, alpha

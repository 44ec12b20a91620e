"""Analyses of the paper's Sec. 3.3 and Fig. 4: trajectory sum (redundancy), GradNorm (gradnorm),
kept-token pictures (visualize). Commands: ``staprune visualize`` (visualize_cli) and
``staprune analyze redundancy|gradnorm`` (cli). Backbone geometry for the analyses lives in
backbones, model/clip loading in inputs."""

from .gradnorm import gradnorm, mass_fraction, random_mass_fraction
from .redundancy import clip_trajectory_sums, split_by_frame, trajectory_sum
from .visualize import kept_mask, mask_dropped, render_grid

__all__ = [
    "clip_trajectory_sums",
    "gradnorm",
    "kept_mask",
    "mask_dropped",
    "mass_fraction",
    "random_mass_fraction",
    "render_grid",
    "split_by_frame",
    "trajectory_sum",
]

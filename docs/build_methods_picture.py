"""Draw docs/images/video_llm_methods.jpg: the kept tokens of every video-token method at one budget,
side by side, on one clip (what ``staprune visualize VIDEO --model M --keep 0.25 --method ...`` draws
for a checkpoint of your own).

This machine has no model hub and no real video, so the picture uses the demo's synthetic "move right"
clip and LLaVA-OneVision-0.5B's shapes (SigLIP at 384 px, 14 x 14 tokens per frame) with random
weights and four vision and four language layers: the methods that read pixels or token changes
(static, EVS, VidCom2, DivPrune, STA) follow the clip; those that read attention (VisionZip, FastV)
show where their rule puts the budget, not what a trained model attends to.

    python docs/build_methods_picture.py [--out docs/images/video_llm_methods.jpg]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from staprune.analysis.video_llm import kept_views, sample_video, unit_images
from staprune.analysis.visualize import render_grid, resize_tile, save_png
from staprune.core.config import STAConfig
from staprune.core.video_methods import video_method_names
from staprune.data import write_video
from staprune.demo.data import CLASS_NAMES, generate
from staprune.families import family_named, model_entry

FRAMES, KEEP, SIDE = 8, 0.25, 96


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "images" / "video_llm_methods.jpg"))
    args = parser.parse_args(argv)
    family = family_named("llava_onevision")
    spec = model_entry("LLaVA-OneVision-0.5B").spec.with_input(FRAMES)
    spec.config["vision_config"]["num_hidden_layers"] = 4
    spec.config["text_config"]["num_hidden_layers"] = 4
    torch.manual_seed(0)
    model = family.build(spec)
    clips, labels = generate(len(CLASS_NAMES), seed=3, frames=16, size=224)
    clip = clips[int((labels == CLASS_NAMES.index("move right")).nonzero()[0])]  # (T, 3, H, W) uint8
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "move_right.mp4"
        write_video(path, clip.permute(0, 2, 3, 1).numpy(), fps=8)
        video = sample_video(path, spec.frames, spec.size)
        settings = [STAConfig(keep_ratio=KEEP, method=m) for m in video_method_names()]
        views = kept_views(model, family, spec, video, settings)
    images, _ = unit_images(video, family, spec)
    rows = [images] + [v.images for v in views]
    tiles = [[resize_tile(img, SIDE) for img in row] for row in rows]
    titles = ["input: the demo's synthetic 'move right' clip, 8 frames (random weights: see the script)"]
    labels = [f"frame {video.indices[t]}" for t in range(len(images))]
    print(f"wrote {save_png(render_grid(tiles, titles + [v.title for v in views], labels), args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decoding speed: the seeking reader against the linear one, side by side, on two kinds of video.

Reads the frames one evaluation view needs (``--frames`` evenly spaced frames over the whole video,
as the uniform and segment protocols spread their clips) with ``staprune.data.read_frames``:

* ``segments`` (the default): seek before every stretch of wanted frames (one GOP fragment each);
* ``linear`` (the reader before): seek once, decode from the first wanted frame to the last;
* torchcodec's ``VideoDecoder`` and decord's ``VideoReader``, when they are installed (they are not
  dependencies of staprune; their frames are compared too).

Videos are generated here (H.264 via PyAV): a clip with a single keyframe (nothing to skip), and a
720p clip with a keyframe every 30 frames (the common case). Every reader runs once per round, in
turn, so load hits all alike; printed: median ms per read with the min-max of the rounds, frames/s,
the speed-up over ``linear``, and whether the frames are bit-identical to ``linear``'s.

    python benchmarks/bench_decode.py --rounds 5            # the full measurement
    python benchmarks/bench_decode.py --smoke               # CI: tiny videos, seconds; not a result
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from staprune.data import write_video
from staprune.data.video import probe, read_frames

SMOKE = {"frames": 8, "rounds": 3, "length": 60, "height": 120, "width": 160}


def make_video(path: Path, length: int, height: int, width: int, gop: int) -> Path:
    """A moving gradient with noise (so the encoder cannot skip frames), ``gop`` frames per keyframe."""
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(0, 255, width).view(1, width, 1)
    frames = []
    for t in range(length):
        frame = ((x + 3 * t) % 256).expand(height, width, 3).clone()
        frame += torch.randint(-8, 9, (height, width, 3), generator=g)
        frames.append(frame.clamp(0, 255).to(torch.uint8))
    return write_video(path, torch.stack(frames), fps=30, codec="libx264", gop=gop)


def readers() -> dict[str, Callable[[Path, list[int]], torch.Tensor]]:
    """Every reader available here, by name."""
    out: dict[str, Callable[[Path, list[int]], torch.Tensor]] = {
        "linear": lambda p, i: read_frames(p, i, strategy="linear"),
        "segments": lambda p, i: read_frames(p, i, strategy="segments"),
    }
    try:
        from torchcodec.decoders import VideoDecoder  # optional: not a staprune dependency

        out["torchcodec"] = lambda p, i: VideoDecoder(str(p), dimension_order="NHWC").get_frames_at(i).data
    except ImportError:
        pass
    try:
        import decord  # optional: not a staprune dependency

        out["decord"] = lambda p, i: torch.from_numpy(decord.VideoReader(str(p)).get_batch(i).asnumpy())
    except ImportError:
        pass
    return out


def measure(path: Path, indices: list[int], rounds: int) -> list[dict]:
    funcs = readers()
    reference = funcs["linear"](path, indices)
    times: dict[str, list[float]] = {name: [] for name in funcs}
    same: dict[str, bool] = {}
    for _ in range(rounds):
        for name, fn in funcs.items():
            start = time.perf_counter()
            frames = fn(path, indices)
            times[name].append(time.perf_counter() - start)
            same[name] = bool(torch.equal(frames, reference))
    base = statistics.median(times["linear"])
    return [{"reader": name, "median_ms": 1000 * statistics.median(t), "min_ms": 1000 * min(t),
             "max_ms": 1000 * max(t), "frames_per_s": len(indices) / statistics.median(t),
             "speedup": base / statistics.median(t), "identical": same[name]} for name, t in times.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16, help="evenly spaced frames read per call (default 16)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds, every reader once each (default 5)")
    parser.add_argument("--length", type=int, default=300, help="frames per video (default 300: 10 s at 30 fps)")
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (decoding threads are FFmpeg's)")
    parser.add_argument("--smoke", action="store_true", help="CI check: tiny videos, 3 rounds (seconds); not a result")
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
        print("SMOKE RUN (--smoke): tiny videos and few rounds check that the script runs; its numbers are not "
              "a result")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        videos = {
            "one keyframe": make_video(Path(folder) / "one_key.mp4", args.length, args.height, args.width,
                                       gop=args.length),
            "keyframe every 30": make_video(Path(folder) / "gop30.mp4", args.length, args.height, args.width, gop=30),
        }
        for label, path in videos.items():
            n = probe(path).num_frames
            indices = [round(k * (n - 1) / (args.frames - 1)) for k in range(args.frames)]
            print(f"\n{label}: {n} frames of {args.width}x{args.height}, reading {args.frames} evenly spaced, "
                  f"{args.rounds} rounds")
            print(f"{'reader':<12}{'median ms':>10}{'min-max ms':>16}{'frames/s':>10}{'speedup':>9}  identical")
            for row in measure(path, indices, args.rounds):
                spread = f"{row['min_ms']:.0f}-{row['max_ms']:.0f}"
                print(f"{row['reader']:<12}{row['median_ms']:>10.1f}{spread:>16}{row['frames_per_s']:>10.1f}"
                      f"{row['speedup']:>8.2f}x  {'yes' if row['identical'] else 'NO'}")
    print("\nspeedup = linear's median / the reader's median, same frames, same rounds.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The families beyond the paper's (ViViT, V-JEPA 2, TimeSformer) through every command, as a user
runs them: a saved tiny Hugging Face folder and PyAV-made clips; ``flops``, ``bench``, ``eval``
(one process and ``torchrun`` x2 give the same results), ``visualize``, ``analyze``, ``finetune``."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import classifier_family_names

from staprune.api.flops import analytic_flops
from staprune.cli import main
from staprune.data import write_video
from staprune.families import family_named

REPO = Path(__file__).resolve().parents[1]
# Every registered video classifier but the paper's two (their commands have test files of their own).
FAMILIES = [name for name in classifier_family_names() if name not in ("videomae", "swin3d")]
NUM_VIDEOS, CLASSES = 6, 7
R = 8  # tokens dropped per unit at the first stage of 8 x 7x7 tokens


@pytest.fixture(autouse=True)
def _raise_from_cli(monkeypatch):
    monkeypatch.setenv("STAPRUNE_TRACEBACK", "1")


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    """Six 40-frame 112x140 clips (a textured background and a square moving at its own speed)."""
    root = tmp_path_factory.mktemp("family_videos")
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(NUM_VIDEOS):
        frames = torch.randint(30, 200, (1, 14, 18, 3), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)
        frames = frames[:, :112, :140].repeat(40, 1, 1, 1).clone()
        for t in range(40):
            x = (t * (i + 1)) % 100
            frames[t, 40:72, x : x + 32] = torch.tensor([220, 40, 40])
        write_video(root / f"v{i}.mp4", frames.to(torch.uint8))
        lines.append(f"v{i}.mp4 {i % CLASSES}")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return {"root": root, "list": root / "list.txt", "video": root / "v1.mp4"}


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory) -> tuple[str, Path, int]:
    """The family's tiny model saved as a Hugging Face folder (classifier spread so predictions differ),
    and the clip length it is built for."""
    family = family_named(request.param)
    model = family.tiny_model()
    frames = family.spec_of(model).frames
    with torch.no_grad():
        model.classifier.weight.mul_(20.0)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, folder, frames


def _run(*argv: str):
    """The CLI in this process: (exit code, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(list(argv))
    return rc, out.getvalue()


def test_flops_default_levels_and_measured(saved):
    family, folder, frames = saved
    rc, out = _run("flops", "--model", str(folder), "--json")
    rows = json.loads(out)
    assert rc == 0 and [r["r"] for r in rows][0] == 0 and len(rows) == 4  # dense + the model's three levels
    fractions = [r["fraction_of_dense"] for r in rows]
    assert fractions[0] == 1.0 and fractions == sorted(fractions, reverse=True) and fractions[-1] < 0.8
    rc, out = _run("flops", "--model", str(folder), "--r", "0", str(R), "--measured", "--json")
    measured = json.loads(out)
    for row in measured:
        assert row["gflops"] == pytest.approx(analytic_flops(str(folder), row["r"]).gflops, rel=0.02)


@pytest.mark.parametrize("name", ["ViViT-B", "VJEPA2-L-fpc16", "VJEPA2-g-fpc64", "TimeSformer-B"])
def test_flops_of_registry_models(name):
    rc, out = _run("flops", "--model", name, "--json")
    rows = json.loads(out)
    assert rc == 0 and len(rows) == 4 and rows[0]["gflops"] > rows[-1]["gflops"] > 0


def test_bench_dense_vs_pruned(saved):
    _, folder, _ = saved
    rc, out = _run("bench", "--model", str(folder), "--r", str(R), "--repeats", "1", "--warmup", "0", "--json")
    rows = json.loads(out)
    assert rc == 0 and [r["config"] for r in rows] == ["dense", f"sta r={R}"]
    assert rows[1]["flops_ratio"] > 1.0 and rows[1]["gflops"] < rows[0]["gflops"]


@pytest.mark.slow
def test_eval_one_process_and_torchrun_agree(saved, videos, tmp_path):
    family, folder, frames = saved
    common = ["--model", str(folder), "--data", str(videos["list"]), "--views", "1x2", "--frames", str(frames),
              "--stride", "2", "--r", str(R), "--workers", "0", "--batch-size", "3", "--json", "--quiet"]
    rc, out = _run("eval", *common, "--out", str(tmp_path / "single"))
    (single,) = json.loads(out)
    assert rc == 0 and single["videos"] == NUM_VIDEOS and single["error"] is None and single["gflops"] > 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "staprune",
           "eval", *[a if a != "--r" else "--rs" for a in common], "--out", str(tmp_path / "torchrun")]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (multi,) = json.loads(done.stdout)
    assert (multi["top1"], multi["top5"], multi["videos"]) == (single["top1"], single["top5"], single["videos"])

    def predictions(run_dir: Path) -> dict[str, list[int]]:
        return {rec["path"]: rec["top5"] for f in run_dir.glob("rank*.jsonl")
                for rec in map(json.loads, f.read_text().splitlines())}

    run_dir = Path(single["run_dir"])
    assert multi["run_dir"] == single["run_dir"] and run_dir.name == f"sta_r{R}"
    assert predictions(tmp_path / "torchrun" / run_dir) == predictions(tmp_path / "single" / run_dir)
    assert len(list((tmp_path / "torchrun" / run_dir).glob("rank*.jsonl"))) == 2


def test_visualize_and_analyze(saved, videos, tmp_path):
    family, folder, frames = saved
    png = tmp_path / "kept.png"
    rc, out = _run("visualize", str(videos["video"]), "--model", str(folder), "--r", str(R), "-o", str(png))
    assert rc == 0 and png.stat().st_size > 0 and out.count("after stage") == 3
    rc, out = _run("analyze", "redundancy", "--model", str(folder), "--data", str(videos["list"]), "--r", str(R),
                   "--max-clips", "2", "--batch-size", "2", "--json")
    report = json.loads(out)
    assert rc == 0 and set(report["results"]) == {"dense", "random", "sta"}
    assert report["frames"] == 8 and all(report["results"][m]["clips"] == 2 for m in report["results"])
    assert report["results"]["sta"]["final_tokens"] < report["results"]["dense"]["final_tokens"]
    rc, out = _run("analyze", "gradnorm", str(videos["video"]), "--model", str(folder), "--r", str(R),
                   "-o", str(tmp_path / "grad.png"), "--draws", "4", "--json")
    summary = json.loads(out)
    assert rc == 0 and 0.0 < summary["sta_fraction"] <= 1.0 and summary["tokens"] == 8 * 49


def test_finetune_a_few_steps(saved, videos, tmp_path):
    _, folder, frames = saved
    out = tmp_path / "ft"
    rc, _ = _run("finetune", "--data", str(videos["list"]), "--model", str(folder), "--r", str(R), "--epochs", "1",
                 "--batch-size", "3", "--frames", str(frames), "--stride", "2", "--workers", "0", "--out", str(out),
                 "--quiet")
    assert rc == 0 and (out / "epoch_001.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["epochs_this_run"][0]["loss"] > 0
    assert summary["recipe"]["r"] == R

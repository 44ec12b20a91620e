"""Results you can trust: resuming only what is the same result, one writer per output folder, no
silently ignored option, no traceback. Each case here was a silent wrong result, a traceback or a
surprise before; every one goes through the real CLI entry point."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli, snapshot, tiny_model, write_list_of_videos

from staprune.cli import main

CLASSES, FRAMES, SIZE = 5, 8, 64
# VideoMAE's tiny model at 8 x 64², 3 blocks of width 32.
TINY_VIT = dict(frames=FRAMES, size=SIZE, layers=3, hidden=32, heads=2, intermediate_size=64, num_classes=CLASSES)


_cli, _snapshot = run_cli, snapshot


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trust")
    tiny_model("videomae", **TINY_VIT).save_pretrained(root / "model")
    write_list_of_videos(root, size=SIZE, classes=CLASSES)
    # A Hugging Face folder whose weights file is cut in half, and one whose config.json is not JSON.
    shutil.copytree(root / "model", root / "truncated")
    weights = (root / "truncated" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    shutil.copytree(root / "model", root / "badconfig")
    (root / "badconfig" / "config.json").write_text("{ this is not json")
    (root / "picture.png").write_bytes(b"an existing picture")
    return {"root": root, "model": root / "model", "list": root / "list.txt", "video": root / "v0.mp4"}


# (id, argv builder, words in the one line). Each exits 2 with exactly one line, before any work.
CASES = [
    ("hf-truncated-weights", lambda a: ["eval", "--model", str(a["root"] / "truncated"), "--data", str(a["list"])],
     "do not fit its config.json"),
    ("hf-config-not-json", lambda a: ["eval", "--model", str(a["root"] / "badconfig"), "--data", str(a["list"])],
     "is not valid JSON"),
    ("bench-threads-negative", lambda a: ["bench", "--model", "ViT-S", "--threads", "-1"], "--threads must be >= 1"),
    ("ablate-threads-negative", lambda a: ["ablate", "--threads", "-1", "--out", str(a["root"] / "ab")],
     "--threads must be >= 1"),
    ("finetune-negative-lr", lambda a: ["finetune", "--demo", "--lr", "-1", "--out", str(a["root"] / "ft")],
     "--lr must be a positive"),
    ("finetune-label-smoothing", lambda a: ["finetune", "--demo", "--label-smoothing", "1.5", "--out",
                                            str(a["root"] / "ft")], "--label-smoothing must be in"),
    ("image-size-not-a-patch-multiple", lambda a: ["eval", "--model", "ViT-S", "--data", str(a["list"]),
                                                   "--image-size", "100", "--r", "4"], "not a multiple"),
    ("image-size-of-a-fixed-model", lambda a: ["eval", "--model", str(a["model"]), "--data", str(a["list"]),
                                               "--image-size", "96"], "drop --image-size 96"),
    ("demo-model-other-size", lambda a: ["eval", "--model", "demo-vit", "--data", str(a["list"]), "--image-size",
                                         "224"], "leave out the frame count and the image size"),
    ("explicit-schedule-with-r", lambda a: ["flops", "--model", "ViT-B", "--schedule", "8x64,4x64,2x64", "--r", "32"],
     "gives every stage's r; drop --r"),
    ("eval-explicit-schedule-with-r", lambda a: ["eval", "--model", str(a["model"]), "--data", str(a["list"]),
                                                 "--schedule", "4x4,2x4,1x4", "--r", "4"], "drop --r"),
    ("empty-location", lambda a: ["flops", "--model", "ViT-S", "--locations", "0,,4"], "give block indices"),
    ("redundancy-no-clips", lambda a: ["analyze", "redundancy", "--model", str(a["model"]), "--demo", "--max-clips",
                                       "0"], "--max-clips must be >= 1"),
    ("visualize-existing-output", lambda a: ["visualize", str(a["video"]), "--model", str(a["model"]), "--r", "4",
                                             "-o", str(a["root"] / "picture.png")], "already exists; pass --force"),
    ("gradnorm-existing-output", lambda a: ["analyze", "gradnorm", str(a["video"]), "--model", str(a["model"]),
                                            "--r", "4", "-o", str(a["root"] / "picture.png")], "pass --force"),
]


@pytest.mark.parametrize(("name", "argv", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_invocation_is_one_line_and_changes_nothing(assets, name, argv, words):
    before = _snapshot(assets["root"])
    rc, _, err = _cli(*argv(assets))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("staprune "), err
    assert words in lines[0] and "Traceback" not in err
    assert _snapshot(assets["root"]) == before


def _eval(assets, out: Path, *extra: str) -> tuple[int, str, str]:
    return _cli("eval", "--model", str(extra[0]) if extra and extra[0].startswith("/") else str(assets["model"]),
                "--data", str(assets["list"]), "--out", str(out), "--views", "1x1", "--method", "none", "--workers",
                "0", "--quiet", *[e for e in extra if not e.startswith("/")])


def test_resume_refuses_other_weights_at_the_same_path(assets, tmp_path):
    """The same folder name with other weights is another model: its records are not reused."""
    model = tmp_path / "model"
    tiny_model("videomae", 0, **TINY_VIT).save_pretrained(model)
    assert _eval(assets, tmp_path / "out", str(model))[0] == 0
    tiny_model("videomae", 1, **TINY_VIT).save_pretrained(model)  # retrained in place
    before = _snapshot(tmp_path / "out")
    rc, _, err = _eval(assets, tmp_path / "out", str(model), "--resume")
    assert rc == 2 and "settings changed" in err and "model_digest" in err and "Traceback" not in err
    assert _snapshot(tmp_path / "out") == before


def test_resume_skips_junk_records_and_recomputes_their_videos(assets, tmp_path):
    assert _eval(assets, tmp_path / "out")[0] == 0
    (rank0,) = (tmp_path / "out").glob("*/none_r0/rank0.jsonl")
    good = rank0.read_text().splitlines()
    rank0.write_text("\n".join([good[0], '{"index": 1}', "not json at all", '{"path": "x"}']) + "\n")
    rc, out, err = _cli("eval", "--model", str(assets["model"]), "--data", str(assets["list"]), "--out",
                        str(tmp_path / "out"), "--views", "1x1", "--method", "none", "--workers", "0", "--quiet",
                        "--resume", "--json")
    assert rc == 0 and "Traceback" not in err, err
    assert "resuming, 1 of 4 videos already done" in err
    assert json.loads(out)[0]["videos"] == 4


def test_resume_names_a_record_that_is_not_utf8(assets, tmp_path):
    """Bytes that are not UTF-8 in a rank file: one line naming the file and line, the video evaluated
    again, the other records kept."""
    assert _eval(assets, tmp_path / "out")[0] == 0
    (rank0,) = (tmp_path / "out").glob("*/none_r0/rank0.jsonl")
    good = rank0.read_bytes().splitlines(keepends=True)
    rank0.write_bytes(b"".join([good[0], b'{"index": 1, "path": "v\xe9\xff.mp4"}\n', *good[2:]]))
    rc, out, err = _cli("eval", "--model", str(assets["model"]), "--data", str(assets["list"]), "--out",
                        str(tmp_path / "out"), "--views", "1x1", "--method", "none", "--workers", "0", "--quiet",
                        "--resume", "--json")
    assert rc == 0 and "Traceback" not in err, err
    assert f"{rank0}:2: a damaged record (not UTF-8) is skipped" in err
    assert "resuming, 3 of 4 videos already done" in err
    assert json.loads(out)[0]["videos"] == 4


def test_a_second_run_into_a_folder_being_written_refuses(assets, tmp_path):
    from staprune.storage.runfolder import RunLock

    out = tmp_path / "out"
    with RunLock(out):
        rc, _, err = _eval(assets, out)
    assert rc == 2 and "is being written by another staprune run" in err and f"pid {os.getpid()}" in err
    assert not list(out.glob("*/*/rank*.jsonl"))
    assert _eval(assets, out)[0] == 0  # released: the folder is free again


@pytest.mark.slow
def test_two_concurrent_processes_never_mix_their_records(assets, tmp_path):
    """A real second process: while one eval writes a folder, another with other views refuses."""
    out = tmp_path / "out"
    env = dict(os.environ, STAPRUNE_EVAL_SLEEP="6")  # 4 videos: the first run writes for ~24 s
    argv = [sys.executable, "-m", "staprune", "eval", "--model", str(assets["model"]), "--data", str(assets["list"]),
            "--out", str(out), "--method", "none", "--workers", "0", "--quiet"]
    first = subprocess.Popen([*argv, "--views", "1x1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("*/*/rank0.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.2)
    second = subprocess.run([*argv, "--views", "2x1"], capture_output=True, text=True, timeout=300)
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert second.returncode == 2 and "is being written by another staprune run" in second.stderr
    records = [json.loads(ln) for p in out.glob("*/*/rank*.jsonl") for ln in p.read_text().splitlines()]
    assert len(records) == 4 and all(r["views"] == 1 for r in records)


def test_ablate_resume_refuses_another_definition(tmp_path):
    base = ["ablate", "--tables", "6e", "--batch-size", "8", "--out", str(tmp_path / "ab")]
    rc, _, err = _cli(*base, "--clips", "8")
    assert rc == 0, err
    before = _snapshot(tmp_path / "ab")
    rc, _, err = _cli(*base, "--clips", "16", "--resume")
    assert rc == 2 and "measured on another definition" in err and "clips: 8 -> 16" in err
    assert _snapshot(tmp_path / "ab") == before
    rc, _, err = _cli(*base, "--clips", "8", "--resume")
    assert rc == 0 and "already done" in err


def test_a_full_disk_still_prints_the_table_and_leaves_no_partial_files(assets, tmp_path, monkeypatch):
    import staprune.storage.runfolder as runfolder

    replace = runfolder.os.replace

    def no_space_for_results(src, dst):
        if Path(dst).name in ("results.json", "accuracy_vs_gflops.png"):
            raise OSError(errno.ENOSPC, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr(runfolder.os, "replace", no_space_for_results)
    rc, out, err = _eval(assets, tmp_path / "out")
    assert rc == 2 and "no space left" in err and "Traceback" not in err
    assert "top1" in out  # the table came first
    assert not list((tmp_path / "out").rglob("*.tmp")) and not (tmp_path / "out" / "accuracy_vs_gflops.png").exists()


def test_default_sweep_has_a_dense_row_labelled_dense(assets, tmp_path):
    rc, out, err = _cli("eval", "--model", str(assets["model"]), "--data", str(assets["list"]), "--out",
                        str(tmp_path / "out"), "--views", "1x1", "--workers", "0", "--quiet")
    assert rc == 0, err
    lines = [ln.split() for ln in out.splitlines()[1:]]
    assert lines[0][:2] == ["dense", "0"] and [ln[0] for ln in lines[1:]] == ["sta"] * 3


def test_image_size_is_honoured_for_models_of_any_size():
    import staprune

    assert staprune.load("VideoSwin-T", image_size=112).preprocessing.size == 112
    assert staprune.load("VideoSwin-T").preprocessing.size == 224


def test_explicit_schedule_is_one_setting_not_three_identical_ones(capsys):
    assert main(["flops", "--model", "ViT-B", "--schedule", "8x64,4x64,2x64", "--json"]) == 0
    dense, scheduled = json.loads(capsys.readouterr().out)
    assert dense["fraction_of_dense"] == 1.0 and dense["options"] == {}
    assert scheduled["options"]["schedule"] == [[8, 64], [4, 64], [2, 64]] and scheduled["gflops"] < dense["gflops"]


@pytest.mark.slow
def test_demo_training_never_writes_into_the_package_unless_asked(tmp_path):
    from staprune.demo.models import WEIGHTS_DIR

    shipped = {p.name: p.read_bytes() for p in WEIGHTS_DIR.iterdir()}
    run = subprocess.run([sys.executable, "-m", "staprune.demo.train", "--model", "demo-vit", "--steps", "1",
                          "--train-clips", "16", "--held-out-clips", "8", "--eval-every", "0", "--threads", "1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "demo-weights" / "demo-vit.safetensors").is_file()
    assert {p.name: p.read_bytes() for p in WEIGHTS_DIR.iterdir()} == shipped


@pytest.mark.slow
@pytest.mark.parametrize("group", [False, True], ids=["main-process", "whole-group"])
def test_ctrl_c_with_decoding_workers_is_one_clean_message(assets, tmp_path, group):
    env = dict(os.environ, STAPRUNE_EVAL_SLEEP="3")
    proc = subprocess.Popen([sys.executable, "-m", "staprune", "eval", "--model", str(assets["model"]), "--data",
                             str(assets["list"]), "--out", str(tmp_path / "out"), "--views", "1x1", "--method",
                             "none", "--workers", "2", "--quiet"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "out").glob("*/*/rank0.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    if group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err


# --- the first hour ----------------------------------------------------------------------------
def test_version_and_help_state_their_defaults(capsys):
    from staprune import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"staprune {__version__}"
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "training epochs (default: 3)" in text and "(default: 0.05)" in text
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "clips per forward (default: 1)" in text and "(default: None)" not in text


def test_paired_difference_and_its_noise():
    from staprune.api.evaluation import ClipScores, paired_difference

    a = ClipScores(hits=[True] * 60 + [False] * 40)
    b = ClipScores(hits=[True] * 50 + [False] * 50)
    diff, se = paired_difference(a, b)
    assert diff == pytest.approx(10.0) and 2.9 < se < 3.1  # 10 discordant clips of 100: sqrt(0.1*0.9/99)
    with pytest.raises(ValueError):
        paired_difference(a, ClipScores(hits=[True]))


def test_demo_states_its_noise_and_its_verdicts(tmp_path, capsys, monkeypatch):
    from staprune.commands.demo import main as demo_main
    from staprune.demo import models

    torch.manual_seed(0)
    models.save_demo_weights(models.build_demo_vit(), "demo-vit", tmp_path / "weights" / "demo-vit.safetensors")
    monkeypatch.setattr(models, "WEIGHTS_DIR", tmp_path / "weights")
    assert demo_main(["--clips", "8", "--batch", "8", "--models", "demo-vit", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "top-1 ± s.e." in out and out.count("demo-vit r=") == 3
    assert all(("tie within noise" in ln or "ahead of" in ln or "behind" in ln or "same clips right" in ln)
               for ln in out.splitlines() if ln.startswith("demo-vit r="))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["verdicts"]) == 3 and all(0 <= row["top1_se"] <= 0.5 for row in saved["rows"])


def test_bench_flags_rounds_that_disagree():
    from staprune.runs.timing import BenchRow, noisy

    def row(lo, med, hi):
        return BenchRow("m", "dense", "sta", 0, 1, "fp32", "cpu", 1, 5, med, lo, hi, lo, hi, 1 / med, 1.0, 1.0, 1.0,
                        1.0, 0.0, 0.0, None)

    quiet, busy = row(0.10, 0.11, 0.12), row(0.10, 0.11, 3.0)
    assert noisy([quiet, busy]) == [busy]


def test_long_loops_off_a_terminal_print_lines_with_the_time_left(capsys):
    import io

    from staprune.runs.progress import LineProgress, progress

    stream = io.StringIO()
    bar = progress(10, "eval", "video", file=stream)
    assert isinstance(bar, LineProgress)
    bar.every = 0.0
    bar.update(4)
    assert "eval: 4/10 videos in" in stream.getvalue() and "left" in stream.getvalue()
    assert progress(10, "eval", "video", enabled=False) is None


def test_unreadable_training_videos_are_said_once(assets, tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    lines = assets["list"].read_text().splitlines()
    listing = tmp_path / "train.txt"
    listing.write_text("\n".join([f"{assets['root'] / ln.split()[0]} {ln.split()[1]}" for ln in lines]
                                 + [f"{tmp_path / 'broken.mp4'} 0"]) + "\n")
    rc, _, err = _cli("finetune", "--data", str(listing), "--model", str(assets["model"]), "--epochs", "1",
                      "--batch-size", "2", "--workers", "0", "--frames", "8", "--quiet", "--out", str(tmp_path / "ft"))
    assert rc == 0, err
    assert sum("broken.mp4" in ln for ln in err.splitlines()) == 1 and "1 of 5 training videos cannot be read" in err
    assert "Warning" not in err


def test_analyze_says_once_which_videos_it_could_not_read(assets, tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{assets['video']} 0\n{tmp_path / 'broken.mp4'} 1\n")
    rc, out, err = _cli("analyze", "redundancy", "--model", str(assets["model"]), "--data", str(listing), "--r", "4",
                        "--json")
    assert rc == 0, err
    assert sum("broken.mp4" in ln for ln in err.splitlines()) == 1 and "1 videos could not be read" in err
    assert list(json.loads(out)["failed"]) == [str(tmp_path / "broken.mp4")]
    listing.write_text(f"{tmp_path / 'broken.mp4'} 1\n")
    rc, _, err = _cli("analyze", "redundancy", "--model", str(assets["model"]), "--data", str(listing), "--r", "4")
    assert rc == 2 and "no clip could be measured" in err and len(err.strip().splitlines()) == 1

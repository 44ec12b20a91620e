"""What a user can get wrong ends in one line on stderr (exit 2; Ctrl-C 130), never a traceback or a
silent wrong result, and leaves existing results untouched. Driven through the real CLI entry point."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli, snapshot, tiny_model, write_list_of_videos

import staprune
from staprune.core.video_methods import video_method_names
from staprune.data import write_video

REPO = Path(__file__).resolve().parents[1]
CLASSES, FRAMES, SIZE = 5, 8, 64
# VideoMAE's tiny model at 8 x 64² (4 tubelet-frames x 4x4 tokens), 3 blocks of width 32.
TINY_VIT = dict(frames=FRAMES, size=SIZE, layers=3, hidden=32, heads=2, intermediate_size=64, num_classes=CLASSES)


def _tiny_vit():
    model = tiny_model("videomae", **TINY_VIT)
    with torch.no_grad():  # random init gives near-uniform outputs; spread them so predictions differ
        model.classifier.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("user_errors")
    model = _tiny_vit()
    model.save_pretrained(root / "model")
    lines = write_list_of_videos(root, size=SIZE, classes=CLASSES)
    (root / "three.txt").write_text("\n".join(f"{ln.split()[0]} 24 {ln.split()[1]}" for ln in lines) + "\n")
    (root / "latin1.txt").write_bytes("v0.mp4 1\nvid\xe9o.mp4 2\n".encode("latin-1"))
    (root / "corrupt.pth").write_bytes(b"\x80\x02 this is not a checkpoint at all" * 4)
    from safetensors.torch import save_file

    save_file({"w": torch.ones(64, 64)}, str(root / "full.safetensors"))
    data = (root / "full.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    # An HF folder whose weights do not fit its config (hidden 32 weights, config says 48).
    (root / "mismatch").mkdir()
    model.save_pretrained(root / "mismatch")
    cfg = json.loads((root / "mismatch" / "config.json").read_text())
    cfg["hidden_size"] = 48
    (root / "mismatch" / "config.json").write_text(json.dumps(cfg))
    (root / "empty_dir").mkdir()
    (root / "a_file.txt").write_text("not a folder")
    # Existing results every failing invocation must leave untouched.
    out = root / "results"
    assert _cli("eval", "--model", str(root / "model"), "--data", str(root / "list.txt"), "--out", str(out),
                "--views", "1x1", "--method", "none", "--workers", "0", "--quiet")[0] == 0
    return {"root": root, "model": root / "model", "list": root / "list.txt", "out": out}


_cli, _snapshot = run_cli, snapshot


# (id, argv builder, expected words in the message). Every one must exit 2 with exactly one line.
CASES = [
    ("typo-in-registry-name", lambda a: ["eval", "--model", "ViT-b", "--data", str(a["list"])], "did you mean 'ViT-B'"),
    ("corrupt-pth", lambda a: ["eval", "--model", str(a["root"] / "corrupt.pth"), "--data", str(a["list"])],
     "not a readable PyTorch checkpoint"),
    ("truncated-safetensors", lambda a: ["eval", "--model", str(a["root"] / "truncated.safetensors"), "--data",
                                         str(a["list"])], "not a readable safetensors file"),
    ("weights-do-not-fit-config", lambda a: ["eval", "--model", str(a["root"] / "mismatch"), "--data",
                                             str(a["list"])], "do not fit its config.json"),
    ("folder-without-a-model", lambda a: ["eval", "--model", str(a["root"] / "empty_dir"), "--data",
                                          str(a["list"])], "holds no model"),
    ("missing-checkpoint", lambda a: ["eval", "--model", str(a["root"] / "nope.pth"), "--data", str(a["list"])],
     "not found"),
    ("device-banana", lambda a: ["eval", "--model", str(a["model"]), "--data", str(a["list"]), "--device", "banana"],
     "is not a device"),
    ("device-cuda-without-gpu", lambda a: ["eval", "--model", str(a["model"]), "--data", str(a["list"]), "--device",
                                           "cuda"], "no CUDA GPU"),
    ("method-none-with-r", lambda a: ["eval", "--model", str(a["model"]), "--data", str(a["list"]), "--method",
                                      "none", "--r", "8"], "takes no --r"),
    ("out-is-a-file", lambda a: ["eval", "--model", str(a["model"]), "--data", str(a["list"]), "--out",
                                 str(a["root"] / "a_file.txt")], "is a file"),
    ("frames-not-in-units", lambda a: ["eval", "--model", "ViT-S", "--data", str(a["list"]), "--frames", "12",
                                       "--image-size", "64", "--r", "4"], "tubelet-frames"),
    ("r-too-large", lambda a: ["flops", "--model", "ViT-S", "--r", "500"], "too large"),
    ("flops-frames-zero", lambda a: ["flops", "--model", "ViT-S", "--frames", "0"], "positive integer"),
    ("bench-batch-size-zero", lambda a: ["bench", "--model", "ViT-S", "--batch-size", "0"], "--batch-size must be"),
    ("bench-repeats-zero", lambda a: ["bench", "--model", "ViT-S", "--repeats", "0"], "--repeats must be"),
    ("bench-device-cuda", lambda a: ["bench", "--model", "ViT-S", "--device", "cuda"], "no CUDA GPU"),
    ("visualize-o-is-a-folder", lambda a: ["visualize", str(a["root"] / "v0.mp4"), "--model", str(a["model"]), "--r",
                                           "4", "-o", str(a["root"])], "is a folder"),
    ("visualize-o-unknown-type", lambda a: ["visualize", str(a["root"] / "v0.mp4"), "--model", str(a["model"]),
                                            "--r", "4", "-o", str(a["root"] / "x.txt")], "unknown file type"),
    ("visualize-corrupt-video", lambda a: ["visualize", str(a["root"] / "corrupt.pth"), "--model", str(a["model"]),
                                           "--r", "4", "-o", str(a["root"] / "x.png")], "cannot open"),
    ("demo-out-is-a-file", lambda a: ["demo", "--out", str(a["root"] / "a_file.txt")], "is a file"),
    ("demo-zero-clips", lambda a: ["demo", "--clips", "0", "--out", str(a["root"] / "d")], "--clips must be"),
    ("non-utf8-list", lambda a: ["eval", "--model", str(a["model"]), "--data", str(a["root"] / "latin1.txt")],
     "latin1.txt:2: not UTF-8"),
    ("finetune-device", lambda a: ["finetune", "--demo", "--device", "banana", "--out", str(a["root"] / "ft")],
     "is not a device"),
    ("flops-empty-model", lambda a: ["flops", "--model", ""], "--model is empty"),
    ("bench-empty-model", lambda a: ["bench", "--model", ""], "the model is empty"),
    ("video-llm-tome", lambda a: ["bench", "--model", "LLaVA-OneVision-0.5B", "--method", "tome", "--r", "4"],
     f"use {', '.join(video_method_names())} or none"),
    ("unpatchable-similarity", lambda a: ["visualize", str(a["root"] / "v0.mp4"), "--model", str(a["model"]), "--r",
                                          "4", "--similarity", "banana", "-o", str(a["root"] / "x.png")],
     "similarity='banana' is not valid"),
]


@pytest.mark.parametrize(("name", "argv", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_invocation_is_one_line_exit_2_and_leaves_results_alone(assets, name, argv, words):
    before = _snapshot(assets["out"])
    start = time.monotonic()
    rc, _, err = _cli(*argv(assets))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("staprune "), err
    assert words in lines[0] and "Traceback" not in err
    assert _snapshot(assets["out"]) == before
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("command", ["eval", "demo", "visualize", "finetune"])
def test_read_only_output_is_one_line(assets, monkeypatch, command):
    """A read-only file system (EROFS, not only permissions) is named as such, before any work."""
    import staprune.storage.outputs as outputs

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(outputs.tempfile, "NamedTemporaryFile", read_only)
    target = assets["root"] / "ro"
    argv = {
        "eval": ["eval", "--model", str(assets["model"]), "--data", str(assets["list"]), "--out", str(target)],
        "demo": ["demo", "--out", str(target)],
        "visualize": ["visualize", str(assets["root"] / "v0.mp4"), "--model", str(assets["model"]), "--r", "4",
                      "-o", str(target / "x.png")],
        "finetune": ["finetune", "--demo", "--out", str(target)],
    }[command]
    rc, _, err = _cli(*argv)
    assert rc == 2 and "read-only" in err and len(err.strip().splitlines()) == 1, err
    assert not target.exists()


@pytest.mark.parametrize("argv", [["flops", "--model", "ViT-S", "--r", "abc"], ["eval", "--r"], ["bogus"],
                                  ["analyze", "redundancy", "--frames", "x"]])
def test_a_command_line_mistake_is_one_line(argv, capsys):
    """argparse's own errors too: one line naming the command and where its help is, exit 2."""
    from staprune.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("staprune") and "error: " in err and "--help`)" in err


def test_visualize_says_when_a_short_video_repeats_frames(assets, tmp_path):
    write_video(tmp_path / "one.mp4", torch.full((1, SIZE, SIZE, 3), 100, dtype=torch.uint8))
    rc, _, err = _cli("visualize", str(tmp_path / "one.mp4"), "--model", str(assets["model"]), "--r", "4", "-o",
                      str(tmp_path / "one.png"))
    assert rc == 0 and "gives 1 distinct frame(s) for a clip of 8" in err and (tmp_path / "one.png").is_file()
    long = torch.arange(64).view(-1, 1, 1, 1).mul(3).expand(64, SIZE, SIZE, 3).to(torch.uint8)
    write_video(tmp_path / "long.mp4", long)  # 64 frames: room for 8 at the default stride
    rc, _, err = _cli("visualize", str(tmp_path / "long.mp4"), "--model", str(assets["model"]), "--r", "4", "-o",
                      str(tmp_path / "long.png"))
    assert rc == 0 and "distinct frame" not in err, err


def test_ctrl_c_during_eval_says_how_to_resume(assets, monkeypatch, tmp_path):
    """After a finished video, Ctrl-C offers --resume; before any, it says nothing was written."""
    import staprune.runs.list_evaluation as ev

    score = ev.score_videos

    def one_video_then_interrupt(loaded, videos, *args, on_record, **kwargs):
        score(loaded, videos[:1], *args, on_record=on_record, **kwargs)
        raise KeyboardInterrupt

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    argv = ["eval", "--model", str(assets["model"]), "--data", str(assets["list"]), "--views", "1x1", "--method",
            "none", "--workers", "0", "--quiet"]
    monkeypatch.setattr(ev, "score_videos", one_video_then_interrupt)
    rc, _, err = _cli(*argv, "--out", str(tmp_path / "o"))
    assert rc == 130 and "--resume" in err and "Traceback" not in err
    monkeypatch.setattr(ev, "score_videos", interrupt)
    rc, _, err = _cli(*argv, "--out", str(tmp_path / "nothing"))
    assert rc == 130 and "nothing was written" in err and "--resume" not in err and "Traceback" not in err


def test_all_videos_failing_exits_non_zero(assets, tmp_path):
    rc, _, err = _cli("eval", "--model", str(assets["model"]), "--data", str(assets["list"]), "--root",
                      str(tmp_path / "wrong_root"), "--out", str(tmp_path / "o"), "--views", "1x1", "--method",
                      "none", "--workers", "0", "--quiet")
    assert rc == 1
    assert "0 of 4 videos scored, 4 failed" in err and "no video could be scored" in err


def test_three_column_lists_are_read(assets, tmp_path):
    rc, out, _ = _cli("eval", "--model", str(assets["model"]), "--data", str(assets["root"] / "three.txt"),
                      "--out", str(tmp_path / "o"), "--views", "1x1", "--method", "none", "--workers", "0", "--json",
                      "--quiet")
    (row,) = json.loads(out)
    assert rc == 0 and row["videos"] == 4 and row["failed"] == []


def test_long_strides_are_reported_not_silent(assets, tmp_path):
    rc, _, err = _cli("eval", "--model", str(assets["model"]), "--data", str(assets["list"]), "--out",
                      str(tmp_path / "o"), "--views", "1x1", "--method", "none", "--stride", "1000", "--workers", "0",
                      "--quiet")
    assert rc == 0 and "4 shorter than one clip (8 frames at stride 1000) repeated their last frame" in err


# What each command writes in its --out: planted as a folder written before the marker file existed.
LOOKS_LIKE = {
    "eval": lambda f: (f / "results.json").write_text("[]"),
    "demo": lambda f: (f / "results.json").write_text('{"rows": [], "verdicts": []}'),
    "ablate": lambda f: (f / "rows.jsonl").write_text('{"key": "a"}\n'),
    "finetune": lambda f: (f / "epoch_001.train.json").write_text("{}"),
}


@pytest.mark.parametrize("writer", list(LOOKS_LIKE))
def test_a_folder_of_another_command_is_refused_before_work(assets, tmp_path, writer):
    """eval, demo, ablate and finetune share file names (results.json, the plot): each refuses another's
    folder in one line, marked or (written by an older staprune) recognised by its files."""
    argv = {
        "eval": ["eval", "--model", str(assets["model"]), "--data", str(assets["list"]), "--views", "1x1"],
        "demo": ["demo", "--clips", "2"],
        "ablate": ["ablate", "--clips", "2", "--tables", "6e"],
        "finetune": ["finetune", "--demo", "--epochs", "1"],
    }
    for marked in (False, True):
        folder = tmp_path / f"marked{marked}"
        folder.mkdir()
        if marked:
            (folder / ".staprune-command").write_text(writer + "\n")
        else:
            LOOKS_LIKE[writer](folder)
        before = _snapshot(folder)
        for command, args in argv.items():
            if command == writer:
                continue
            rc, _, err = _cli(*args, "--out", str(folder))
            assert rc == 2 and len(err.strip().splitlines()) == 1, err
            assert f"holds the results of `staprune {writer}`; `staprune {command}` writes a folder of its own" in err
        assert _snapshot(folder) == before


def test_eval_marks_its_folder_and_the_demo_refuses_it(assets, tmp_path):
    out = tmp_path / "o"
    assert _cli("eval", "--model", str(assets["model"]), "--data", str(assets["list"]), "--out", str(out), "--views",
                "1x1", "--method", "none", "--workers", "0", "--quiet")[0] == 0
    assert (out / ".staprune-command").read_text() == "eval\n"
    before = _snapshot(out)
    rc, _, err = _cli("demo", "--clips", "2", "--out", str(out))
    assert rc == 2 and "holds the results of `staprune eval`" in err
    assert _snapshot(out) == before


def test_two_models_into_one_out_are_kept_apart(assets, tmp_path):
    out = tmp_path / "o"
    common = ["--data", str(assets["list"]), "--out", str(out), "--views", "1x1", "--workers", "0", "--quiet"]
    assert _cli("eval", "--model", str(assets["model"]), "--method", "none", *common)[0] == 0
    assert _cli("eval", "--model", "ViT-S", "--image-size", "64", "--frames", "8", "--method", "none", *common)[0] == 0
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 2 and len({r["model"] for r in rows}) == 2 and len({r["run_dir"] for r in rows}) == 2
    assert all((out / r["run_dir"] / "rank0.jsonl").is_file() for r in rows)
    # A later failed result of the same model and config (every video failed) does not replace the
    # complete row; it is reported instead.
    from staprune.commands.evaluate import merge_results

    good = next(r for r in rows if r["model"].startswith("hf:"))
    failed = dict(good, videos=0, top1=None, top5=None, failed=["a.mp4"])
    merged = merge_results(out / "results.json", [failed])
    assert len(merged) == 2 and next(r for r in merged if r["model"] == good["model"]) == good


def test_damaged_meta_json_names_the_file(assets, tmp_path):
    out = tmp_path / "o"
    args = ["eval", "--model", str(assets["model"]), "--data", str(assets["list"]), "--out", str(out), "--views",
            "1x1", "--method", "none", "--workers", "0", "--quiet"]
    assert _cli(*args)[0] == 0
    (meta,) = out.glob("*/none_r0/meta.json")
    meta.write_text(meta.read_text()[:20])
    rc, _, err = _cli(*args, "--resume")
    assert rc == 2 and str(meta) in err and "damaged" in err


def test_near_miss_never_waits_for_the_hub(assets):
    """With the network unreachable (no proxy, a dead endpoint), a typo fails at once with the suggestion."""
    env = dict(os.environ, HF_ENDPOINT="http://10.255.255.1:9", PYTHONPATH=str(REPO), STAPRUNE_TRACEBACK="")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "staprune", "eval", "--model", "ViT-b", "--data", str(assets["list"])],
                          env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 20
    assert done.returncode == 2 and "did you mean 'ViT-B'" in done.stderr and "Traceback" not in done.stderr
    # A hub id does need the hub: it fails in one line, quickly, whether the endpoint is unreachable
    # ("cannot be reached") or answers that there is no such model (a proxy here answers 404).
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "staprune", "eval", "--model", "someone/some-video-model", "--data",
                           str(assets["list"])], env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 30
    assert done.returncode == 2 and "'someone/some-video-model'" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_patch_without_r_and_pickling_a_patched_model(tmp_path):
    model = _tiny_vit()
    with pytest.raises(ValueError, match=r"needs r.*levels 3, 4, 5"):  # 4x4 tokens per frame: scaled levels
        staprune.patch(model)
    stock = {k: v.clone() for k, v in model.state_dict().items()}
    staprune.patch(model, r=1)
    assert model.state_dict().keys() == stock.keys()
    assert all(torch.equal(v, stock[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"unpatch.*get_config"):
        torch.save(model, tmp_path / "patched.pt")
    config = staprune.get_config(model)
    torch.save(staprune.unpatch(model), tmp_path / "stock.pt")
    restored = staprune.patch(torch.load(tmp_path / "stock.pt", weights_only=False), config=config)
    x = torch.randn(1, FRAMES, 3, SIZE, SIZE)
    staprune.patch(model, config=config)
    with torch.no_grad():
        assert torch.equal(restored(x).logits, model(x).logits)


def test_input_in_the_wrong_layout_is_named():
    model = staprune.patch(_tiny_vit(), r=1)
    with pytest.raises(ValueError, match=r"looks like \(B, 3, T, H, W\)"):
        model(torch.randn(1, 3, FRAMES, SIZE, SIZE))


# --- demo models and fine-tuned checkpoints in every command ---------------------------------------
@pytest.fixture(scope="module")
def demo_clips(tmp_path_factory) -> Path:
    """Six held-out demo clips encoded with PyAV, as a list file."""
    from staprune.demo.data import generate

    root = tmp_path_factory.mktemp("demo_clips")
    clips, labels = generate(6, seed=5)
    lines = []
    for i, (clip, label) in enumerate(zip(clips, labels, strict=True)):
        write_video(root / f"c{i}.mp4", clip.permute(0, 2, 3, 1).contiguous())
        lines.append(f"c{i}.mp4 {int(label)}")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return root / "list.txt"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["demo-vit", "demo-swin"])
def test_eval_demo_models_by_name(name, demo_clips, tmp_path):
    """No hub, no --r: the registry knows the demo models, their levels, sampling and normalisation."""
    rc, out, _ = _cli("eval", "--model", name, "--data", str(demo_clips), "--out", str(tmp_path), "--workers", "0",
                      "--json", "--quiet")
    rows = json.loads(out)
    from staprune.demo.models import LEVELS

    assert rc == 0 and [r["r"] for r in rows] == [0, *LEVELS[name]]  # dense, then the model's levels
    assert rows[0]["dense"] and not any(r["dense"] for r in rows[1:])
    assert all(r["videos"] == 6 and r["frames"] == 16 and r["views"] == "1x1" for r in rows)
    assert all(r["top1"] >= 50 for r in rows), rows  # trained models on their own kind of clips


def test_bundled_demo_weights_load_by_path():
    from staprune.api.loading import load
    from staprune.demo.models import load_demo_model, weights_path

    by_path = load(str(weights_path("demo-vit")))
    reference = load_demo_model("demo-vit")
    assert "weights of demo-vit" in by_path.source and by_path.frames == 16
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in by_path.model.state_dict().items())


@pytest.mark.slow
def test_finetuned_checkpoint_is_a_model_every_command_loads(demo_clips, tmp_path):
    from safetensors.torch import load_file

    from staprune.api.loading import load

    run = tmp_path / "ft"
    rc, _, _ = _cli("finetune", "--demo", "--model", "demo-vit", "--epochs", "1", "--train-clips", "32",
                    "--val-clips", "16", "--batch-size", "8", "--r", "8", "--out", str(run), "--quiet")
    assert rc == 0
    epoch = run / "epoch_001.safetensors"
    loaded = load(str(epoch))
    assert "fine-tuned by staprune finetune (sta r=8) from demo-vit" in loaded.source
    saved = load_file(str(epoch))
    assert all(torch.equal(v, saved[k]) for k, v in loaded.model.state_dict().items())
    assert load(str(run)).source == loaded.source  # the run folder: its last epoch
    for model in (str(epoch), str(run)):
        rc, out, err = _cli("eval", "--model", model, "--data", str(demo_clips), "--out", str(tmp_path / "ev"),
                            "--workers", "0", "--r", "8", "--json", "--quiet", *(["--resume"] if model == str(run) else []))
        assert rc == 0 and json.loads(out)[0]["videos"] == 6, err
    video = demo_clips.parent / "c0.mp4"
    assert _cli("visualize", str(video), "--model", str(epoch), "--r", "8", "-o", str(tmp_path / "kept.jpg"))[0] == 0
    assert (tmp_path / "kept.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, as its name says
    assert _cli("flops", "--model", str(epoch), "--json")[0] == 0

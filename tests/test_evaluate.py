"""``staprune eval``: metrics, failed videos, view sampling, resume after a kill, torchrun sharding.

Everything runs on a tiny random-weight VideoMAE saved to a tmp dir and ten 40-frame 80x64 clips
encoded with PyAV. Multi-process and kill tests run the CLI as subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from staprune.api.evaluation import clip_frame_indices, resolve_protocol, video_views
from staprune.cli import main
from staprune.data import Preprocessing, ViewProtocol, write_video
from staprune.families import family_named
from staprune.runs.list_evaluation import read_records
from staprune.storage.runfolder import repair_tail

NUM_VIDEOS, NUM_FRAMES, HEIGHT, WIDTH, CLASSES = 10, 40, 64, 80, 5
COMMON = ["--views", "2x2", "--frames", "8", "--stride", "2", "--batch-size", "3", "--quiet"]
REPO = Path(__file__).resolve().parents[1]


def _videos(root: Path) -> list[str]:
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(NUM_VIDEOS):
        base = torch.randint(0, 256, (1, HEIGHT, WIDTH, 3), generator=g)
        drift = torch.arange(NUM_FRAMES).view(-1, 1, 1, 1) * (i + 1)
        write_video(root / f"v{i}.mp4", ((base + drift) % 256).to(torch.uint8))
        lines.append(f"v{i}.mp4 {i % CLASSES}")
    return lines


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_assets")
    # VideoMAE's tiny model at 8 x 64², 2 blocks of width 32.
    model = tiny_model("videomae", frames=8, size=64, layers=2, hidden=32, heads=2, intermediate_size=64,
                       num_classes=CLASSES)
    with torch.no_grad():  # random init gives near-uniform outputs; spread them so predictions differ
        model.classifier.weight.mul_(20.0)
    model.save_pretrained(root / "model")
    ASSET_MODEL[:] = [root / "model"]
    lines = _videos(root)
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a real video")
    (root / "list.txt").write_text("\n".join([*lines[:4], "corrupt.mp4 1", *lines[4:], "missing.mp4 2"]) + "\n")
    (root / "good.txt").write_text("\n".join(lines) + "\n")
    (root / "short.txt").write_text("\n".join(lines[:3]) + "\n")
    return {"root": root, "model": root / "model", "list": root / "list.txt", "good": root / "good.txt",
            "short": root / "short.txt"}


@pytest.fixture(autouse=True)
def _raise_from_cli(monkeypatch):
    """These tests check the exceptions themselves; the CLI would print them as one line."""
    monkeypatch.setenv("STAPRUNE_TRACEBACK", "1")


def _eval(assets, out: Path, *extra: str, data: str = "list") -> list[dict]:
    """Run the CLI in this process, return its --json rows."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["eval", "--model", str(assets["model"]), "--data", str(assets[data]), "--out", str(out),
                   "--json", *COMMON, *extra])
    assert rc == 0
    return json.loads(buf.getvalue())


def _cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(out: Path, name: str, model: Path | None = None) -> Path:
    """The records folder of one (method, r) of the test model inside ``--out``."""
    from staprune.runs.list_evaluation import model_dirname

    return out / model_dirname(f"hf:{model or ASSET_MODEL[0]}") / name


ASSET_MODEL: list[Path] = []  # the module's model folder, set by the assets fixture


def _records(run_dir: Path) -> dict[str, dict]:
    """Full per-video records of all rank files, by path (asserting each video appears once)."""
    out: dict[str, dict] = {}
    for f in sorted(run_dir.glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            assert rec["path"] not in out, f"{rec['path']} recorded twice"
            out[rec["path"]] = rec
    return out


def _same_predictions(a: dict[str, dict], b: dict[str, dict]) -> None:
    assert a.keys() == b.keys()
    for path in a:
        assert a[path].get("error") == b[path].get("error"), path
        if a[path].get("error") is None:
            assert a[path]["top5"] == b[path]["top5"], path
            torch.testing.assert_close(torch.tensor(a[path]["scores"]), torch.tensor(b[path]["scores"]),
                                       rtol=1e-5, atol=1e-6)


def _metrics(row: dict) -> tuple:
    return row["top1"], row["top5"], row["videos"], sorted(row["failed"])


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory) -> tuple[Path, list[dict]]:
    """One uninterrupted single-process run (DataLoader with a worker), shared by the comparisons."""
    out = tmp_path_factory.mktemp("reference")
    return out, _eval(assets, out, "--method", "sta", "--r", "4", "--workers", "1")


# --- view sampling ------------------------------------------------------------------------------
VIDEOMAE = family_named("videomae")


def test_clip_indices_follow_protocol():
    vit_k400 = resolve_protocol(VIDEOMAE.protocol("k400"), None, None, None)
    assert vit_k400 == VIDEOMAE.protocol("k400")
    # 5 clips of 16 frames at stride 4 over 100 frames: span 64, slack 36, starts 0, 9, 18, 27, 36.
    clips = clip_frame_indices(vit_k400, 100)
    assert [c[0] for c in clips] == [0, 9, 18, 27, 36]
    assert clips[-1] == list(range(36, 100, 4))
    # As in the tests below: 2 clips of 8 at stride 2 over 40 frames -> starts 0 and 24.
    small = resolve_protocol(VIDEOMAE.protocol("k400"), "2x2", 8, 2)
    assert clip_frame_indices(small, 40) == [list(range(0, 16, 2)), list(range(24, 40, 2))]
    # Too short (10 frames < span 16): start 0, indices clamped to the last frame, not a failure.
    assert clip_frame_indices(small, 10) == [[0, 2, 4, 6, 8, 9, 9, 9]] * 2
    # SSV2 uses segment sampling: 2 clips take interleaved offsets inside 16 segments of 2.5 frames.
    ssv2 = resolve_protocol(VIDEOMAE.protocol("ssv2"), None, None, None)
    assert ssv2.sampling == "segment"
    # Segment j of 2.5 frames: clip 0 takes floor(2.5 j + 0.625), clip 1 floor(2.5 j + 1.875).
    seg = clip_frame_indices(ssv2, 40)
    assert [c[:4] for c in seg] == [[0, 3, 5, 8], [1, 4, 6, 9]] and seg[1][-1] == 39


def test_views_decode_the_protocol_frames(tmp_path):
    # Frame i is a flat grey of level 5*i; after identity normalisation each view's frames give i back.
    levels = torch.arange(NUM_FRAMES) * 5 + 20
    frames = levels.view(-1, 1, 1, 1).expand(NUM_FRAMES, 64, 96, 3).to(torch.uint8).contiguous()
    path = write_video(tmp_path / "ramp.mp4", frames)
    proto = ViewProtocol(clips=3, crops=2, frames=6, stride=3, sampling="uniform")
    views = video_views(path, proto, Preprocessing(size=32, mean=(0.0,) * 3, std=(1.0,) * 3))
    assert views.shape == (6, 6, 3, 32, 32)
    decoded = ((views.mean(dim=(2, 3, 4)) * 255 - 20) / 5).round().long()  # (views, frames)
    expected = torch.tensor(clip_frame_indices(proto, NUM_FRAMES)).repeat_interleave(2, dim=0)  # clip-major
    assert torch.equal(decoded, expected)


# --- metrics, failed videos ---------------------------------------------------------------------
def test_metrics_and_failed_videos(assets, reference):
    out, rows = reference
    (row,) = rows
    assert {"method", "r", "top1", "top5", "gflops", "clips_per_s", "videos", "failed"} <= row.keys()
    assert (row["method"], row["r"], row["videos"]) == ("sta", 4, NUM_VIDEOS)
    root = assets["root"]
    assert sorted(row["failed"]) == sorted([str(root / "corrupt.mp4"), str(root / "missing.mp4")])
    assert row["gflops"] > 0 and row["clips_per_s"] > 0
    records = _records(_run(out, "sta_r4"))
    assert len(records) == NUM_VIDEOS + 2
    ok = [r for r in records.values() if r.get("error") is None]
    # Metrics recomputed independently from the stored mean scores.
    top1 = sum(max(range(CLASSES), key=r["scores"].__getitem__) == r["label"] for r in ok)
    top5 = sum(r["label"] in sorted(range(CLASSES), key=r["scores"].__getitem__)[-5:] for r in ok)
    assert row["top1"] == pytest.approx(100 * top1 / len(ok))
    assert row["top5"] == pytest.approx(100 * top5 / len(ok))
    assert len({r["top5"][0] for r in ok}) > 1, "the tiny model should not predict one class for everything"
    assert (out / "results.json").is_file()


def test_scores_are_mean_softmax_over_views(assets, reference):
    """A stored score vector equals the mean over the video's views of softmax(logits), computed here
    directly with the patched model, one video at a time (the evaluator batches across videos)."""
    import staprune
    from staprune.api.loading import load

    out, _ = reference
    loaded = load(str(assets["model"]))
    staprune.patch(loaded.model, r=4, method="sta")
    proto = resolve_protocol(VIDEOMAE.protocol("k400"), "2x2", 8, 2)
    records = _records(_run(out, "sta_r4"))
    for name in ("v0.mp4", "v7.mp4"):
        path = assets["root"] / name
        views = video_views(path, proto, loaded.preprocessing)
        with torch.inference_mode():
            expected = loaded.logits(views).softmax(-1).mean(0)
        rec = records[str(path)]
        assert rec["views"] == 4
        torch.testing.assert_close(torch.tensor(rec["scores"]), expected, rtol=1e-5, atol=1e-6)


def test_sweep_writes_table_json_and_plot(assets, tmp_path, capsys):
    rc = main(["eval", "--model", str(assets["model"]), "--data", str(assets["short"]), "--out", str(tmp_path),
               "--workers", "0", "--r", "0", "6", *COMMON])
    assert rc == 0
    table = capsys.readouterr().out
    assert "method" in table and "sta" in table and len(table.strip().splitlines()) == 3
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["method"], r["r"]) for r in rows] == [("sta", 0), ("sta", 6)]
    assert rows[1]["gflops"] < rows[0]["gflops"]
    assert (tmp_path / "accuracy_vs_gflops.png").stat().st_size > 0


# --- errors before work -------------------------------------------------------------------------
def test_label_out_of_range_fails_before_work(assets, tmp_path):
    bad = tmp_path / "bad_labels.txt"
    bad.write_text(f"{assets['root'] / 'v0.mp4'} 1\n{assets['root'] / 'v1.mp4'} {CLASSES}\n")
    with pytest.raises(ValueError, match="label >= the model's 5 classes"):
        main(["eval", "--model", str(assets["model"]), "--data", str(bad), "--out", str(tmp_path / "o"),
              "--r", "4", *COMMON])
    assert not (tmp_path / "o").exists()


def test_frames_mismatch_fails_before_work(assets, tmp_path):
    """The protocol's clip length follows a model built for a fixed one (8 frames here, not the
    ViT protocol's 16); asking for another length explicitly fails before any video is read."""
    with pytest.raises(ValueError, match="pass --frames 8"):
        main(["eval", "--model", str(assets["model"]), "--data", str(assets["good"]), "--out", str(tmp_path),
              "--r", "4", "--views", "2x2", "--frames", "16", "--quiet"])
    assert not any(tmp_path.rglob("rank*.jsonl"))
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["eval", "--model", str(assets["model"]), "--data", str(assets["short"]), "--out",
                     str(tmp_path), "--views", "2x2", "--stride", "2", "--method", "none", "--workers", "0",
                     "--json", "--quiet"]) == 0
    (row,) = json.loads(buf.getvalue())
    assert row["frames"] == 8 and row["videos"] == 3


def test_existing_results_need_resume(assets, tmp_path):
    _eval(assets, tmp_path, "--method", "none", "--workers", "0", data="short")
    with pytest.raises(FileExistsError, match="--resume"):
        _eval(assets, tmp_path, "--method", "none", "--workers", "0", data="short")
    rows = _eval(assets, tmp_path, "--method", "none", "--workers", "0", "--resume", data="short")
    assert rows[0]["videos"] == 3 and rows[0]["clips_per_s"] is None  # nothing left to run
    assert len(read_records(_run(tmp_path, "none_r0"))) == 3
    with pytest.raises(ValueError, match="settings changed"):
        _eval(assets, tmp_path, "--method", "none", "--workers", "0", "--resume", data="good")


def test_torn_last_line_is_repaired(tmp_path):
    f = tmp_path / "rank0.jsonl"
    good = json.dumps({"index": 0, "path": "a.mp4", "label": 1, "top5": [1, 0], "scores": [0.2, 0.8]})
    f.write_text(good + "\n" + '{"index": 1, "path": "b.mp4", "lab')  # killed mid-write
    assert list(read_records(tmp_path)) == [0]
    repair_tail(f)
    assert f.read_text() == good + "\n"


# --- resume after a kill ------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(assets, reference, tmp_path):
    ref_out, ref_rows = reference
    cmd = [sys.executable, "-m", "staprune", "eval", "--model", str(assets["model"]), "--data", str(assets["list"]),
           "--out", str(tmp_path), "--method", "sta", "--r", "4", "--workers", "1", *COMMON]
    proc = subprocess.Popen(cmd, env=_cli_env(STAPRUNE_EVAL_SLEEP="0.4"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    jsonl = _run(tmp_path, "sta_r4") / "rank0.jsonl"
    deadline = time.monotonic() + 60
    helpers: list[int] = []
    try:
        while not (jsonl.is_file() and len(jsonl.read_text().splitlines()) >= 3):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no records written in time"
            time.sleep(0.05)
        helpers = _descendants(proc.pid)  # the forkserver and the decoding worker
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    written = len(jsonl.read_text().splitlines())
    assert 3 <= written < NUM_VIDEOS + 2, "the run was not interrupted"
    if Path("/proc").is_dir():  # nothing of the killed run lives on, holding a copy of torch
        assert helpers, "the run had no decoding worker"
        deadline = time.monotonic() + 30
        while (alive := [pid for pid in helpers if Path(f"/proc/{pid}").is_dir() and not _zombie(pid)]):
            assert time.monotonic() < deadline, f"processes of the killed run still alive: {alive}"
            time.sleep(0.2)

    rows = _eval(assets, tmp_path, "--method", "sta", "--r", "4", "--workers", "0", "--resume")
    assert _metrics(rows[0]) == _metrics(ref_rows[0])
    _same_predictions(_records(_run(tmp_path, "sta_r4")), _records(_run(ref_out, "sta_r4")))


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux: /proc's children lists); empty elsewhere."""
    found, todo = [], [pid]
    while todo:
        children = Path(f"/proc/{todo.pop()}/task")
        for task in children.glob("*/children") if children.is_dir() else []:
            for child in map(int, task.read_text().split()):
                found.append(child)
                todo.append(child)
    return found


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


# --- decoding workers after the parent decoded --------------------------------------------------
def test_workers_score_after_the_parent_decoded(assets, reference, tmp_path):
    """PyAV 18.1.1 deadlocks a worker forked from a process that had decoded (FFmpeg's slice threads
    are not inherited): a process that decodes first and then scores with two workers must finish,
    with the same predictions as the reference run."""
    ref_out, ref_rows = reference
    script = (
        "import sys\n"
        "from staprune.data import read_frames\n"
        "from staprune.cli import main\n"
        f"read_frames({str(assets['root'] / 'v0.mp4')!r}, [0, 5, 9])  # the parent decodes first\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    cmd = [sys.executable, "-c", script, "eval", "--model", str(assets["model"]), "--data", str(assets["list"]),
           "--out", str(tmp_path), "--method", "sta", "--r", "4", "--workers", "2", "--json", *COMMON]
    try:
        done = subprocess.run(cmd, env=_cli_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("scoring with workers after decoding in the parent hung (fork-unsafe decoder state)")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _metrics(json.loads(done.stdout)[0]) == _metrics(ref_rows[0])
    _same_predictions(_records(_run(tmp_path, "sta_r4")), _records(_run(ref_out, "sta_r4")))


# --- torchrun -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_two_processes_match_single(assets, reference, tmp_path):
    ref_out, ref_rows = reference
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "staprune", "eval", "--model", str(assets["model"]), "--data", str(assets["list"]),
           "--out", str(tmp_path), "--method", "sta", "--rs", "4", "--workers", "0", "--json", *COMMON]
    done = subprocess.run(cmd, env=_cli_env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)  # only rank 0 prints
    assert _metrics(rows[0]) == _metrics(ref_rows[0])
    files = sorted(p.name for p in (_run(tmp_path, "sta_r4")).glob("rank*.jsonl"))
    assert files == ["rank0.jsonl", "rank1.jsonl"]
    assert all((_run(tmp_path, "sta_r4") / f).read_text() for f in files), "both ranks did work"
    _same_predictions(_records(_run(tmp_path, "sta_r4")), _records(_run(ref_out, "sta_r4")))
    # Resuming with another world size (2 -> 1) reads both rank files and has nothing left to do.
    resumed = _eval(assets, tmp_path, "--method", "sta", "--r", "4", "--workers", "0", "--resume")
    assert _metrics(resumed[0]) == _metrics(ref_rows[0]) and resumed[0]["clips_per_s"] is None


# --- Video Swin layout --------------------------------------------------------------------------
@pytest.mark.slow
def test_swin_dense_and_pruned_evaluate(assets, tmp_path, monkeypatch, capsys):
    """A (tiny) torchvision Swin3D gets (B, 3, T, H, W) input (its family's layout), dense and pruned;
    an r its grid cannot take is refused before any video is read."""
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    from staprune.families import LoadedModel

    torch.manual_seed(0)
    swin = SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                             window_size=[2, 4, 4], num_classes=CLASSES).eval()
    fake = LoadedModel(swin, family_named("swin3d"), Preprocessing.kinetics_swin(64), CLASSES, None, None, "tiny-swin")
    monkeypatch.setattr("staprune.commands.evaluate.load", lambda *a, **k: fake)
    base = ["eval", "--model", "tiny", "--data", str(assets["good"]), "--workers", "0", "--json", *COMMON]
    assert main([*base, "--out", str(tmp_path / "dense"), "--method", "none"]) == 0
    (dense,) = json.loads(capsys.readouterr().out)
    assert dense["videos"] == NUM_VIDEOS and dense["top1"] is not None and dense["error"] is None
    assert main([*base, "--out", str(tmp_path / "sta"), "--method", "sta", "--r", "4"]) == 0
    (pruned,) = json.loads(capsys.readouterr().out)
    assert pruned["videos"] == NUM_VIDEOS and pruned["gflops"] < dense["gflops"]
    with pytest.raises(ValueError, match="too large"):  # stage 2 of a 64² clip is 8x8: r1=64 cannot drop 64
        main([*base, "--out", str(tmp_path / "big"), "--method", "sta", "--r", "4", "64"])
    assert not (tmp_path / "big").exists()

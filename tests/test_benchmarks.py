"""Benchmarks that cannot rot: every script in ``benchmarks/`` runs at its ``--smoke`` size.

``--smoke`` is each script's own code path at a tiny setting (tiny or small models, few frames,
a handful of clips or rounds, 1 thread), finishing in seconds; its header says that its numbers
are not a result. A new script in ``benchmarks/`` is picked up here automatically, so it must take
``--smoke`` and print the smoke header; scripts listed in ``EXPECTED`` must also print what they
are for.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))
TIMEOUT_S = 120  # each smoke run takes 5-20 s on a 2-core machine; the margin is for loaded CI runners
SMOKE_HEADER = "SMOKE RUN (--smoke)"

# What each script is for, as its smoke output must show it (regular expressions over stdout).
EXPECTED: dict[str, list[str]] = {
    "bench_deploy.py": [r"PyTorch STA\+int8", r"ORT STA\+int8", r"2 thread\(s\)", r"demo-vit r=\d+"],
    "bench_decode.py": [r"segments\s+\S+\s+\S+\s+\S+\s+\S+x\s+yes", r"linear\s+.*yes", r"min-max ms"],
    "bench_families.py": [r"## Part 1", r"## Part 2", r"speedup/ratio", r"min-max s",
                          r"\d+ frames: \d+ tokens, attention \d+% of dense FLOPs"],
    "bench_swin.py": [r"speedup vs stock", r"min-max s", r"\| stock torchvision \|", r"\| staprune r1=0 \|",
                      r"per-round seconds"],
    "bench_train.py": [r"STA trains \d+\.\d+x faster", r"per-round speed ratio", r"\| STA r=\d+ \| STA r=\d+ \|",
                       r"training time ratio dense/STA"],
    "bench_vit.py": [r"speedup/ratio", r"min-max s", r"selection %", r"ViT-S\s+1\s+dense"],
    "demo_score_ablation.py": [r"obj\. recall", r"STA score='temporal'", r"random"],
    "bench_video_llm.py": [r"prefill s \(min-max\)", r"LLaVA-OneVision-0.5B\s+dense", r"keep 0.15", r"TTFT"],
    "bench_video_llm_methods.py": [r"keep 0.25 fastv fastv_layer=1", r"keep 0.25 divprune", r"selection %",
                                   r"selection share, vidcom2: at most \d+\.\d+%"],
    "video_llm_similarity.py": [r"KL nats", r"qwen2_5_vl\s+0.5\s+key", r"llava_onevision\s+0.15\s+hidden"],
    "vjepa2_key_rotation.py": [r"STA, keys before rotation", r"STA, keys after rotation", r"static clips: "],
}


def test_every_script_is_found():
    assert SCRIPTS, "no scripts in benchmarks/"
    unknown = sorted(set(EXPECTED) - {p.name for p in SCRIPTS})
    assert not unknown, f"EXPECTED names scripts that are gone: {unknown}"


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_script_runs_at_smoke_size(script: Path, tmp_path: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, str(script), "--smoke"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{script.name} --smoke ran past {TIMEOUT_S} s; stdout so far:\n{err.stdout}")
    report = (f"{script.name} --smoke: exit {proc.returncode}\n--- stdout\n{proc.stdout}\n"
              f"--- stderr\n{proc.stderr[-4000:]}")
    assert proc.returncode == 0, report
    assert SMOKE_HEADER in proc.stdout, f"the output does not say it is a smoke run\n{report}"
    for pattern in EXPECTED.get(script.name, []):
        assert re.search(pattern, proc.stdout), f"missing {pattern!r}\n{report}"
    assert not list(tmp_path.iterdir()), f"{script.name} --smoke left files behind: {list(tmp_path.iterdir())}"

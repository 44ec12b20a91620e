"""Two family kinds on one core (issue 32): video classifiers and video LLMs. Every command that does
not run on a kind says so in one line (exit 2) before any work: nothing built, read or written; the
commands that run on both dispatch on the kind, and no code outside that dispatch tests a flag."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import run_cli, write_list_of_videos

import staprune.commands.ablate
import staprune.commands.finetune
import staprune.data.clips
from staprune.families import VIDEO_CLASSIFIER, VIDEO_LLM, Family, families, family_named

ROOT = Path(__file__).resolve().parents[1]


def _never(what: str):
    def started(*args, **kwargs):
        raise AssertionError(f"{what} started before the kind was checked")

    return started


@pytest.fixture
def no_work(monkeypatch):
    """Building or loading a model, making clips or decoding a video: each fails the test."""
    for family in families():
        for method in ("build", "wrap", "load_folder"):
            monkeypatch.setattr(type(family), method, _never(f"{method} of {family.name}"))
    for module in (staprune.commands.finetune, staprune.commands.ablate):
        monkeypatch.setattr(module, "generate", _never("making demo clips"))
    monkeypatch.setattr(staprune.data.clips, "read_frames", _never("decoding a video"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    lines = write_list_of_videos(root, count=1, size=64, classes=2)
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    folder = root / "tiny-qwen"  # a local Hugging Face folder of a video LLM: known by its config.json
    family_named("qwen2_5_vl").tiny_model().save_pretrained(folder)
    return {"LIST": root / "list.txt", "VIDEO": root / lines[0].split()[0], "FOLDER": folder}


# (command, argv) on a video LLM (MODEL), with LIST, VIDEO and OUT filled in.
ON_A_VIDEO_LLM = [
    ("eval", ["eval", "--model", "MODEL", "--data", "LIST", "--out", "OUT"]),
    ("ablate", ["ablate", "--model", "MODEL", "--out", "OUT", "--clips", "2"]),
    ("analyze-redundancy", ["analyze", "redundancy", "--model", "MODEL", "--demo"]),
    ("analyze-gradnorm", ["analyze", "gradnorm", "VIDEO", "--model", "MODEL", "-o", "OUT/grad.png"]),
    ("finetune", ["finetune", "--model", "MODEL", "--demo", "--out", "OUT"]),
    ("export", ["export", "--model", "MODEL", "-o", "OUT/model.onnx"]),
]
# (command, argv) on a video classifier with a video-LLM option.
ON_A_CLASSIFIER = [
    ("bench-keep", ["bench", "--model", "ViT-S", "--keep", "0.3"]),
    ("flops-keep", ["flops", "--model", "ViT-S", "--keep", "0.3"]),
    ("visualize-keep", ["visualize", "VIDEO", "--model", "ViT-S", "--keep", "0.3", "-o", "OUT/kept.png"]),
]


def _argv(argv: list[str], inputs: dict[str, Path], out: Path, model: str = "") -> list[str]:
    filled = []
    for word in argv:
        word = word.replace("MODEL", model).replace("OUT", str(out))
        filled.append(str(inputs[word]) if word in inputs else word)
    return filled


@pytest.mark.parametrize("model", ["Qwen2.5-VL-7B", "FOLDER"])
@pytest.mark.parametrize(("command", "argv"), ON_A_VIDEO_LLM, ids=[c for c, _ in ON_A_VIDEO_LLM])
def test_a_command_for_video_classifiers_refuses_a_video_llm_in_one_line(no_work, inputs, tmp_path, command, argv,
                                                                         model):
    model = str(inputs.get(model, model))
    rc, _, err = run_cli(*_argv(argv, inputs, tmp_path / "out", model))
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert re.search(rf"staprune {command.split('-')[0]} runs on video classifiers; .* is a video LLM; ", lines[0]), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("command", "argv"), ON_A_CLASSIFIER, ids=[c for c, _ in ON_A_CLASSIFIER])
def test_a_video_llm_option_on_a_video_classifier_is_one_line(inputs, tmp_path, command, argv):
    rc, _, err = run_cli(*_argv(argv, inputs, tmp_path / "out"))
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "--keep is a video-LLM budget" in lines[0] and "use --r" in lines[0], err
    assert not (tmp_path / "out").exists()


def test_every_family_is_of_one_kind_and_answers_the_core():
    kinds = {family.name: family.kind for family in families()}
    assert set(kinds.values()) == {VIDEO_CLASSIFIER, VIDEO_LLM}, kinds
    for family in families():
        for method in ("recognizes", "patch", "spec_of", "flops", "build", "tiny_model", "wrap"):  # load_folder: HF only
            assert getattr(type(family), method) is not getattr(Family, method), (family.name, method)


def test_no_code_tests_a_video_llm_flag():
    """Commands dispatch on ``family.kind``; a ``video_llm`` attribute is gone from the library."""
    hits = [f"{path.relative_to(ROOT)}:{n}" for path in sorted((ROOT / "staprune").rglob("*.py"))
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if (re.search(r"\.video_llm\b(?![._\w])", line) and not re.search(r"import|:mod:", line))
            or re.search(r"\bvideo_llm\s*[:=]", line)]
    assert not hits, hits

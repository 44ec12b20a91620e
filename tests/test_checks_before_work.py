"""What can be checked against the model is checked before any data is made or read and before any
model too large is built: a bad r / keep / frames / size is one line and exit 2, and the work it
would have started never runs (the functions that start it are replaced by ones that fail the test).
Registry models' random weights are drawn from a seed fixed by their name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_list_of_videos

import staprune
import staprune.api.evaluation
import staprune.commands.ablate
import staprune.commands.bench
import staprune.commands.finetune
import staprune.data.clips
from staprune.api import memory
from staprune.api.loading import load, registry_seed
from staprune.core.errors import UsageError


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checks_before_work")
    lines = write_list_of_videos(root, count=2, size=112, classes=5)
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return root / "list.txt"


def _never(what: str):
    def started(*args, **kwargs):
        raise AssertionError(f"{what} started before the arguments were checked")

    return started


@pytest.fixture
def no_work(monkeypatch):
    """Making demo clips, decoding a video, building a registry model or timing: each fails the test."""
    for module in (staprune.commands.finetune, staprune.commands.ablate):
        monkeypatch.setattr(module, "generate", _never("making demo clips"))
    # finetune decodes its training clips in the clip set (staprune.data.clips), eval in api.evaluation.
    for module in (staprune.data.clips, staprune.api.evaluation):
        monkeypatch.setattr(module, "read_frames", _never("decoding a video"))
    monkeypatch.setattr(staprune.commands.bench, "load", _never("building the model"))


# (id, argv with LIST for the video list, words of the one line)
CASES = [
    ("finetune-demo-r", ["finetune", "--demo", "--model", "demo-vit", "--r", "999", "--epochs", "1"],
     "r=999 is too large for this input"),
    ("finetune-demo-eval-r", ["finetune", "--demo", "--model", "demo-vit", "--r", "8", "--eval-r", "0", "999"],
     "r=999 is too large for this input"),
    ("finetune-list-r", ["finetune", "--model", "demo-vit", "--data", "LIST", "--r", "999"],
     "r=999 is too large for this input"),
    ("finetune-schedule", ["finetune", "--demo", "--model", "demo-vit", "--schedule", "8x60,4x8,2x8"], "too large"),
    ("ablate-demo-r", ["ablate", "--model", "demo-vit", "--r", "999", "--clips", "4"], "r=999 is too large"),
    ("ablate-list-r", ["ablate", "--model", "demo-vit", "--data", "LIST", "--r", "999"], "r=999 is too large"),
    ("eval-r", ["eval", "--model", "demo-vit", "--data", "LIST", "--r", "4", "999"], "r=999 is too large"),
    ("eval-frames", ["eval", "--model", "demo-vit", "--data", "LIST", "--frames", "1"], "16x112x112 clips only"),
    ("bench-r-huge-model", ["bench", "--model", "VJEPA2-g-fpc64", "--r", "9999"], "The largest valid r for 32x256"),
    ("bench-one-frame", ["bench", "--model", "ViT-S", "--frames", "1"], "not a multiple of 2; use 2 frames"),
    ("bench-size", ["bench", "--model", "ViT-S", "--size", "100"], "not a multiple of this model's 16-pixel patches; use 96 or 112"),
    ("bench-keep-empties-a-unit", ["bench", "--model", "Qwen2.5-VL-7B", "--keep", "0.001"], "keeps no token"),
    ("bench-keep-above-one", ["bench", "--model", "Qwen2.5-VL-3B", "--keep", "1.5"], "must be in (0, 1]"),
    ("bench-keep-on-a-classifier", ["bench", "--model", "VJEPA2-g-fpc64", "--keep", "0.5"], "use --r"),
    ("bench-r-empties-a-video-unit", ["bench", "--model", "LLaVA-OneVision-7B", "--r", "500"], "drops every token"),
]


@pytest.mark.parametrize(("argv", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_arguments_fail_before_any_work(videos, tmp_path, no_work, argv, words):
    argv = [str(videos) if a == "LIST" else a for a in argv]
    out = [] if argv[0] == "bench" else ["--out", str(tmp_path / "out")]
    rc, _, err = run_cli(*argv, *out)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and words in lines[0], err
    assert not list(tmp_path.glob("out/**/*.jsonl")) and not list(tmp_path.glob("out/*.safetensors"))


# --- models too large for the machine ------------------------------------------------------------
def test_a_model_too_large_is_refused_before_it_is_built(monkeypatch):
    """20 GB free: Qwen2.5-VL-7B's fp32 weights (33 GB) do not fit; bf16 (16.6 GB) and the 3B model do."""
    monkeypatch.setattr(memory, "available_bytes", lambda: 20 * 10**9)
    from staprune.families import Family

    monkeypatch.setattr(Family, "wrap", _never("building the model"))  # only the meta-device count may run
    rc, _, err = run_cli("bench", "--model", "Qwen2.5-VL-7B", "--frames", "2", "--size", "56")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "Qwen2.5-VL-7B has 8.29 B parameters: its fp32 weights alone take 33.2 GB" in err
    assert "use --dtype bf16 (16.6 GB) or a smaller model (Qwen2.5-VL-3B)" in err


def test_the_memory_check_offers_only_what_fits():
    tiny = lambda: [("small", 10**9), ("medium", 4 * 10**9)]  # noqa: E731
    memory.check_weights_fit("m", 2 * 10**9, torch.float32, tiny, available=10 * 10**9)  # 8 GB of 8.5: fits
    with pytest.raises(UsageError, match=r"--dtype bf16 \(8.0 GB\) or a smaller model \(small\)$"):
        memory.check_weights_fit("m", 4 * 10**9, torch.float32, tiny, available=12 * 10**9)
    with pytest.raises(UsageError, match=r"its bf16 weights .* use a smaller model \(small\)$"):
        memory.check_weights_fit("m", 4 * 10**9, torch.bfloat16, tiny, available=4 * 10**9)
    with pytest.raises(UsageError, match=r"fp32 weights .* use a smaller model \(small\)$"):  # no --dtype to offer
        memory.check_weights_fit("m", 4 * 10**9, torch.float32, tiny, available=12 * 10**9, offer_dtype=False)
    with pytest.raises(UsageError, match="use a machine with more memory"):
        memory.check_weights_fit("m", 4 * 10**9, torch.float32, lambda: [], available=10**9)


def test_parameters_are_counted_without_memory():
    from staprune.families import family_of_entry, model_entry

    entry = model_entry("Qwen2.5-VL-7B")
    family = family_of_entry(entry)
    assert memory.parameter_count(lambda: family.build(entry.spec_for())) == 8_292_166_656


# --- registry models: the same random weights every run --------------------------------------------
def test_registry_weights_are_fixed_by_the_name():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, again = load("ViT-S", frames=4, image_size=32), load("ViT-S", frames=4, image_size=32)
    assert torch.equal(torch.get_rng_state(), state), "loading must not move the caller's RNG"
    assert first.digest() == again.digest()
    other = load("ViT-B", frames=4, image_size=32)
    assert registry_seed("ViT-S") != registry_seed("ViT-B") and other.digest() != first.digest()


def test_registry_models_build_in_the_requested_dtype():
    loaded = load("VideoSwin-T", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32


# --- commands that need no weights read none ---------------------------------------------------------
@pytest.mark.parametrize("build", ["tiny_videomae", "tiny_vivit"])
def test_flops_of_a_folder_reads_its_config_only(build, tmp_path):
    """The geometry of a HF folder comes from its config on the meta device: the same spec as the
    loaded model's, with the weights file gone."""
    import conftest

    from staprune.api.flops import resolve_spec
    from staprune.families import family_of

    conftest.__dict__[build]().save_pretrained(tmp_path)
    loaded = load(str(tmp_path))
    expected = family_of(loaded.model).spec_of(loaded.model)
    for weights in tmp_path.glob("*.safetensors"):
        weights.unlink()
    assert resolve_spec(str(tmp_path)) == expected
    rc, out, err = run_cli("flops", "--model", str(tmp_path), "--r", "4", "--json")
    assert rc == 0, err


@pytest.mark.parametrize("name", ["ViT-B", "VideoSwin-T", "TimeSformer-B"])
def test_a_registry_model_on_another_clip_takes_levels_that_fit_it(name):
    """A paper's levels are for the paper's clip: at 112² the family's own, scaled to the grid."""
    from staprune.families import family_of_spec, levels_of, model_entry

    entry = model_entry(name)
    small = entry.spec_for(None, 112)
    family = family_of_spec(small)
    assert levels_of(name, small) == family.levels(small)
    for r in levels_of(name, small):
        family.plan(small, staprune.STAConfig(r=r))  # every level fits the smaller clip
    if entry.levels:
        assert levels_of(name, entry.spec) == entry.levels
    rc, _, err = run_cli("flops", "--model", name, "--size", "112")
    assert rc == 0, err

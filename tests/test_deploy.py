"""Deployment (issue 25): the pruning travels with the weights, ``staprune export`` writes a verified
ONNX model (and, ``--onnx-int8``, ONNX Runtime's int8), and ``--int8`` runs STA with PyTorch's dynamic int8."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import clips, run_cli, tiny_videomae, tiny_vivit

import staprune
from staprune.api.deploy import quantize_int8


@pytest.mark.parametrize("build", [tiny_videomae, tiny_vivit])
def test_save_pretrained_records_the_pruning_and_load_restores_it(build, tmp_path):
    import transformers

    model = build()
    x = clips(2)
    with torch.no_grad():
        dense = model(x).logits
    staprune.patch(model, r=8, similarity="hidden", order="FFF")
    with torch.no_grad():
        pruned = model(x).logits
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["staprune"]["r"] == 8

    loaded = staprune.load(str(tmp_path))
    assert staprune.get_config(loaded.model) == staprune.get_config(model)
    assert loaded.default_levels() == (8,) and "restored: sta r=8" in loaded.source
    with torch.no_grad():
        assert torch.equal(loaded.model(x).logits, pruned)

    stock = type(model).from_pretrained(tmp_path)  # stock transformers: the dense model, no error
    assert isinstance(stock, transformers.PreTrainedModel) and staprune.get_config(stock) is None
    with torch.no_grad():
        torch.testing.assert_close(stock(x).logits, dense)


def test_an_unpatched_model_saves_no_pruning(tmp_path):
    model = tiny_videomae()
    staprune.patch(model, r=8)
    staprune.unpatch(model)
    model.save_pretrained(tmp_path)
    assert "staprune" not in json.loads((tmp_path / "config.json").read_text())
    assert staprune.get_config(staprune.load(str(tmp_path)).model) is None


def test_a_damaged_pruning_record_is_one_clear_error(tmp_path):
    tiny_videomae().save_pretrained(tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    doc["staprune"] = {"r": 8, "speed": "fast"}
    (tmp_path / "config.json").write_text(json.dumps(doc))
    rc, _, err = run_cli("bench", "--model", str(tmp_path), "--repeats", "1")
    assert rc == 2 and "'staprune' entry" in err and "remove the entry" in err


def test_int8_keeps_the_pruning():
    model = tiny_videomae()
    staprune.patch(model, r=8)
    config = staprune.get_config(model)
    quantize_int8(model)
    assert staprune.get_config(model) == config
    assert type(model.videomae.encoder.layer[0].attention.attention.query).__name__ == "Linear"  # the dynamic one
    assert "quantized" in type(model.videomae.encoder.layer[0].attention.attention.query).__module__
    with torch.no_grad():
        model(clips(2))
    assert staprune.kept_tokens(model)[0].shape[1] == 8 * (196 // 4 - 8)  # 112²: 49 tokens per frame


@pytest.mark.slow
def test_export_writes_verified_onnx_and_int8_for_a_saved_folder_and_demo_vit(tmp_path):
    folder = tmp_path / "tiny"
    tiny_videomae(layers=3).save_pretrained(folder)
    for model, r in ((str(folder), "8"), ("demo-vit", None)):
        output = tmp_path / f"{folder.name if model != 'demo-vit' else 'demo'}.onnx"
        argv = ["export", "--model", model, "-o", str(output), "--onnx-int8"] + (["--r", r] if r else [])
        rc, out, err = run_cli(*argv)
        assert rc == 0, err
        assert output.is_file() and output.with_name(output.stem + ".int8.onnx").is_file()
        difference = float(out.split("max |logit difference| = ")[1].split()[0])
        assert difference < 1e-4
        assert "int8 vs PyTorch fp32" in out and "top-1 agrees on" in out
    rc, _, err = run_cli("export", "--model", "demo-vit", "-o", str(tmp_path / "demo.onnx"))
    assert rc == 2 and "already exists" in err  # nothing replaced without --force


@pytest.mark.slow
def test_export_publishes_whole_files_under_the_folder_lock(tmp_path):
    """A missing folder is made before the export; the model appears only whole (no staging left);
    --force without --onnx-int8 drops the older int8 model; a second export into a folder being
    written stops at once."""
    from staprune.storage.runfolder import RunLock

    folder = tmp_path / "tiny"
    tiny_videomae(layers=3).save_pretrained(folder)
    output = tmp_path / "new" / "deeper" / "m.onnx"
    rc, _, err = run_cli("export", "--model", str(folder), "--r", "8", "-o", str(output), "--onnx-int8")
    assert rc == 0, err
    int8 = output.with_name("m.int8.onnx")
    assert sorted(p.name for p in output.parent.iterdir()) == [".staprune.lock", "m.int8.onnx", "m.onnx"]
    first = output.read_bytes()
    rc, _, err = run_cli("export", "--model", str(folder), "--r", "4", "-o", str(output), "--force")
    assert rc == 0, err
    assert output.read_bytes() != first and not int8.exists(), "--force replaces the model and its int8"
    with RunLock(output.parent, "the folder of -o"):
        rc, _, err = run_cli("export", "--model", str(folder), "--r", "8", "-o", str(output.with_name("o.onnx")))
    assert rc == 2 and "is being written by another staprune run" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in output.parent.iterdir()) == [".staprune.lock", "m.onnx"]


def test_export_refuses_what_it_cannot_export(tmp_path):
    rc, _, err = run_cli("export", "--model", "LLaVA-OneVision-0.5B", "-o", str(tmp_path / "m.onnx"))
    assert rc == 2 and "serving stack" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli("export", "--model", "demo-vit", "-o", str(tmp_path / "m.txt"))
    assert rc == 2 and ".onnx" in err


def test_bench_times_sta_with_int8(tmp_path):
    rc, out, err = run_cli("bench", "--model", "demo-vit", "--int8", "--r", "12", "--repeats", "1",
                           "--warmup", "0", "--json")
    assert rc == 0, err
    rows = json.loads(out)
    assert [row["config"] for row in rows] == ["dense", "sta r=12"] and rows[0]["model"] == "demo-vit int8"
    rc, _, err = run_cli("bench", "--model", "demo-vit", "--int8", "--dtype", "bf16")
    assert rc == 2 and "--int8 is PyTorch's dynamic int8" in err


@pytest.mark.parametrize(("argv", "new"), [
    (["bench", "--model", "demo-vit", "--quantize", "int8"], "--quantize is now --int8"),
    (["eval", "--model", "demo-vit", "--data", "list.txt", "--quantize", "int8"], "--quantize is now --int8"),
    (["export", "--model", "demo-vit", "-o", "OUT", "--quantize", "int8"], "--quantize is now --onnx-int8"),
    (["export", "--model", "demo-vit", "-o", "OUT", "--quantize"], "--quantize is now --onnx-int8"),
    (["export", "--model", "demo-vit", "-o", "OUT", "--int8"], "export writes ONNX Runtime's int8 with --onnx-int8"),
])
def test_the_two_int8s_have_names_of_their_own_and_the_old_spelling_names_the_new(argv, new, tmp_path, capsys):
    """``--quantize int8`` meant PyTorch's int8 in bench and eval and ONNX Runtime's in export: each now
    has its own flag, and the old spelling is one line naming it, exit 2, before any work."""
    from staprune.cli import main

    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "m.onnx") if a == "OUT" else a for a in argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and new in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_eval_with_int8_is_its_own_result(tmp_path):
    from staprune.data import write_video
    from staprune.demo.data import generate

    clips_, labels = generate(4, seed=5)
    (tmp_path / "clips").mkdir()
    lines = []
    for i, (clip, label) in enumerate(zip(clips_, labels, strict=True)):
        write_video(tmp_path / "clips" / f"c{i}.mp4", clip.permute(0, 2, 3, 1).contiguous())
        lines.append(f"c{i}.mp4 {int(label)}")
    data = tmp_path / "clips" / "list.txt"
    data.write_text("\n".join(lines) + "\n")
    common = ["eval", "--model", "demo-vit", "--data", str(data), "--r", "12", "--workers", "0", "--json", "--quiet",
              "--out", str(tmp_path / "out")]
    rc, out, err = run_cli(*common)
    assert rc == 0, err
    rc, out_int8, err = run_cli(*common, "--int8")
    assert rc == 0, err
    (row,), (row_int8,) = json.loads(out), json.loads(out_int8)
    assert row_int8["videos"] == row["videos"] == 4 and "int8" in row_int8["model"]
    assert len(list((tmp_path / "out").iterdir())) >= 2  # two model folders: results never mix

"""Model loading for evaluation: VideoMAE release .pth, HF directories (q_bias/v_bias), torchvision
Swin3D files, and loud failures on missing / unexpected weights."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from staprune.checkpoints import CheckpointError, load, load_hf, read_state_dict
from staprune.families.videomae import load_videomae_release, map_qv_bias


def _hf_model(hidden: int = 32, heads: int = 2, layers: int = 2, mean_pooling: bool = True, seed: int = 0,
              release_eps: bool = True):
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    torch.manual_seed(seed)
    cfg = VideoMAEConfig(image_size=64, num_frames=8, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, intermediate_size=2 * hidden, num_labels=5,
                         layer_norm_eps=1e-6, use_mean_pooling=mean_pooling)
    model = VideoMAEForVideoClassification(cfg).eval()
    with torch.no_grad():  # biases start at zero; make every tensor distinctive so a mix-up shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    if release_eps and model.fc_norm is not None:
        model.fc_norm.eps = 1e-6  # the release code's LayerNorm eps everywhere (HF: 1e-5 for fc_norm)
    return model


def _release_state(model) -> dict[str, torch.Tensor]:
    """The inverse of the conversion: HF VideoMAE -> original VideoMAE release key layout."""
    sd = model.state_dict()
    out = {"patch_embed.proj.weight": sd["videomae.embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["videomae.embeddings.patch_embeddings.projection.bias"],
           "head.weight": sd["classifier.weight"], "head.bias": sd["classifier.bias"]}
    for kind in ("weight", "bias"):
        if f"fc_norm.{kind}" in sd:
            out[f"fc_norm.{kind}"] = sd[f"fc_norm.{kind}"]
        if f"videomae.layernorm.{kind}" in sd:
            out[f"norm.{kind}"] = sd[f"videomae.layernorm.{kind}"]
    for i in range(model.config.num_hidden_layers):
        hf, rel = f"videomae.encoder.layer.{i}.", f"blocks.{i}."
        att = hf + "attention.attention."
        out[rel + "attn.qkv.weight"] = torch.cat([sd[att + n + ".weight"] for n in ("query", "key", "value")])
        out[rel + "attn.q_bias"], out[rel + "attn.v_bias"] = sd[att + "query.bias"], sd[att + "value.bias"]
        for src, dst in (("attention.output.dense", "attn.proj"), ("layernorm_before", "norm1"),
                         ("layernorm_after", "norm2"), ("intermediate.dense", "mlp.fc1"),
                         ("output.dense", "mlp.fc2")):
            for kind in ("weight", "bias"):
                out[f"{rel}{dst}.{kind}"] = sd[f"{hf}{src}.{kind}"]
    return {k: v.clone() for k, v in out.items()}


def _clip(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 8, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _logits(model, x=None):
    with torch.inference_mode():
        return model(_clip() if x is None else x).logits


# --- VideoMAE release format --------------------------------------------------------------------
@pytest.mark.parametrize("mean_pooling", [True, False])
def test_release_checkpoint_gives_identical_logits(tmp_path, mean_pooling):
    model = _hf_model(mean_pooling=mean_pooling)
    path = tmp_path / "checkpoint.pth"
    # As the release files: nested under "model", with DDP prefixes and the training args alongside.
    wrapped = {f"module.{k}": v for k, v in _release_state(model).items()}
    torch.save({"model": wrapped, "args": argparse.Namespace(lr=1e-3), "epoch": 3}, path)
    loaded = load_videomae_release(path, num_frames=8, image_size=64, num_heads=2)
    assert loaded.family.name == "videomae" and loaded.num_classes == 5 and loaded.frames == 8
    assert loaded.model.config.use_mean_pooling is mean_pooling
    assert torch.equal(_logits(loaded.model), _logits(model))


def test_release_checkpoint_through_dispatch_infers_heads(tmp_path):
    model = _hf_model(hidden=64, heads=1)  # head dim 64: the default rule for unknown widths
    path = tmp_path / "vit_tiny.pth"
    torch.save(_release_state(model), path)
    loaded = load(str(path), frames=8, image_size=64)
    assert loaded.model.config.num_attention_heads == 1
    assert torch.equal(_logits(loaded.model), _logits(model))
    assert loaded.preprocessing.size == 64


def test_release_missing_and_unexpected_keys_fail_loudly(tmp_path):
    state = _release_state(_hf_model())
    missing = dict(state)
    del missing["blocks.1.mlp.fc2.bias"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=re.escape("missing weight(s): videomae.encoder.layer.1.output.dense.bias")):
        load_videomae_release(tmp_path / "missing.pth", num_frames=8, image_size=64, num_heads=2)

    extra = dict(state, **{"blocks.0.gamma_1": torch.ones(32)})  # layer scale: HF VideoMAE has none
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=re.escape("unexpected weight(s): blocks.0.gamma_1")):
        load_videomae_release(tmp_path / "extra.pth", num_frames=8, image_size=64, num_heads=2)

    no_head = {k: v for k, v in state.items() if not k.startswith("head.")}
    torch.save(no_head, tmp_path / "pretrain.pth")
    with pytest.raises(CheckpointError, match="pre-training checkpoint"):
        load_videomae_release(tmp_path / "pretrain.pth", num_frames=8, image_size=64, num_heads=2)


def test_missing_checkpoint_path_is_a_clear_error(tmp_path):
    for spec in (str(tmp_path / "nope.pth"), str(tmp_path / "dir" / "model")):
        with pytest.raises(FileNotFoundError, match="checkpoint not found"):
            load(spec)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load("swin3d_t", weights=tmp_path / "absent.pth")


# --- HF directories -----------------------------------------------------------------------------
def _save_hf_with_state(model, folder, state) -> None:
    from safetensors.torch import save_file

    model.save_pretrained(folder)
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))


def test_hf_dir_with_q_v_bias_names_loads_biases(tmp_path, monkeypatch):
    from transformers import VideoMAEForVideoClassification

    model = _hf_model(release_eps=False)
    legacy = {re.sub(r"\.(query|value)\.bias$", lambda m: f".{m.group(1)[0]}_bias", k): v
              for k, v in model.state_dict().items()}
    assert sum(k.endswith(("q_bias", "v_bias")) for k in legacy) == 4
    _save_hf_with_state(model, tmp_path, legacy)
    assert map_qv_bias(legacy)[0].keys() == model.state_dict().keys()

    # Simulate a transformers release that ignores q_bias/v_bias (leaves the biases at zero).
    original = VideoMAEForVideoClassification.from_pretrained.__func__

    def forgetful(cls, *args, **kwargs):
        m = original(cls, *args, **kwargs)
        with torch.no_grad():
            for layer in m.videomae.encoder.layer:
                layer.attention.attention.query.bias.zero_()
                layer.attention.attention.value.bias.zero_()
        return m

    monkeypatch.setattr(VideoMAEForVideoClassification, "from_pretrained", classmethod(forgetful))
    loaded = load_hf(str(tmp_path))
    assert torch.equal(_logits(loaded.model), _logits(model))


def test_hf_dir_unexpected_weight_fails(tmp_path):
    model = _hf_model()
    _save_hf_with_state(model, tmp_path, dict(model.state_dict(), **{"extra.proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=re.escape("unexpected weight(s): extra.proj.weight")):
        load(str(tmp_path))


def test_hf_dir_preprocessor_config(tmp_path):
    import json

    model = _hf_model(release_eps=False)
    model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 64, "width": 64}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    loaded = load(str(tmp_path))
    assert (loaded.preprocessing.size, loaded.preprocessing.mean) == (64, (0.5, 0.5, 0.5))
    assert torch.equal(_logits(loaded.model), _logits(model))


# --- torchvision Swin3D -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def swin_file(tmp_path_factory):
    from torchvision.models.video import swin3d_t

    torch.manual_seed(0)
    model = swin3d_t(num_classes=7).eval()
    path = tmp_path_factory.mktemp("swin") / "swin_t.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    return model, path


@pytest.mark.slow
def test_swin_from_local_weights(swin_file, tmp_path):
    model, path = swin_file
    x = torch.randn(1, 8, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # (B, T, 3, H, W)
    loaded = load(f"swin3d_t:{path}")
    assert loaded.family.name == "swin3d" and loaded.num_classes == 7 and loaded.frames is None
    with torch.inference_mode():
        assert torch.equal(loaded.logits(x), model(x.transpose(1, 2)))
    # A bare state-dict file: the variant is read off the shapes.
    assert load(str(path)).source.startswith("torchvision:swin3d_t:")

    state = read_state_dict(path)
    state.pop("head.bias")
    torch.save(state, tmp_path / "headless.pth")
    with pytest.raises(CheckpointError, match=re.escape("missing weight(s): head.bias")):
        load("swin3d_t", weights=str(tmp_path / "headless.pth"))

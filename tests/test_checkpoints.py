"""Model loading for evaluation: VideoMAE release .pth, HF directories (q_bias/v_bias), torchvision
Swin3D files, and loud failures on missing / unexpected weights."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from staprune.api.loading import load, load_hf
from staprune.core.errors import CheckpointError
from staprune.families.videomae import load_videomae_release, map_qv_bias
from staprune.storage.state_dicts import read_state_dict


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


# --- VideoMAE V2 release layout -----------------------------------------------------------------
def _sinusoid_table(n: int, dim: int) -> torch.Tensor:
    """The release code's fixed position table: sin on even channels, cos on odd, 10000^(2(i//2)/d)."""
    position = torch.arange(n, dtype=torch.float64)[:, None]
    channel = torch.arange(dim)[None, :]
    angle = position / torch.pow(torch.tensor(10000.0, dtype=torch.float64), 2 * (channel // 2) / dim)
    return torch.where(channel % 2 == 0, torch.sin(angle), torch.cos(angle)).float()[None]


def _release_forward(state: dict, x: torch.Tensor, heads: int, eps: float = 1e-6) -> torch.Tensor:
    """The original VideoMAE / VideoMAE V2 fine-tuning model's forward, written from its layout:
    Conv3d tubelets + sinusoid table, pre-norm blocks with qkv bias (q_bias, 0, v_bias), mean
    pooling, fc_norm, head."""
    import torch.nn.functional as F

    weight = state["patch_embed.proj.weight"]
    tubelet, patch = weight.shape[2], weight.shape[3]
    h = F.conv3d(x.transpose(1, 2), weight, state["patch_embed.proj.bias"], stride=(tubelet, patch, patch))
    h = h.flatten(2).transpose(1, 2)
    bsz, length, c = h.shape
    h = h + _sinusoid_table(length, c)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        y = F.layer_norm(h, (c,), state[b + "norm1.weight"], state[b + "norm1.bias"], eps)
        bias = torch.cat([state[b + "attn.q_bias"], torch.zeros_like(state[b + "attn.q_bias"]), state[b + "attn.v_bias"]])
        q, k, v = F.linear(y, state[b + "attn.qkv.weight"], bias).reshape(bsz, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
        attn = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(bsz, length, c)
        h = h + F.linear(y, state[b + "attn.proj.weight"], state[b + "attn.proj.bias"])
        y = F.layer_norm(h, (c,), state[b + "norm2.weight"], state[b + "norm2.bias"], eps)
        y = F.linear(F.gelu(F.linear(y, state[b + "mlp.fc1.weight"], state[b + "mlp.fc1.bias"])),
                     state[b + "mlp.fc2.weight"], state[b + "mlp.fc2.bias"])
        h = h + y
    pooled = F.layer_norm(h.mean(1), (c,), state["fc_norm.weight"], state["fc_norm.bias"], eps)
    return F.linear(pooled, state["head.weight"], state["head.bias"])


def _v2_state(hidden: int = 128, depth: int = 3, mlp: int = 560, patch: int = 14, classes: int = 7,
              seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A VideoMAE V2-layout fine-tuned state dict (ViT-g/14's layout at another size): random
    weights, every bias non-zero (q/v biases included)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05):
        if device == "meta":
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=g) * scale

    state = {"patch_embed.proj.weight": rnd(hidden, 3, 2, patch, patch, scale=0.2),
             "patch_embed.proj.bias": rnd(hidden), "fc_norm.weight": 1 + rnd(hidden), "fc_norm.bias": rnd(hidden),
             "head.weight": rnd(classes, hidden, scale=0.5), "head.bias": rnd(classes)}
    for i in range(depth):
        b = f"blocks.{i}."
        state.update({
            b + "norm1.weight": 1 + rnd(hidden), b + "norm1.bias": rnd(hidden),
            b + "attn.qkv.weight": rnd(3 * hidden, hidden, scale=0.2), b + "attn.q_bias": rnd(hidden, scale=0.3),
            b + "attn.v_bias": rnd(hidden, scale=0.3), b + "attn.proj.weight": rnd(hidden, hidden),
            b + "attn.proj.bias": rnd(hidden), b + "norm2.weight": 1 + rnd(hidden), b + "norm2.bias": rnd(hidden),
            b + "mlp.fc1.weight": rnd(mlp, hidden), b + "mlp.fc1.bias": rnd(mlp),
            b + "mlp.fc2.weight": rnd(hidden, mlp), b + "mlp.fc2.bias": rnd(hidden),
        })
    return state


def test_videomae_v2_release_checkpoint_matches_the_reference_forward(tmp_path):
    import staprune

    state = _v2_state()
    assert all(bool(v.ne(0).any()) for k, v in state.items() if k.endswith(("q_bias", "v_bias")))
    path = tmp_path / "vit_g_hybrid_pt_1200e_k710_ft.pth"
    torch.save({"module": {f"module.{k}": v for k, v in state.items()}}, path)  # DeepSpeed-style nesting
    loaded = load(str(path), frames=16, image_size=112)  # dispatch: the VideoMAE family claims the layout
    cfg = loaded.model.config
    assert (cfg.patch_size, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (14, 128, 2, 560)
    x = torch.randn(2, 16, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours = loaded.model(x).logits
        reference = _release_forward(state, x, heads=2)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)
    # Patch 14 at 112²: 8x8 tokens per tubelet-frame; the model prunes at its own levels.
    spec = loaded.family.spec_of(loaded.model)
    assert (spec.patch, spec.tokens_per_frame) == (14, 64)
    staprune.patch(loaded.model, r=loaded.default_levels()[0])
    with torch.inference_mode():
        loaded.model(x)
    assert staprune.kept_tokens(loaded.model)[0].shape == (2, 8 * (64 - loaded.default_levels()[0]))


def test_videomae_v2_g_geometry_is_read_from_the_shapes():
    """ViT-g/14's shapes (no weights allocated): 1408 wide, 40 blocks, MLP 6144, 16 heads, patch 14,
    so 16x16 tokens per frame at 224², as the VideoMAEv2-g registry entry."""
    from staprune.families import model_entry
    from staprune.families.videomae import videomae_release_config

    cfg = videomae_release_config(_v2_state(hidden=1408, depth=40, mlp=6144, classes=710, device="meta"))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (1408, 40, 16, 6144)
    assert (cfg.patch_size, cfg.image_size // cfg.patch_size, cfg.num_labels) == (14, 16, 710)
    entry = model_entry("VideoMAEv2-g").spec
    assert (entry.hidden, entry.layers, entry.heads, entry.mlp_hidden, entry.patch) == (1408, 40, 16, 6144, 14)
    assert entry.tokens_per_frame == 256

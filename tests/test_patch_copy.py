"""``copy.deepcopy`` of a patched model (EMA weights, benchmark copies) is an independent patched model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import classifier_family_names, clips

import staprune
from staprune.families import family_named


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


# Per family: the clip length and r of the check (Swin reads any clip; its r1 counts stage-2 tokens).
SETTINGS = {"videomae": (16, 8), "swin3d": (16, 64), "vivit": (16, 8), "vjepa2": (16, 8), "timesformer": (8, 8)}


@pytest.mark.parametrize("family", classifier_family_names())
def test_deepcopy_of_patched_model_uses_its_own_weights_and_state(family) -> None:
    owner = family_named(family)
    frames, r = SETTINGS[family]
    build, x = owner.tiny_model, owner.to_input(clips(batch=2, frames=frames))
    base = build()
    halved = copy.deepcopy(base)
    with torch.no_grad():
        for p in halved.parameters():
            p.mul_(0.5)
    reference = staprune.patch(halved, r=r)

    original = staprune.patch(build(), r=r)
    expected_original = _logits(original, x)
    kept_before = staprune.kept_tokens(original)
    clone = copy.deepcopy(original)
    with pytest.raises(ValueError, match="no forward pass"):
        staprune.kept_tokens(clone)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(0.5)

    assert staprune.get_config(clone) == staprune.get_config(original)
    assert torch.allclose(_logits(clone, x), _logits(reference, x), atol=1e-6)
    # The clone's forward records its own kept tokens, not the original's.
    assert [k.shape for k in staprune.kept_tokens(clone)] == [k.shape for k in staprune.kept_tokens(reference)]
    assert all(map(torch.equal, staprune.kept_tokens(original), kept_before))
    assert torch.equal(_logits(original, x), expected_original)
    # Unpatching the clone leaves the original patched and vice versa.
    staprune.unpatch(clone)
    assert staprune.get_config(original) is not None

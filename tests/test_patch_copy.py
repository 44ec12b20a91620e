"""``copy.deepcopy`` of a patched model (EMA weights, benchmark copies) is an independent patched model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import clips, tiny_swin, tiny_videomae

import staprune


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


@pytest.mark.parametrize(
    ("build", "x", "r"),
    [
        (tiny_videomae, clips(batch=2), 8),
        (tiny_swin, clips(batch=2).transpose(1, 2), 64),
    ],
    ids=["videomae", "swin3d"],
)
def test_deepcopy_of_patched_model_uses_its_own_weights_and_state(build, x, r) -> None:
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

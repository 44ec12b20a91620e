"""Deployment (issue 25): every patched video family exports and compiles with the stock calls, at a
fixed clip shape with a dynamic batch axis, with no workaround and no eager warm-up; the exported
graph computes the kept set itself, so it matches PyTorch on clips that are not the export example."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_swin, tiny_timesformer, tiny_videomae, tiny_vivit, tiny_vjepa2

import staprune
from staprune.families import family_of

# Three blocks (every pruning location still distinct); Swin on an 8 x 112² clip (its default is 32 x 224²).
FAMILIES = {"videomae": (lambda: tiny_videomae(layers=3), {}), "swin3d": (tiny_swin, {"frames": 8, "size": 112}),
            "vivit": (lambda: tiny_vivit(layers=3), {}), "vjepa2": (lambda: tiny_vjepa2(layers=3), {}),
            "timesformer": (lambda: tiny_timesformer(layers=3), {})}


def patched(name: str):
    """A freshly patched tiny model (never run), its family, an export example and two other clips."""
    build, clip = FAMILIES[name]
    model = build()
    family = family_of(model)
    spec = family.spec_of(model, **clip)
    staprune.patch(model, r=family.levels(spec)[0])
    g = torch.Generator().manual_seed(7)
    shape = family.example_input(spec, 1).shape[1:]
    example = torch.randn(2, *shape, generator=g)
    others = [torch.randn(1, *shape, generator=g), torch.randn(3, *shape, generator=g)]
    return model, family, example, others


def eager(model, family, x):
    with torch.no_grad():
        return family.logits(model(x))


BATCH = {0: torch.export.Dim("batch", min=1, max=64)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_torch_export_and_onnx_runtime_match_pytorch_on_other_clips(name, tmp_path):
    """``torch.onnx.export(dynamo=True)`` runs ``torch.export`` first: its program is checked too."""
    ort = pytest.importorskip("onnxruntime")
    model, family, example, others = patched(name)
    program = torch.onnx.export(model, (example,), dynamic_shapes=(BATCH,), dynamo=True, verbose=False)
    exported = program.exported_program.module()
    path = tmp_path / f"{name}.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    for x in others:  # batch 1 and 3: not the example's 2
        expected = eager(model, family, x)
        torch.testing.assert_close(family.logits(exported(x)), expected, atol=1e-5, rtol=1e-5)
        (logits,) = session.run(None, {feed: x.numpy()})
        assert logits.shape == tuple(expected.shape)
        assert float((torch.from_numpy(logits) - expected).abs().max()) < 1e-4


# Graph capture (Dynamo, then AOTAutograd) is what pruning code can break; Inductor's code generation
# takes most of a compile on CPU, so every family is captured with aot_eager and one goes through Inductor.
@pytest.mark.slow
@pytest.mark.parametrize("name, backend", [(name, "aot_eager") for name in FAMILIES] + [("videomae", "inductor")])
def test_compile_fullgraph_of_a_model_that_never_ran(name, backend):
    torch._dynamo.reset()
    model, family, example, others = patched(name)
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=backend)
    with torch.no_grad():
        out = family.logits(compiled(example))
    torch.testing.assert_close(out, eager(model, family, example), atol=1e-5, rtol=1e-5)

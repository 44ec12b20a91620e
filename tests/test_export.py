"""Deployment (issues 25, 31): every patched video family exports and compiles with the stock calls, at a
fixed clip shape with a dynamic batch axis, with no workaround and no eager warm-up; the exported
graph computes the kept set itself, so it matches PyTorch on clips that are not the export example,
at every clip shape and r the model runs eagerly."""

from __future__ import annotations

import pytest
import torch
from conftest import classifier_family_names

import staprune
from staprune.core.config import STAConfig
from staprune.core.errors import ConfigError
from staprune.core.score import lowest_k
from staprune.families import family_named, family_of


def build(name: str, frames: int, size: int) -> torch.nn.Module:
    """The family's tiny model: a columnar one with three blocks (every pruning location still
    distinct), built for a clip of `frames` x `size`²; Swin's as it is (it reads any clip)."""
    family = family_named(name)
    return family.tiny_model(layers=3, frames=frames, size=size) if family.block_locations else family.tiny_model()


# Swin's test default is 8 x 112² (its nominal input is 32 x 224²).
DEFAULT_SHAPES = {"videomae": (16, 112), "swin3d": (8, 112), "vivit": (16, 112), "vjepa2": (16, 112),
                  "timesformer": (8, 112)}
FAMILIES = classifier_family_names()  # every registered video classifier; each needs its DEFAULT_SHAPES

# (family, frames, size, r): r None is the family's first level for the shape, "max" the largest r1 the
# shape takes. Each case is one export, checked with torch.export's program and with ONNX Runtime.
# The other families: their test shape and one more, another length and another size (the tubelet
# families' stage units of 1, 2, 4 tubelet-frames need a multiple of 8 frames): smaller for some,
# larger for others, so the suite covers both at one export each (each export takes 10-40 s).
# Swin: 16 x 112² at r1=96 (issue 31: equal scores in its 4x4 stage 4), its test shape 8 x 112² at the
# largest r1 (stage 4 keeps 1 of 16 tokens per frame), a level on odd grids and a padded T (6 x 100²:
# T=3 in windows of 2, grids 25, 13, 7, 4), and the largest r1 where stage 3 shifts a padded grid
# (4 x 160²: grids 40, 20, 10, 5).
OTHER_SHAPES = {"videomae": ((8, 96),), "vivit": ((8, 144),), "vjepa2": ((8, 96),), "timesformer": ((4, 128),)}
CASES = [(name, frames, size, None) for name in FAMILIES if name != "swin3d"
         for frames, size in (DEFAULT_SHAPES[name], *OTHER_SHAPES[name])]
CASES += [("swin3d", 16, 112, 96), ("swin3d", 8, 112, "max"), ("swin3d", 6, 100, None), ("swin3d", 4, 160, "max")]


def largest_r(family, spec) -> int:
    """The largest r the family's plan takes for ``spec``'s clip (its ConfigError names the same one)."""
    valid = 0
    for r in range(1, spec.frames * spec.size**2):
        try:
            family.plan(spec, STAConfig(r=r))
        except ConfigError as err:
            assert f"is {valid}" in str(err)  # the largest r its message names
            return valid
        valid = r
    raise AssertionError("no r too large for this clip")


def patched(name: str, frames: int | None = None, size: int | None = None, r: int | str | None = None):
    """A freshly patched tiny model (never run), its family, an export example and two other clips."""
    frames, size = (frames, size) if frames else DEFAULT_SHAPES[name]
    model = build(name, frames, size)
    family = family_of(model)
    spec = family.spec_of(model, frames, size)
    if r is None:
        r = family.levels(spec)[0]
    elif r == "max":
        r = largest_r(family, spec)
    staprune.patch(model, r=r)
    g = torch.Generator().manual_seed(7)
    shape = family.example_input(spec, 1).shape[1:]
    assert shape[-1] == size and frames in shape  # the clip is the case's shape
    example = torch.randn(2, *shape, generator=g)
    others = [torch.randn(1, *shape, generator=g), torch.randn(3, *shape, generator=g)]
    return model, family, example, others


def eager(model, family, x):
    with torch.no_grad():
        return family.logits(model(x))


BATCH = {0: torch.export.Dim("batch", min=1, max=64)}


@pytest.mark.slow
@pytest.mark.parametrize("name, frames, size, r", CASES, ids=[f"{n}-{f}x{s}-r{r or 'level'}" for n, f, s, r in CASES])
def test_torch_export_and_onnx_runtime_match_pytorch_on_other_clips(name, frames, size, r, tmp_path):
    """``torch.onnx.export(dynamo=True)`` runs ``torch.export`` first: its program is checked too."""
    ort = pytest.importorskip("onnxruntime")
    model, family, example, others = patched(name, frames, size, r)
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


def test_lowest_k_orders_equal_scores_by_index_in_pytorch_and_onnx_runtime(tmp_path):
    """STA keeps the k lowest scores; among equal ones topk's choice is unspecified (PyTorch's CPU
    topk and ONNX's TopK differ), so they go by index, in PyTorch and in the exported graph alike."""
    ort = pytest.importorskip("onnxruntime")
    scores = torch.tensor([[0.5, 0.2, 0.7, 0.2, 0.9, 0.2, 0.2, 0.1],   # 0.2 x4 straddles a cut at 3
                           [0.3, 0.1, 0.4, 0.2, 0.8, 0.6, 0.5, 0.7]])  # no tie: topk's own result
    assert lowest_k(scores, 3).tolist() == [[7, 1, 3], [1, 3, 0]]
    assert torch.equal(lowest_k(scores[1:], 3), scores[1:].topk(3, largest=False).indices)
    # Rows full of ties, in PyTorch and in ONNX Runtime.
    rows = torch.randint(0, 4, (64, 16), generator=torch.Generator().manual_seed(0)).float()

    class Lowest(torch.nn.Module):
        def forward(self, x):
            return lowest_k(x, 5)

    path = tmp_path / "lowest.onnx"
    torch.onnx.export(Lowest().eval(), (rows,), dynamo=True, verbose=False).save(str(path))
    (picked,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": rows.numpy()})
    by_index = torch.stack([torch.tensor(sorted(range(16), key=lambda i: (row[i], i))[:5]) for row in rows.tolist()])
    assert torch.equal(lowest_k(rows, 5), by_index)
    assert torch.equal(torch.from_numpy(picked), by_index)


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

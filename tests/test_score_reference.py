"""An independent, per-sample, loop-only reference of docs/algorithm/index.md steps 1-8, written from the text
(not from score.py), must select exactly the same indices as the batched implementation."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from staprune.core.score import sta_keep_indices


def _unit_vec(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(a * a for a in v))
    return [a / norm for a in v] if norm > 0 else [0.0] * len(v)


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def reference_stage(
    x: list[list[float]],
    k: list[list[float]],
    units: int,
    r: int,
    forward: bool,
    first_transition: str,
    score: str,
) -> list[int]:
    """One clip, one stage. x: L tokens of C floats (block output), k: L metric vectors."""
    n = len(x) // units
    keep_n = n - r
    metric = [_unit_vec(v) for v in k]
    # Step 4: F = sum |x| per token, min-max normalised inside each unit (0 when max == min).
    sem = []
    for u in range(units):
        f = [sum(abs(c) for c in x[u * n + i]) for i in range(n)]
        lo, hi = min(f), max(f)
        sem.append([(v - lo) / (hi - lo) if hi > lo else 0.0 for v in f])
    kept_of_unit: dict[int, list[int]] = {}
    walk = list(range(units)) if forward else list(reversed(range(units)))
    prev_metric: list[list[float]] = []
    prev_acc: list[float] = []
    for step, u in enumerate(walk):
        m = [metric[u * n + i] for i in range(n)]
        if step == 0:
            # Step 5: bipartite drop on the first unit.
            set_a = list(range(0, n, 2))
            set_b = list(range(1, n, 2))
            best = [max(_dot(m[a], m[b]) for b in set_b) for a in set_a]
            by_desc = sorted(range(len(set_a)), key=lambda j: -best[j])
            remaining = list(reversed(by_desc[r:]))  # best match ascending
            kept = set_b + [set_a[j] for j in remaining]
            if first_transition == "all":
                prev_metric = m  # every token of the first unit, dropped ones included
                prev_acc = [1.0] * n
            else:
                prev_metric = [m[i] for i in kept]
                prev_acc = [1.0 / len(kept)] * len(kept)
        else:
            # Steps 6-7: P = softmax over current tokens of m_cur . m_prev^T; A = P . A_prev.
            logits = [[_dot(m[i], p) for p in prev_metric] for i in range(n)]
            acc = [0.0] * n
            for j in range(len(prev_metric)):
                col = [math.exp(logits[i][j]) for i in range(n)]
                z = sum(col)
                for i in range(n):
                    acc[i] += col[i] / z * prev_acc[j]
            # Step 8: S = A (1 - F); keep the n - r lowest.
            if score == "sta":
                s = [acc[i] * (1 - sem[u][i]) for i in range(n)]
            elif score == "temporal":
                s = acc
            else:
                s = [1 - sem[u][i] for i in range(n)]
            kept = sorted(range(n), key=lambda i: s[i])[:keep_n]
            kept_acc = [acc[i] for i in kept]
            prev_acc = [a / sum(kept_acc) for a in kept_acc]
            prev_metric = [m[i] for i in kept]
        kept_of_unit[u] = kept
    return [u * n + i for u in range(units) for i in kept_of_unit[u]]


@st.composite
def stage_inputs(draw):
    units = draw(st.sampled_from([1, 2, 3, 4, 8]))
    n = draw(st.integers(4, 24))
    r = draw(st.integers(1, n // 2))
    channels = draw(st.integers(1, 6))
    metric_dim = draw(st.integers(2, 6))
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    forward = draw(st.booleans())
    first_transition = draw(st.sampled_from(["all", "kept"]))
    score = draw(st.sampled_from(["sta", "temporal", "semantic"]))
    return units, n, r, channels, metric_dim, batch, seed, forward, first_transition, score


@settings(max_examples=200, deadline=None)
@given(stage_inputs())
def test_batched_selection_matches_plain_reference(params):
    units, n, r, channels, metric_dim, batch, seed, forward, first_transition, score = params
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, units * n, channels, generator=g, dtype=torch.float64)
    k = torch.randn(batch, units * n, metric_dim, generator=g, dtype=torch.float64)
    got = sta_keep_indices(x, k, units, r, forward=forward, first_transition=first_transition, score=score)
    assert got.shape == (batch, units * (n - r))
    for b in range(batch):
        expected = reference_stage(x[b].tolist(), k[b].tolist(), units, r, forward, first_transition, score)
        assert got[b].tolist() == expected


def test_reference_is_sensitive_to_direction():
    """Guard against a reference that trivially agrees: F and B walks must differ somewhere."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4 * 12, 3, generator=g, dtype=torch.float64)
    k = torch.randn(1, 4 * 12, 4, generator=g, dtype=torch.float64)
    fwd = reference_stage(x[0].tolist(), k[0].tolist(), 4, 4, True, "all", "sta")
    bwd = reference_stage(x[0].tolist(), k[0].tolist(), 4, 4, False, "all", "sta")
    assert fwd != bwd

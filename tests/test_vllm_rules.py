"""Where vLLM is installed (the serving extra), EVS and VidCom2 keep exactly what vLLM's own functions
keep on the same embeddings, at budgets where vLLM's count is staprune's (issue 33). Skipped without
vLLM: tests/test_video_methods.py holds both against their rules written out."""

from __future__ import annotations

import pytest
import torch

from staprune.core.config import STAConfig
from staprune.core.video_methods import VideoLayout, VideoTokens, select_video_tokens

LAYOUT = VideoLayout(8, 4, 4)  # 8 frames of 4x4 tokens: keep 0.25 is 4 per frame, int(128 * 0.25) in all


@pytest.mark.parametrize("method, module", [("evs", "vllm.multimodal.evs"), ("vidcom2", "vllm.multimodal.vidcom2")])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_kept_set_is_vllm_s(method, module, seed):
    vllm_rule = pytest.importorskip(module)
    tokens = torch.randn(LAYOUT.body, 32, generator=torch.Generator().manual_seed(seed))
    mask = vllm_rule.compute_retention_mask(tokens, (LAYOUT.units, LAYOUT.rows, LAYOUT.cols), 1, 0.75)
    kept = select_video_tokens(VideoTokens(tokens, LAYOUT), STAConfig(keep_ratio=0.25, method=method)).kept
    assert kept.tolist() == mask.nonzero().flatten().tolist()


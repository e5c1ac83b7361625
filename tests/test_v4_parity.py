"""DeepSeek-V4 full-forward parity with transformers' DeepseekV4ForCausalLM (fp32, random weights), loaded from
its save_pretrained and exported back."""

from __future__ import annotations

import pytest
import torch

from dsmoe.checkpoint import load_pretrained, save_pretrained
from dsmoe.model.v4 import V4Transformer

from hf_v4 import CASES, build_hf_v4

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_both_ways(case, tmp_path):
    hf = build_hf_v4(case)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    assert isinstance(ours, V4Transformer)
    torch.manual_seed(1)
    # 40 tokens: past the sliding window (8), 10 CSA entries > index_topk (3), 5 HCA entries
    ids = torch.randint(0, hf.config.vocab_size, (2, 40))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    err = (got - want).abs().max().item()
    assert err <= 1e-4, err
    save_pretrained(ours, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        again = back(ids).logits
    assert (again - want).abs().max().item() <= 1e-5

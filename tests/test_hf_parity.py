"""Parity with transformers on the same random weights, through real checkpoints in both directions."""

from __future__ import annotations

import pytest
import torch
from hf_models import CASES, build_hf_model

import dsmoe

transformers = pytest.importorskip("transformers")


def _ids(vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 24), generator=g)


@pytest.mark.parametrize("case", list(CASES))
def test_load_transformers_checkpoint_and_export_back(case, tmp_path, device):
    ref = build_hf_model(case)
    ref.save_pretrained(tmp_path / "hf")
    ids = _ids(ref.config.vocab_size)
    with torch.no_grad():
        expected = ref(ids).logits

    model = dsmoe.load_pretrained(tmp_path / "hf", dtype=torch.float32, device=device)
    with torch.no_grad():
        got = model(ids.to(device)).cpu()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    # Routing must be non-trivial for the comparison to mean something.
    for moe in model.moe_layers():
        assert moe.last_routing.indices.unique().numel() >= moe.gate.n_experts // 2

    dsmoe.save_pretrained(model, tmp_path / "ours", max_shard_size="40KB")
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back) is type(ref)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, expected, atol=1e-4, rtol=0)


def test_dispatch_paths_agree_on_transformers_weights(tmp_path):
    ref = build_hf_model("v3-yarn-groups")
    ref.save_pretrained(tmp_path)
    model = dsmoe.load_pretrained(tmp_path, dtype=torch.float32)
    ids = _ids(ref.config.vocab_size)
    with torch.no_grad():
        fast = model(ids)
        model.set_dispatch("loop")
        slow = model(ids)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_bf16_load_keeps_router_bias_fp32(tmp_path):
    ref = build_hf_model("v3-yarn-groups")
    ref.save_pretrained(tmp_path)
    model = dsmoe.load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    assert all(m.gate.bias.dtype == torch.float32 for m in model.moe_layers())
    ids = _ids(ref.config.vocab_size)
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids)
    # bf16 weights: loose agreement, but far tighter than the logits' spread.
    assert (got - expected).abs().mean() < 0.05 * expected.std()


def test_default_dtype_is_the_checkpoints(tmp_path):
    ref = build_hf_model("mixtral").to(torch.bfloat16)
    ref.save_pretrained(tmp_path)
    assert dsmoe.load_pretrained(tmp_path).embed.weight.dtype == torch.bfloat16

"""DeepSeek-V3's FP8 checkpoints (e4m3 + per-block weight_scale_inv), written by the test itself."""

from __future__ import annotations

import json

import pytest
import torch
from hf_models import build_hf_model
from safetensors.torch import load_file, save_file

import dsmoe
from dsmoe.checkpoint.fp8 import dequantize_blockwise, quantize_blockwise

transformers = pytest.importorskip("transformers")


def _reference_dequant(q: torch.Tensor, scale_inv: torch.Tensor, block: int) -> torch.Tensor:
    """Block by block, the obvious way."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = q[rows, cols].float() * scale_inv[i, j]
    return out


def _quantizable(name: str, t: torch.Tensor) -> bool:
    # As in the published V3 weights: linear layers are FP8; embeddings, head, norms and router are not.
    return t.ndim == 2 and "embed" not in name and "lm_head" not in name and not name.endswith("mlp.gate.weight")


@pytest.mark.parametrize("block", [16, 128])
def test_fp8_checkpoint_loads_dequantised(tmp_path, block):
    ref = build_hf_model("v3-yarn-groups")
    ref.save_pretrained(tmp_path / "bf")
    state = load_file(tmp_path / "bf" / "model.safetensors")
    fp8_state, dequantised = {}, {}
    for name, t in state.items():
        if _quantizable(name, t):
            q, s = quantize_blockwise(t, (block, block))
            assert s.shape == (-(-t.shape[0] // block), -(-t.shape[1] // block))
            fp8_state[name], fp8_state[name + "_scale_inv"] = q, s
            dequantised[name] = _reference_dequant(q, s, block)
        else:
            fp8_state[name] = dequantised[name] = t
    config = json.loads((tmp_path / "bf" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    (tmp_path / "fp8").mkdir()
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    save_file(fp8_state, str(tmp_path / "fp8" / "model.safetensors"), metadata={"format": "pt"})

    model = dsmoe.load_pretrained(tmp_path / "fp8", dtype=torch.float32)
    # The oracle: transformers loading the independently dequantised weights from a plain checkpoint.
    save_file(dequantised, str(tmp_path / "bf" / "model.safetensors"), metadata={"format": "pt"})
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf").eval()
    ids = torch.randint(0, ref.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-4, rtol=0)
    # Quantisation changed the weights (the test is not vacuous) but stayed close.
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    assert not torch.equal(dequantised[name], state[name])
    assert (dequantised[name] - state[name]).abs().max() < 0.1 * state[name].abs().max()

    # Saving writes plain dequantised weights and drops the quantization_config.
    dsmoe.save_pretrained(model, tmp_path / "out")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_dequantize_handles_partial_edge_blocks():
    w = torch.randn(300, 200)
    q, s = quantize_blockwise(w)
    assert s.shape == (3, 2)
    torch.testing.assert_close(dequantize_blockwise(q, s, torch.float32), _reference_dequant(q, s, 128))

"""DeepSeek-V4's published low-precision layout: FP8 e4m3 linears with UE8M0 128x128 block scales (`X.scale`),
FP4 e2m1 experts packed two per int8 with UE8M0 1x32 scales, dequantised on load and checked like V3's FP8."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsmoe.checkpoint import CheckpointError, load_pretrained, save_pretrained
from dsmoe.checkpoint.fp4 import quantize_fp4
from dsmoe.config import ModelConfig
from dsmoe.model.v4 import V4Transformer

from test_v4_config import HUB_STYLE

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """e4m3 values, UE8M0 scales (power-of-two per 128x128 block), and the weight they stand for."""
    M, N = w.shape
    bm, bn = -(-M // 128), -(-N // 128)
    pad = torch.zeros(bm * 128, bn * 128)
    pad[:M, :N] = w
    blocks = pad.view(bm, 128, bn, 128)
    exp = torch.ceil(torch.log2(blocks.abs().amax(dim=(1, 3)).clamp(min=1e-30) / 448))
    q = (blocks / exp.exp2()[:, None, :, None]).view_as(pad)[:M, :N].to(torch.float8_e4m3fn)
    real = (q.float().view(M, N) * exp.exp2().repeat_interleave(128, 0)[:M].repeat_interleave(128, 1)[:, :N])
    return q, exp.exp2().to(torch.float8_e8m0fnu), real


def _fp4_reference(packed: torch.Tensor, scale_bytes: torch.Tensor) -> torch.Tensor:
    """Decode e2m1 nibbles by their bit fields (sign, 2-bit exponent, 1-bit mantissa), independently of fp4.py."""
    u8 = packed.view(torch.uint8).long()
    codes = torch.stack((u8 & 15, u8 >> 4), -1).flatten(-2)
    magnitude = torch.tensor(E2M1)[codes & 7]
    values = torch.where(codes >= 8, -magnitude, magnitude)
    return values * torch.pow(2.0, scale_bytes.float() - 127).repeat_interleave(32, -1)


@pytest.fixture
def quantized(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig.from_hf(HUB_STYLE)
    model = V4Transformer(config)
    save_pretrained(model, tmp_path / "plain")
    state = load_file(tmp_path / "plain" / "model.safetensors")
    out, real = {}, {}
    for name, t in state.items():
        if any(f".attn.{w}.weight" in name for w in ("wq_a", "wq_b", "wkv", "wo_a", "wo_b")):
            q, s, r = _fp8(t.float())
            out[name], out[name.removesuffix(".weight") + ".scale"], real[name] = q, s, r
        elif ".ffn.experts." in name:
            packed, scale = quantize_fp4(t.float())
            out[name], out[name.removesuffix(".weight") + ".scale"], real[name] = packed, scale, \
                _fp4_reference(packed, scale)
        else:
            out[name], real[name] = t, t
    (tmp_path / "q").mkdir()
    save_file(out, tmp_path / "q" / "model.safetensors")
    raw = {**HUB_STYLE, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                                 "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}
    (tmp_path / "q" / "config.json").write_text(json.dumps(raw))
    return tmp_path / "q", real


def test_fp8_and_fp4_weights_dequantise_on_load(quantized, tmp_path):
    path, real = quantized
    loaded = load_pretrained(path, dtype=torch.float32)
    assert loaded.config.quantization_config["expert_dtype"] == "fp4"  # folded from the top-level key
    torch.manual_seed(1)
    want = V4Transformer(loaded.config)
    save_pretrained(want, tmp_path / "w")
    state = load_file(tmp_path / "w" / "model.safetensors")
    save_file({k: real[k].to(v.dtype) if k in real else v for k, v in state.items()}, tmp_path / "w" / "model.safetensors")
    want = load_pretrained(tmp_path / "w", dtype=torch.float32)
    ids = torch.randint(0, 128, (1, 24))
    with torch.no_grad():
        assert torch.equal(loaded(ids), want(ids))
    assert loaded.layers[0].ffn.experts.w1.abs().sum() > 0


def test_missing_or_misshapen_scales_are_named(quantized):
    path, _ = quantized
    state = load_file(path / "model.safetensors")
    name = "model.layers.1.ffn.experts.3.w1.scale"
    broken = {k: v for k, v in state.items() if k != name}
    save_file(broken, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="FP4 tensor 'model.layers.1.ffn.experts.3.w1.weight' .* has no"):
        load_pretrained(path)
    broken[name] = state[name][:, :1].contiguous()
    save_file(broken, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="expected \\[32, 2\\] UE8M0 scales for 1x32 blocks"):
        load_pretrained(path)

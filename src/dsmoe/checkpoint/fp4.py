"""DeepSeek-V4's low-precision weights: FP8 e4m3 linears with UE8M0 block scales, and FP4 (e2m1) experts.

The published V4 checkpoints declare `quantization_config = {"quant_method": "fp8", "fmt": "e4m3",
"scale_fmt": "ue8m0", "weight_block_size": [128, 128]}` and `expert_dtype: "fp4"`. Each quantized weight
`X.weight` has its scale beside it as `X.scale` (V3's files call it `X.weight_scale_inv`):
* FP8 weights (M, N) e4m3 with one scale per 128x128 block: scale (ceil(M/128), ceil(N/128));
* FP4 expert weights stored as int8 (M, N/2), two e2m1 values per byte, low nibble first, with one scale per
  1x32 block: scale (M, N/32).
UE8M0 scales are powers of two: 2 ** (byte - 127) (safetensors F8_E8M0, or U8 holding the byte). The real
weight is value * scale, as in transformers' Fp8Dequantize.
"""

from __future__ import annotations

import torch

FP4_BLOCK = 32
# e2m1 codes 0..15: sign bit 3, then 2 exponent bits and 1 mantissa bit
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_DTYPES = ("I8", "U8")
SCALE_DTYPES = ("F8_E8M0", "U8", "F32", "BF16")


def scale_names(weight: str) -> list[str]:
    """Where a quantized weight's scale may be stored: V4's `X.scale`, V3's `X.weight_scale_inv`."""
    names = [weight + "_scale_inv"]
    if weight.endswith(".weight"):
        names.insert(0, weight.removesuffix(".weight") + ".scale")
    return names


def scale_to_float(scale: torch.Tensor) -> torch.Tensor:
    """UE8M0 (float8_e8m0fnu, or uint8 exponent bytes) or float scales -> fp32."""
    if scale.dtype == torch.uint8:
        return (scale.float() - 127.0).exp2()
    return scale.float()


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """(M, N/2) int8 / uint8, two e2m1 values per byte (low nibble first) -> (M, N) fp32."""
    lut = torch.tensor(_E2M1, dtype=torch.float32)
    u8 = packed.contiguous().view(torch.uint8).long()
    pairs = torch.stack((lut[u8 & 0xF], lut[(u8 >> 4) & 0xF]), dim=-1)
    return pairs.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP4 weight (M, N/2) and scale (M, N/32) -> (M, N) in dtype."""
    values = unpack_fp4(packed)
    return (values * scale_to_float(scale).repeat_interleave(FP4_BLOCK, dim=-1)[..., :values.shape[-1]]).to(dtype)


def quantize_fp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, for writing test checkpoints: (M, N) -> int8 (M, N/2) and UE8M0 scales (M, N/32) as uint8
    (each block scaled by a power of two so its amax fits e2m1's 6, then rounded to the nearest code)."""
    M, N = weight.shape
    blocks = weight.float().view(M, N // FP4_BLOCK, FP4_BLOCK)
    exp = torch.ceil(torch.log2(blocks.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-127, 127)
    lut = torch.tensor(_E2M1, dtype=torch.float32)
    codes = ((blocks / exp.exp2()[..., None]).reshape(M, N, 1) - lut).abs().argmin(-1).to(torch.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8)
    return packed, (exp + 127).to(torch.uint8)

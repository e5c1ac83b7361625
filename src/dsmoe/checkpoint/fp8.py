"""DeepSeek-V3's FP8 weights: e4m3 values with one fp32 `weight_scale_inv` per 128x128 block.

The stored value is w / s for the block's scale s, so the real weight is fp8 * scale_inv (V3 section 3.3).
The last row/column blocks may be partial when a dimension is not a multiple of the block size.
"""

from __future__ import annotations

import torch

FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DEFAULT_BLOCK = (128, 128)


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    rows, cols = shape
    return (-(-rows // block[0]), -(-cols // block[1]))


def dequantize_blockwise(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype,
                         block: tuple[int, int] = DEFAULT_BLOCK) -> torch.Tensor:
    """weight (M, N) fp8, scale_inv (ceil(M/bm), ceil(N/bn)) -> (M, N) in dtype."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]
    return (weight.float() * scale).to(dtype)


def quantize_blockwise(weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, for writing FP8 test checkpoints: per-block amax / 448 scales (448 = e4m3 max)."""
    rows, cols = weight.shape
    sr, sc = scale_shape((rows, cols), block)
    padded = torch.zeros(sr * block[0], sc * block[1], dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(sr, block[0], sc, block[1])
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # (sr, sc)
    scale_inv = amax / torch.finfo(torch.float8_e4m3fn).max
    q = (blocks / scale_inv[:, None, :, None]).view_as(padded)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale_inv

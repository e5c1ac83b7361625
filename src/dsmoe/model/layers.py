"""Building blocks shared by every family: RMSNorm, rotary embeddings (with YaRN), the SwiGLU MLP.

Shape legend: B batch, T tokens in this call, H heads, D head width, R rope width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, yarn_mscale
from ..ops.cpu_kernels import small_batch_kernels
from ..ops.weight_only import linear_in_fp32, widen_for_cpu


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint names) whose small-batch CPU inference calls, at most 8
    tokens with autograd off (a decode step), run dsmoe's matrix-vector kernel (ops/cpu_kernels.py: the
    weight read once, fp32 arithmetic, fp32 or bf16 weights); larger no-grad calls with bf16 weights on a CPU
    without bf16 arithmetic run in fp32 (ops/weight_only.py); every other call is nn.Linear's own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = small_batch_kernels(x, self.weight)
        if ops is None:
            if widen_for_cpu(x, self.weight):  # a bf16 prefill on a CPU without bf16 arithmetic
                return linear_in_fp32(x, self.weight, self.bias)
            return super().forward(x)
        y = ops.linear(x.reshape(-1, x.shape[-1]), self.weight)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = small_batch_kernels(x, self.weight)
        if ops is not None:  # a decode step: one kernel call instead of eight operators
            return ops.rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
        # Normalise in fp32 and cast back before the weight, as the reference implementations do.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Used for dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, inter_dim, bias=False)  # gate_proj
        self.w2 = Linear(inter_dim, dim, bias=False)  # down_proj
        self.w3 = Linear(dim, inter_dim, bias=False)  # up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = small_batch_kernels(x, self.w1.weight, self.w3.weight)
        if ops is not None:  # a decode step: gate and up projections and the SwiGLU in one kernel call
            return self.w2(ops.swiglu(x.reshape(-1, x.shape[-1]), self.w1.weight, self.w3.weight)
                           .view(*x.shape[:-1], -1))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_inv_freq(config: ModelConfig, dim: int | None = None, base: float | None = None,
                  scaled: bool = True) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (R/2,) and the cos/sin amplitude.

    dim / base override config.rope_dim / config.rope_theta, and scaled=False ignores rope_scaling (DeepSeek-V4
    has two ropes: plain on its sliding layers, YaRN at compress_rope_theta on its compressed ones).

    YaRN (as in DeepSeek-V2 appendix B): frequencies are blended between interpolated (slow, /factor) and
    extrapolated (original) by a linear ramp over the dims whose wavelength falls between beta_slow and
    beta_fast rotations of the original context. The amplitude is mscale(mscale) / mscale(mscale_all_dim);
    the rest of the temperature lives in the softmax scale (ModelConfig.softmax_scale).
    """
    dim = config.rope_dim if dim is None else dim
    base = config.rope_theta if base is None else base
    # Always on the CPU: a model built on the meta device (for loading) still needs real rope tables.
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    rs = config.rope_scaling if scaled else None
    if rs is None or rs["rope_type"] == "default":
        return 1.0 / pos_freqs, 1.0
    factor = config.yarn_factor
    original_ctx = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 for high-frequency dims, kept as they were trained
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolate
    if rs.get("attention_factor") is not None:
        amplitude = float(rs["attention_factor"])
    elif rs.get("mscale") and rs.get("mscale_all_dim"):
        amplitude = yarn_mscale(factor, rs["mscale"]) / yarn_mscale(factor, rs["mscale_all_dim"])
    else:
        amplitude = yarn_mscale(factor)
    return inv_freq, amplitude


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for every position up to max_position_embeddings (computed lazily)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq, amplitude = rope_inv_freq(config)
        self.amplitude = amplitude
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) or (B, T) -> cos, sin of shape (..., T, R/2)."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)
        return (freqs.cos() * self.amplitude).to(dtype), (freqs.sin() * self.amplitude).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x (B, T, H, R) by cos/sin (T, R/2) or (B, T, R/2).

    interleaved: DeepSeek's layout, dims (0,1), (2,3), ... are the rotated pairs. The output is written as
    [rotated evens | rotated odds]: a fixed permutation of the pair layout applied to both q and k, so q.k is
    unchanged and no interleaving copy is needed. Otherwise Llama's rotate-half: pairs (i, i + R/2).
    """
    B, T = x.shape[:2]
    if cos.shape in ((T, x.shape[-1] // 2), (B, T, x.shape[-1] // 2)) and x.dim() == 4:
        ops = small_batch_kernels(x.flatten(2))
        if ops is not None:  # a decode step: one kernel call instead of ten operators
            return ops.rope(x, cos, sin, interleaved)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

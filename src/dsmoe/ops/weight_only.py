"""Weight-only bf16 on CPUs without bf16 arithmetic: bf16 (or fp16) storage, fp32 matrix products.

On a CPU with no bf16 dot-product instructions (no AVX512-BF16, no AMX: every AVX2 machine), PyTorch runs a
bf16 matrix product through oneDNN's emulation, 3-5x slower than the same product in fp32 (a 512-token
prefill of the benchmark model: 514 tok/s in bf16 against 2236 in fp32). Widening the weight to fp32 for the
call costs one pass over it, which a product of many rows (a prefill) repays many times over; the result is
the fp32 product rounded to the activation's dtype once, what the bf16 kernel computes up to summation order.
Small products (a decode step) go to dsmoe's own kernels instead (cpu_kernels.py), which read bf16 directly.
Only without autograd: training keeps PyTorch's own bf16 path and its gradients.
"""

from __future__ import annotations

import functools

import torch

_HALF = (torch.bfloat16, torch.float16)


@functools.cache
def cpu_has_bf16_arithmetic() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where oneDNN's bf16 products are fast."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def widen_for_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when x @ weight.T should run in fp32: a no-grad CPU call with a bf16/fp16 weight on a CPU without
    bf16 arithmetic."""
    return (weight.dtype in _HALF and x.device.type == "cpu" and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and not cpu_has_bf16_arithmetic())


def linear_in_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) computed in fp32 and returned in x's dtype; x (..., K), weight (N, K) -> (..., N)."""
    y = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return y.to(x.dtype)


__all__ = ["cpu_has_bf16_arithmetic", "linear_in_fp32", "widen_for_cpu"]

"""Where and how a training step runs: the device, mixed precision, the optimizer's kernel, activation
checkpointing and host copies for checkpoints.

The CPU path is the reference: with `--device cpu` (or `auto` on a machine without a GPU) every function
here is a no-op or returns what the loop used before, so CPU runs stay bit-identical. On CUDA the same
recipe runs there: fp32 master weights, bf16 autocast for --dtype bf16 (the router opts out of autocast in
model/moe.py, so routing stays fp32 as on the CPU), fused AdamW, batches copied to the device after
`parallel.split_batch`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from ..device import resolve_device
from .errors import TrainingError


def training_device(text: str, local_rank: int | None = None) -> torch.device:
    """--device's text (cpu, cuda, cuda:N, auto) -> torch.device. Under torchrun (`local_rank` given) a bare
    `cuda` (or `auto` finding CUDA) is cuda:LOCAL_RANK, one GPU per local rank. TrainingError (one line,
    naming --device) for an unknown device or CUDA without CUDA."""
    try:
        return resolve_device(text, allow_meta=False, local_rank=local_rank or 0)
    except ValueError as err:
        raise TrainingError(f"--device: {err}") from None


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast over fp32 weights for --dtype bf16 on `device`'s type; disabled for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def make_optimizer(groups: list[dict[str, Any]], lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW(betas 0.9, 0.95); on CUDA the fused kernel (one launch per step instead of one per tensor), which
    computes the same update to fp32 rounding."""
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **extra)


def checkpoint_activations(model: torch.nn.Module) -> int:
    """Recompute each decoder block's activations in the backward pass instead of keeping them
    (torch.utils.checkpoint, non-reentrant; RNG state preserved). Trades one more forward per block for
    activation memory of one block. The block modules stay where they are (same parameter names); only
    their forward is wrapped. Recomputation repeats the block's side effects (routing statistics, token
    dropping) with the same inputs, so they are the same. Returns the number of blocks wrapped."""
    blocks = list(model.layers)
    for block in blocks:
        block.forward = _checkpointed(block.forward)
    return len(blocks)


def _checkpointed(forward):
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # evaluation / generation: nothing to save, nothing to recompute
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def to_cpu(value: Any) -> Any:
    """A copy of a (nested) state dict with every tensor on the CPU, so that a checkpoint written on a GPU
    loads on any machine. CPU tensors are returned as they are (no copy)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


__all__ = ["autocast", "checkpoint_activations", "make_optimizer", "to_cpu", "training_device"]

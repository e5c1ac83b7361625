"""Token dropping: a per-expert or per-device capacity on the (token, slot) pairs of one MoE layer.

Switch Transformer (section 2.2) caps what each expert accepts at `capacity_factor * K * T / N` pairs;
DeepSeek-V2 (section 2.2.4) caps each *device* at its average computational budget (capacity factor 1.0),
drops the overflowing tokens with the lowest affinity scores, and never drops the tokens of about 10% of
the training sequences, so that inference (which drops nothing) is not a different model. A dropped pair
contributes nothing to its token's output; the token keeps its residual path and its shared experts.
Dropping is a training-time measure: `MoE` applies it only in train mode.

How this differs from the papers, knowingly:
  * the unit is a (token, expert) pair, ranked by the router's affinity for that expert across all slots
    (as V-MoE's batch-prioritised routing): a token can keep one expert of a device and lose another;
  * under expert parallelism every rank caps its own tokens (a budget of CF x K x T_local / bins per bin)
    rather than each device capping what it receives from all ranks; `devices` are the simulated devices
    of the balance losses (`--devices`), which match the EP ranks only when chosen so.

Shape legend: T tokens, K experts per token, N routed experts, D devices (N/D contiguous experts each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LEVELS = ("expert", "device")


@dataclass(frozen=True)
class TokenDropping:
    """How one MoE layer drops pairs in training.

    capacity_factor  each expert (level "expert") or device (level "device") accepts at most
                     ceil(capacity_factor * K * T / bins) pairs, bins = N or D
    devices          D for level "device": N/D contiguous experts per device (as expert parallelism places them)
    Protected sequences (never dropped; served first, counting against the capacity) are chosen per step by
    the trainer (`protected_sequences`) and given to `MoE.forward` through `MoE.protected_rows`.
    """

    capacity_factor: float
    level: str = "expert"
    devices: int = 1

    def __post_init__(self) -> None:
        if not (self.capacity_factor > 0 and math.isfinite(self.capacity_factor)):
            raise ValueError(f"--capacity-factor must be a positive finite number, got {self.capacity_factor}")
        if self.level not in LEVELS:
            raise ValueError(f"--drop-level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        if self.level == "device" and self.devices < 2:
            raise ValueError("--drop-level device needs --devices 2 or more (for one capacity per expert use "
                             "--drop-level expert)")

    def check_experts(self, n_experts: int) -> None:
        if self.level == "device" and n_experts % self.devices:
            raise ValueError(f"--devices {self.devices} must divide the model's {n_experts} routed experts "
                             "(device-level token dropping groups them into equal devices)")

    def keep_mask(self, affinity: torch.Tensor, indices: torch.Tensor, n_experts: int,
                  protected: torch.Tensor | None = None) -> torch.Tensor:
        """(T, K) bool keep-mask for one layer's routing; protected (T,) bool marks tokens never dropped."""
        return capacity_mask(affinity, indices, n_experts, self.capacity_factor,
                             devices=self.devices if self.level == "device" else None, protected=protected)


def protected_sequences(sequence_ids: torch.Tensor, fraction: float) -> torch.Tensor:
    """Which sequences are never dropped: sequence n (numbered over the whole run, e.g. step * global batch +
    row) is protected when floor((n + 1) * fraction) > floor(n * fraction). Exactly `fraction` of all the
    sequences a run sees (every 10th at 0.1) whatever the batch size or the number of ranks; fraction in
    [0, 1]. -> bool, shaped like the ids."""
    n = sequence_ids.to(torch.float64)
    return torch.floor((n + 1) * fraction) > torch.floor(n * fraction)


def capacity_mask(affinity: torch.Tensor, indices: torch.Tensor, n_experts: int, capacity_factor: float,
                  devices: int | None = None, protected: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask (T, K) bool of the pairs that fit their expert's (or device's) capacity.

    Each expert -- or, with `devices`, each of `devices` groups of n_experts/devices contiguous experts --
    accepts at most C = ceil(capacity_factor * K * T / bins) pairs. When more are routed to it, it keeps
    pairs in this order: protected tokens' (always kept, even past C), then highest `affinity` (the
    router's score of that expert for that token), ties to the earlier token; the rest are dropped.
    Vectorised: stable sorts by (bin, not protected, -affinity), a rank within each bin, a compare with C.
    """
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    if affinity.shape != indices.shape or indices.ndim != 2:
        raise ValueError(f"affinity {tuple(affinity.shape)} and indices {tuple(indices.shape)} must both be "
                         "(tokens, top_k)")
    T, K = indices.shape
    bins = n_experts
    flat_bin = indices.reshape(-1).long()  # (T*K,)
    if devices is not None:
        if n_experts % devices:
            raise ValueError(f"{devices} devices must divide {n_experts} experts")
        bins = devices
        flat_bin = flat_bin // (n_experts // devices)
    capacity = math.ceil(round(capacity_factor * K * T / bins, 9))  # round: 1.1*10/1 is not 11.000001
    # Stable sorts from the least to the most significant key = one lexicographic sort.
    order = torch.sort(affinity.detach().reshape(-1), descending=True, stable=True).indices
    safe = None
    if protected is not None:
        safe = protected.reshape(T, 1).expand(T, K).reshape(-1)  # (T*K,) pairs of protected tokens
        order = order[torch.sort((~safe[order]).to(torch.uint8), stable=True).indices]
    order = order[torch.sort(flat_bin[order], stable=True).indices]  # (T*K,)
    counts = torch.bincount(flat_bin, minlength=bins)
    start = counts.cumsum(0) - counts  # (bins,) first sorted position of each bin
    rank = torch.arange(T * K, device=indices.device) - start[flat_bin[order]]  # (T*K,) rank within its bin
    keep = torch.empty(T * K, dtype=torch.bool, device=indices.device)
    keep[order] = rank < capacity
    if safe is not None:
        keep |= safe
    return keep.view(T, K)

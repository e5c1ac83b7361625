"""Data parallelism around expert parallelism: initial broadcast, gradient all-reduce, gradient clipping,
global expert loads, batch splitting and metric averaging. Plain collectives, no DDP wrapper (DDP would
all-reduce the expert shards over the wrong group).

Why the gradients are reduced the way they are (W = ep * dp ranks, each with b = B / W sequences of the
global batch of B; L_r = mean loss over rank r's tokens; the target is one process on the global batch,
L = (1/W) * sum_r L_r, which is the global token mean because every rank has the same number of tokens):

* Replicated parameter theta (embedding, attention, norms, router, shared experts, head): rank r's replica
  only sees rank r's tokens, so its backward gives dL_r/dtheta, and
      dL/dtheta = (1/W) * sum_r dL_r/dtheta        ->  all-reduce SUM over the world, divide by W.
* Expert shard phi (held by rank (d, j) = EP rank j of EP group d, and by every rank with EP rank j):
  every rank r' of EP group d sends tokens to phi, and the backward all-to-all returns dL_r'/d(output) for
  them, so the gradient that accumulates on rank (d, j) is  sum_{r' in EP group d} dL_r'/dphi  -- a SUM over
  the ep ranks of its group already, not one rank's share. The global gradient is
      dL/dphi = (1/W) * sum_d sum_{r' in group d} dL_r'/dphi  ->  all-reduce SUM over the DP group (the d's),
  divide by W (not by dp: dividing by dp would scale expert gradients by ep).
  An expert shard that received no token on a rank has no .grad; it counts as zero (one process would
  give the full stacked tensor a gradient with a zero slice).

Balance losses: each rank computes them on its local batch, so the objective is their mean over ranks.
That equals one process on the global batch only for terms linear in the batch: the LM and MTP
cross-entropies (token means) and V3's sequence-wise loss (a mean over sequences). The expert-level,
Mixtral, device and communication losses are sums of products f_i * P_i of batch means, which are not
linear: with W ranks they are the mean of W local values, a slightly different (noisier) penalty.
The aux-loss-free bias update uses global loads (`global_expert_loads`), so it is exact.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .expert import expert_parameter_names
from .groups import ParallelInfo

BUCKET_ELEMENTS = 1 << 24  # flatten gradients into buckets of up to 16M elements: few collectives


def _split_parameters(model: nn.Module, trainable_only: bool = True
                      ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(replicated, expert) parameters, each once (a tied head is the embedding); experts are told by name,
    so a frozen expert shard is still an expert shard."""
    experts = expert_parameter_names(model)
    replicated, expert = [], []
    for name, p in model.named_parameters():
        if p.requires_grad or not trainable_only:
            (expert if name in experts else replicated).append(p)
    return replicated, expert


def _buckets(tensors: list[torch.Tensor]) -> Iterable[list[torch.Tensor]]:
    """Consecutive runs of same-dtype, same-device tensors of at most BUCKET_ELEMENTS elements in all."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        full = size + t.numel() > BUCKET_ELEMENTS
        if bucket and (full or t.dtype != bucket[0].dtype or t.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def _all_reduce_sum(tensors: list[torch.Tensor], group, scale: float) -> None:
    """In place: t = scale * sum over the group of t, for every tensor (flattened per bucket)."""
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        if group is not None:
            dist.all_reduce(flat, group=group)
        flat.mul_(scale)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


@torch.no_grad()
def broadcast_parameters(model: nn.Module, info: ParallelInfo) -> None:
    """Make every replica identical: replicated parameters and buffers (router biases) from world rank 0,
    expert shards from DP rank 0 of each DP group. Call after shard_experts, before the optimizer exists.
    A safety net: a model built from the same seed or checkpoint on every rank is identical already."""
    if not info.distributed:
        return
    # Frozen parameters too: a frozen expert shard broadcast from rank 0 would overwrite every rank's experts
    # with rank 0's (same shape, so nothing would fail).
    replicated, expert = _split_parameters(model, trainable_only=False)
    for t in [*replicated, *model.buffers()]:
        dist.broadcast(t.data, src=0)
    if info.dp_group is not None:
        src = info.dp_ranks()[0]
        for p in expert:
            dist.broadcast(p.data, src=src, group=info.dp_group)


@torch.no_grad()
def all_reduce_gradients(model: nn.Module, info: ParallelInfo) -> None:
    """After backward, before clipping and the optimizer step: turn each rank's gradients into the gradient
    of the global-batch mean loss (derivation in the module doc). Collective over the world."""
    if not info.distributed:
        return
    replicated, expert = _split_parameters(model)
    for p in expert:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # Replicated parameters without a gradient are unused by every rank's graph alike: skipped everywhere.
    _all_reduce_sum([p.grad for p in replicated if p.grad is not None], dist.group.WORLD, 1.0 / info.world_size)
    _all_reduce_sum([p.grad for p in expert], info.dp_group, 1.0 / info.world_size)


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, info: ParallelInfo) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole (unsharded) model: the norm adds every expert shard of
    the EP group to the replicated parameters (identical on every rank after all_reduce_gradients).
    Returns the total norm before clipping, the same on every rank."""
    replicated, expert = _split_parameters(model)
    grads_r = [p.grad for p in replicated if p.grad is not None]
    grads_e = [p.grad for p in expert if p.grad is not None]
    device = next(model.parameters()).device
    sq_r = sum((g.float().pow(2).sum() for g in grads_r), torch.zeros((), device=device))
    sq_e = sum((g.float().pow(2).sum() for g in grads_e), torch.zeros((), device=device))
    if info.ep_group is not None:
        dist.all_reduce(sq_e, group=info.ep_group)
    total = (sq_r + sq_e).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in [*grads_r, *grads_e]:
        g.mul_(coef.to(g.dtype))
    return total


@torch.no_grad()
def global_expert_loads(loads: list[torch.Tensor], info: ParallelInfo) -> list[torch.Tensor]:
    """Per-layer (E,) token counts summed over every rank (one all-reduce for all layers), so every rank
    applies the same aux-loss-free bias update and reports the global-batch load metrics."""
    if not info.distributed or not loads:
        return loads
    flat = torch.cat([load.float().reshape(-1) for load in loads])
    dist.all_reduce(flat)
    return list(flat.split([load.numel() for load in loads]))


def split_batch(tokens: torch.Tensor, info: ParallelInfo) -> torch.Tensor:
    """This rank's contiguous share of a global batch (B, ...): rows [rank*B/W, (rank+1)*B/W)."""
    B, W = tokens.shape[0], info.world_size
    if B % W:
        raise ValueError(f"--batch-size {B} must be a multiple of the number of processes ({W})")
    b = B // W
    return tokens[info.rank * b:(info.rank + 1) * b]


def mean_over_world(values: dict[str, float], info: ParallelInfo) -> dict[str, float]:
    """Average scalar metrics over the ranks (equal local batches: the global-batch token mean for the
    LM / MTP losses). One all-reduce; every rank gets the result."""
    if not info.distributed or not values:
        return dict(values)
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    if info.backend == "nccl":
        t = t.to(info.device)
    dist.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(values, t.tolist())}


def broadcast_from_main(t: torch.Tensor, info: ParallelInfo) -> torch.Tensor:
    """t as world rank 0 has it, on every rank (e.g. sampled tokens during generation, so that ranks whose
    logits differ in the last bit cannot diverge and desynchronise their all-to-alls)."""
    if info.distributed:
        dist.broadcast(t, src=0)
    return t


__all__ = ["all_reduce_gradients", "broadcast_parameters", "clip_grad_norm", "global_expert_loads",
           "split_batch", "mean_over_world", "broadcast_from_main"]

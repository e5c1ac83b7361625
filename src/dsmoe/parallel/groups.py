"""Process groups for expert parallelism (EP) x data parallelism (DP) on torch.distributed.

Rank layout, world = ep x dp:

    rank = dp_rank * ep + ep_rank

    EP groups are contiguous:  [d*ep, d*ep + 1, ..., d*ep + ep - 1]   for d in 0..dp-1
    DP groups are strided:     [j, j + ep, j + 2*ep, ...]              for j in 0..ep-1

So an EP group (the ranks that exchange tokens by all-to-all every MoE layer) is one block of neighbouring
ranks -- one node with torchrun's usual numbering, where the all-to-all is cheapest -- and each EP group
holds one full copy of the routed experts, split E/ep per rank. The ranks of a DP group hold the same
expert slice (same ep_rank) and average its gradients.

Without torchrun (no WORLD_SIZE in the environment, or WORLD_SIZE=1) everything is a single process: no
process group is created and every collective in dsmoe.parallel is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelInfo:
    """Where this process sits in the ep x dp grid. Groups are None when they hold one rank only (nothing
    to communicate); never pass a None group to torch.distributed (None means the world there)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    ep_size: int = 1
    dp_size: int = 1
    ep_rank: int = 0
    dp_rank: int = 0
    ep_group: Any = None  # ProcessGroup of this rank's EP group, None if ep_size == 1
    dp_group: Any = None  # ProcessGroup of this rank's DP group, None if dp_size == 1
    backend: str | None = None  # "gloo" / "nccl", None when not distributed

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """World rank 0: the process that prints, logs and writes checkpoints."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """cuda:LOCAL_RANK under NCCL, else the CPU."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def ep_ranks(self) -> list[int]:
        """World ranks of this rank's EP group, in EP-rank order."""
        first = self.dp_rank * self.ep_size
        return list(range(first, first + self.ep_size))

    def dp_ranks(self) -> list[int]:
        """World ranks of this rank's DP group, in DP-rank order."""
        return list(range(self.ep_rank, self.world_size, self.ep_size))


SINGLE = ParallelInfo()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def init_distributed(ep: int = 1, n_experts: int | None = None, backend: str = "gloo") -> ParallelInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
    and build the EP / DP groups with `make_groups(ep, n_experts)`.

    Not launched by torchrun (or WORLD_SIZE=1): returns the single-process info; ep must then be 1.
    backend: "gloo" for tensors on the CPU, which is where `dsmoe train` and `dsmoe generate` keep the model
    (even on a machine with GPUs: NCCL cannot reduce CPU tensors); "nccl" for a caller that keeps its model
    and batches on cuda:LOCAL_RANK (made the current device here). The NCCL path is untested: no GPU was
    available to this project's test machines.
    Calling it again once the group exists just rebuilds the groups.
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    world = _env_int("WORLD_SIZE", 1)
    if not dist.is_initialized() and world <= 1:
        return make_groups(ep, n_experts)
    if not dist.is_initialized():
        local_rank = _env_int("LOCAL_RANK", 0)
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, rank=_env_int("RANK", 0), world_size=world)
    return make_groups(ep, n_experts)


def check_ep_divides_experts(ep: int, n_experts: int) -> None:
    """Every EP rank holds the same number of routed experts: ValueError naming --ep otherwise."""
    if n_experts % ep:
        raise ValueError(f"--ep {ep} must divide n_routed_experts ({n_experts}): every rank holds the same "
                         "number of experts")


def make_groups(ep: int, n_experts: int | None = None) -> ParallelInfo:
    """EP groups of `ep` contiguous ranks and DP groups of the ranks with the same EP rank (module doc).

    Collective: every rank must call it, with the same arguments. Raises ValueError (naming --ep) if ep
    does not divide the number of processes or, when given, the number of routed experts.
    """
    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
        raise ValueError(f"--ep must be a positive integer, got {ep!r}")
    initialized = dist.is_initialized()
    world = dist.get_world_size() if initialized else 1
    rank = dist.get_rank() if initialized else 0
    if world % ep:
        hint = "" if initialized else " (launch with torchrun --nproc_per_node N for N > 1 processes)"
        raise ValueError(f"--ep {ep} must divide the number of processes ({world}){hint}")
    if n_experts is not None:
        check_ep_divides_experts(ep, n_experts)
    dp = world // ep
    ep_rank, dp_rank = rank % ep, rank // ep
    ep_group = dp_group = None
    if initialized:
        # new_group is collective over the world: every rank creates every group, in the same order.
        for d in range(dp):
            ranks = list(range(d * ep, (d + 1) * ep))
            group = dist.new_group(ranks) if ep > 1 else None
            if d == dp_rank:
                ep_group = group
        for j in range(ep):
            ranks = list(range(j, world, ep))
            group = dist.new_group(ranks) if dp > 1 else None
            if j == ep_rank:
                dp_group = group
    return ParallelInfo(rank=rank, world_size=world, local_rank=_env_int("LOCAL_RANK", 0) if initialized else 0,
                        ep_size=ep, dp_size=dp, ep_rank=ep_rank, dp_rank=dp_rank, ep_group=ep_group,
                        dp_group=dp_group, backend=dist.get_backend() if initialized else None)


def barrier(info: ParallelInfo) -> None:
    """Wait for every rank (e.g. until rank 0 has written a checkpoint the others will read)."""
    if info.distributed:
        dist.barrier()


def destroy() -> None:
    """Leave the process group (end of a torchrun program)."""
    if dist.is_initialized():
        dist.destroy_process_group()

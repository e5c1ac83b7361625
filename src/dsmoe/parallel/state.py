"""Checkpoints across process counts: gather expert shards into full tensors, and slice full ones.

Saving from N processes: every rank calls `unshard_experts(model, info)` (collective); world rank 0 gets a
plain single-device `Transformer` with full stacked experts and calls `save_pretrained` on it (the
optimizer state likewise with `full_optimizer_state`). Checkpoints are therefore always full and do not
record the process count.

Resuming with any process count: every rank loads the full checkpoint (`load_pretrained`), calls
`shard_experts`, builds the optimizer, and loads `shard_optimizer_state(full_state, model, info)`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..device import meta_device
from ..model import Transformer
from .expert import ExpertParallelExperts
from .groups import ParallelInfo


def all_gather_experts(local: torch.Tensor, info: ParallelInfo) -> torch.Tensor:
    """(C, ...) expert shard (weights, gradients, optimizer moments) -> (E, ...) on every rank of the EP group."""
    if info.ep_group is None:
        return local
    parts = [torch.empty_like(local) for _ in range(info.ep_size)]
    dist.all_gather(parts, local.contiguous(), group=info.ep_group)
    return torch.cat(parts)


def _gather_to_main(local: torch.Tensor, info: ParallelInfo) -> torch.Tensor | None:
    """(C, ...) -> (E, ...) on world rank 0 (EP rank 0 of DP group 0), None elsewhere. Only DP group 0's
    ranks take part (the other EP groups hold copies of the same experts)."""
    if info.ep_group is None:
        return local if info.is_main else None
    if info.dp_rank != 0:
        return None
    parts = [torch.empty_like(local) for _ in range(info.ep_size)] if info.is_main else None
    dist.gather(local.contiguous(), parts, dst=0, group=info.ep_group)
    return torch.cat(parts) if info.is_main else None


def _sharded_names(model: nn.Module) -> set[str]:
    return {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)
            for p in ("w1", "w2", "w3")}


@torch.no_grad()
def full_state_dict(model: nn.Module, info: ParallelInfo) -> dict[str, torch.Tensor] | None:
    """The state dict one process would have (full (E, ...) experts), on world rank 0; None on the other
    ranks. Collective: every rank calls it. Non-expert tensors are the model's own (not copies)."""
    sharded = _sharded_names(model)
    full: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name in sharded:
            t = _gather_to_main(t, info)
        if info.is_main:
            full[name] = t
    return full if info.is_main else None


@torch.no_grad()
def unshard_experts(model: Transformer, info: ParallelInfo) -> Transformer | None:
    """A plain `Transformer` with full experts on world rank 0 (None elsewhere), for `save_pretrained` or
    evaluation in one process. Collective. Its replicated weights share storage with `model` (only the
    experts are new memory): treat it as a read-only snapshot, or deep-copy it."""
    state = full_state_dict(model, info)
    if state is None:
        return None
    with meta_device():
        plain = Transformer(model.config, with_mtp=len(model.mtp) > 0)
    plain.load_state_dict(state, strict=True, assign=True)
    if model.config.tie_word_embeddings:
        plain.head.weight = plain.embed.weight
    for ours, theirs in zip(plain.moe_layers(include_mtp=True), model.moe_layers(include_mtp=True), strict=True):
        ours.dispatch = theirs.dispatch
    return plain.train(model.training)


def _param_index(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, nn.Parameter]:
    """Optimizer state-dict index -> parameter (indices run over the param groups in order)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return dict(enumerate(params))


@torch.no_grad()
def full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, info: ParallelInfo
                         ) -> dict[str, Any] | None:
    """optimizer.state_dict() as one process would have it (expert moments gathered to full (E, ...)), on
    world rank 0; None elsewhere. Collective. Parameter indices are unchanged by sharding, so the result
    loads into an optimizer over an unsharded model built the same way."""
    state = optimizer.state_dict()
    sharded = _sharded_names(model)
    experts = {id(p) for name, p in model.named_parameters() if name in sharded}
    index = _param_index(model, optimizer)
    out_state = {}
    for i in sorted(state["state"]):
        entry = state["state"][i]
        p = index[i]
        if id(p) in experts:
            entry = {k: _gather_to_main(v, info) if _is_shard(v, p) else v for k, v in entry.items()}
        out_state[i] = entry
    if not info.is_main:
        return None
    return {"state": out_state, "param_groups": state["param_groups"]}


def _is_shard(v: Any, p: torch.Tensor) -> bool:
    return isinstance(v, torch.Tensor) and v.shape == p.shape


def shard_optimizer_state(full: dict[str, Any], model: nn.Module, info: ParallelInfo,
                          optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Slice a full optimizer state dict (one process's, or `full_optimizer_state`'s) to this rank's
    experts, for `optimizer.load_state_dict` on a sharded model. Pure: no communication."""
    full = copy.copy(full)
    experts = {id(w): m for m in model.modules() if isinstance(m, ExpertParallelExperts) for w in (m.w1, m.w2, m.w3)}
    index = _param_index(model, optimizer)
    sliced = {}
    for i, entry in full["state"].items():
        p = index[int(i)]
        module = experts.get(id(p))
        if module is not None:
            lo, hi = module.local_experts.start, module.local_experts.stop
            entry = {k: v[lo:hi].clone() if isinstance(v, torch.Tensor) and v.ndim == p.ndim
                     and v.shape[0] == module.n_experts else v for k, v in entry.items()}
        sliced[i] = entry
    full["state"] = sliced
    return full


__all__ = ["all_gather_experts", "full_state_dict", "unshard_experts", "full_optimizer_state",
           "shard_optimizer_state"]

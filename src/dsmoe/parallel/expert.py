"""Expert parallelism: each rank of an EP group holds E/ep routed experts; tokens travel by all-to-all.

Shape legend: T tokens on this rank, D hidden, K experts per token, E routed experts, C = E/ep experts per
rank, R rows this rank sends, R' rows it receives, P (row, slot) pairs it computes.

The router is replicated (every rank scores its own tokens against all E experts exactly as one process
would); only `moe.experts` is replaced, by `ExpertParallelExperts`, whose forward has the signature of
`Experts.forward`. One MoE layer on one rank:

  1. a "row" is a distinct (token, destination rank) pair: a token is sent once to every rank that holds
     at least one of its K experts, with K local expert ids (-1 for slots that live elsewhere, or that
     token dropping removed) and the K gate weights (0 elsewhere);
  2. all-to-all of the row counts, then of the rows (hidden vectors, and the ids + weights);
  3. the receiving rank runs its experts on its (row, slot) pairs with the same dispatch function as a
     single process (`dsmoe.ops.dispatch.DISPATCH`, local expert ids), weights them, and sums each row's
     slots, so one vector per row goes back;
  4. all-to-all back, and `index_add` into the (T, D) output.

Both data all-to-alls are `torch.autograd.Function`s whose backward is the reverse all-to-all, so a
backward pass crosses ranks exactly like the forward. Collectives must be issued in the same order on
every rank of the group; the two all-to-all nodes of a layer depend on each other (dispatch -> local
experts -> combine) and on the previous / next layer, so backward visits them in one fixed order. A rank
that receives no row still keeps that chain connected (see `_local_experts`), otherwise its backward
would skip a collective the others wait in.

Numerics: the result equals a single process's up to the order of the fp32 sums (each rank sums its own
slots first). With a low-precision x, each rank's partial sum is rounded to x's dtype before travelling back.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..model import Routing, Transformer
from ..ops.dispatch import DISPATCH
from .groups import ParallelInfo, check_ep_divides_experts


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of several (rows, ...) tensors with the same split sizes; backward sends the
    gradients back the same way (output splits <-> input splits)."""

    @staticmethod
    def forward(ctx: Any, out_splits: list[int], in_splits: list[int], group: Any, *tensors: torch.Tensor):
        ctx.splits = (out_splits, in_splits, group)
        return tuple(_exchange(t, out_splits, in_splits, group) for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor):
        # Gradients of unused outputs arrive as zeros (materialize_grads, the default): every rank must run
        # every exchange, whether or not it has a gradient to send.
        out_splits, in_splits, group = ctx.splits
        return (None, None, None, *(_exchange(g, in_splits, out_splits, group) for g in grads))


def _exchange(t: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    t = t.contiguous()
    out = t.new_empty((sum(out_splits), *t.shape[1:]))
    dist.all_to_all_single(out, t, out_splits, in_splits, group=group)
    return out


def all_to_all(tensors: list[torch.Tensor], out_splits: list[int], in_splits: list[int], group: Any
               ) -> tuple[torch.Tensor, ...]:
    """Differentiable all-to-all: rows [sum(in_splits[:j]), ...) of each tensor go to rank j of `group`,
    and this rank receives out_splits[j] rows from rank j."""
    return _AllToAll.apply(out_splits, in_splits, group, *tensors)


def exchange_counts(send: torch.Tensor, group: Any) -> torch.Tensor:
    """send (ep,) int64 rows for each rank -> (ep,) rows this rank receives from each rank."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send.contiguous(), group=group)
    return recv


class ExpertParallelExperts(nn.Module):
    """This rank's slice of the stacked experts, w1/w2/w3 of shape (C, I, D)/(C, D, I)/(C, I, D) under the
    same names as `Experts`, so state_dict keys are unchanged (shapes local). forward(x, routing, dispatch)
    -> (T, D), like `Experts.forward`, with the all-to-all described in the module doc."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, n_experts: int,
                 info: ParallelInfo) -> None:
        super().__init__()
        self.w1 = nn.Parameter(w1)
        self.w2 = nn.Parameter(w2)
        self.w3 = nn.Parameter(w3)
        self.n_experts = n_experts  # E, over the whole EP group
        self.ep_size, self.ep_rank, self.group = info.ep_size, info.ep_rank, info.ep_group
        self.first = info.ep_rank * w1.shape[0]  # global id of local expert 0

    @property
    def local_experts(self) -> range:
        return range(self.first, self.first + self.w1.shape[0])

    def __deepcopy__(self, memo: dict) -> "ExpertParallelExperts":
        """Copies share the process group (which cannot be copied) and copy everything else."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = value if key == "group" else copy.deepcopy(value, memo)
        return new

    def extra_repr(self) -> str:
        return f"experts {self.first}..{self.first + self.w1.shape[0] - 1} of {self.n_experts}, ep_rank {self.ep_rank}"

    def forward(self, x: torch.Tensor, routing: Routing, dispatch: str = "sorted") -> torch.Tensor:
        T, D = x.shape
        K = routing.indices.shape[1]
        C, ep = self.w1.shape[0], self.ep_size
        indices = routing.indices.long()  # (T, K) global expert ids
        dest = indices // C  # (T, K) rank holding each pick
        kept = torch.ones_like(dest, dtype=torch.bool) if routing.keep is None else routing.keep  # (T, K)
        # a pair dropped by a capacity sends nothing: a token goes to the ranks of its kept picks
        hit = torch.zeros(T, ep, dtype=torch.int32, device=x.device).scatter_add_(1, dest, kept.int()) > 0  # (T, ep)
        rank_of_row, token_of_row = hit.t().nonzero(as_tuple=True)  # (R,), ordered by rank, then token
        send = hit.sum(dim=0)  # (ep,) rows for each rank
        recv = exchange_counts(send, self.group)
        send_splits, recv_splits = send.tolist(), recv.tolist()

        # (R, K) kept slots held by the row's rank
        mine = (dest.index_select(0, token_of_row) == rank_of_row[:, None]) & kept.index_select(0, token_of_row)
        local_ids = indices.index_select(0, token_of_row) - rank_of_row[:, None] * C  # (R, K)
        ids = torch.where(mine, local_ids, -1).float()  # exact for any realistic expert count (< 2**24)
        weights = torch.where(mine, routing.weights.index_select(0, token_of_row), 0.0)  # (R, K) fp32
        rows = x.index_select(0, token_of_row)  # (R, D)
        rows_in, meta_in = all_to_all([rows, torch.cat((weights.float(), ids), dim=1)],
                                      recv_splits, send_splits, self.group)  # (R', D), (R', 2K)
        y = self._local_experts(rows_in, meta_in, K, dispatch)  # (R', D)
        (back,) = all_to_all([y], send_splits, recv_splits, self.group)  # (R, D)
        out = torch.zeros(T, D, dtype=torch.float32, device=x.device)
        return out.index_add_(0, token_of_row, back.float()).to(x.dtype)

    def _local_experts(self, rows: torch.Tensor, meta: torch.Tensor, K: int, dispatch: str) -> torch.Tensor:
        """rows (R', D), meta (R', 2K) = [weights | local ids] -> (R', D) weighted sum over each row's slots."""
        weights, ids = meta[:, :K], meta[:, K:].long()
        row, slot = (ids >= 0).nonzero(as_tuple=True)  # (P,) pairs
        if row.numel() == 0:
            # Nothing to compute, but the combine all-to-all must still depend on the dispatch one, so that
            # backward runs both here too (the other ranks wait in them).
            return rows * 0 + meta[:, :1].to(rows.dtype) * 0
        y = DISPATCH[dispatch](rows.index_select(0, row), ids[row, slot][:, None], weights[row, slot][:, None],
                               self.w1, self.w2, self.w3)  # (P, D) already weighted
        out = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
        return out.index_add_(0, row, y.float()).to(rows.dtype)


# ---------------------------------------------------------------------------------------------- sharding

@dataclass(frozen=True)
class ShardPlan:
    """What `shard_experts` did, and how the router's groups map onto the EP ranks.

    Groups of group-limited routing (V2 `group_limited_greedy`, V3 `noaux_tc`) are n_group contiguous
    blocks of E/n_group experts; rank r holds experts [r*C, (r+1)*C). The mapping:
      n_group a multiple of ep   each rank holds n_group/ep whole groups (n_group == ep: one group per
                                 rank, i.e. V2's device-limited routing with M = topk_group devices, V3's
                                 node-limited routing with a node per rank): a token reaches at most
                                 min(K, topk_group) ranks.
      ep a multiple of n_group   each group spans ep/n_group ranks -- a node of them, which is V3's own
                                 deployment (node-limited routing, NVLink inside a node): at most
                                 topk_group nodes, min(K, topk_group*ep/n_group) ranks.
      neither                    groups straddle rank boundaries unevenly; the bound is computed exactly
                                 (a warning: the group limit no longer means whole devices).
    Routing is replicated, so results are exact whatever the mapping: a mapping that does not fit only
    weakens the communication bound, so it is reported in `warnings` (for the CLI to show), not raised.
    """

    ep_size: int
    ep_rank: int
    n_experts: int
    experts_per_rank: int
    local_experts: range
    layers: int  # MoE layers sharded (MTP included)
    groups_per_rank: float | None  # n_group / ep when routing is group-limited, else None
    max_ranks_per_token: int  # distinct EP ranks one token can reach in one MoE layer
    mapping: str  # one line: how routing groups sit on the ranks
    warnings: tuple[str, ...] = ()


def max_ranks_per_token(config, ep: int) -> int:
    """The most distinct ranks a token's K experts can live on, under the router's group limit."""
    E, K = config.n_routed_experts, config.num_experts_per_tok
    if not config.group_limited:
        return min(K, ep)
    n_group, M = config.n_group, config.topk_group
    G, C = E // n_group, E // ep
    ranks_of_group = [set(range(g * G // C, ((g + 1) * G - 1) // C + 1)) for g in range(n_group)]
    if n_group % ep == 0 or ep % n_group == 0:  # every group covers the same number of ranks, disjointly
        reach = M * len(ranks_of_group[0])
    elif math.comb(n_group, M) <= 100_000:
        reach = max(len(set().union(*(ranks_of_group[g] for g in s)))
                    for s in itertools.combinations(range(n_group), M))
    else:  # an upper bound: the M widest groups, counting shared ranks twice
        reach = sum(sorted((len(r) for r in ranks_of_group), reverse=True)[:M])
    return min(K, ep, reach)


def routing_mapping(config, ep: int) -> tuple[str, tuple[str, ...]]:
    """How the router's groups sit on the EP ranks: (a one-line description, warnings). See ShardPlan."""
    if not config.group_limited:
        return f"no group limit: a token reaches up to {max_ranks_per_token(config, ep)} of {ep} ranks", ()
    n_group, M = config.n_group, config.topk_group
    cap = max_ranks_per_token(config, ep)
    if n_group % ep == 0:
        per = n_group // ep
        return (f"{per} whole routing group{'s' if per > 1 else ''} per rank: topk_group={M} limits a token "
                f"to {cap} of {ep} ranks (device-limited routing)"), ()
    if ep % n_group == 0:
        return (f"each routing group spans {ep // n_group} ranks (a node each, as V3's node-limited routing): "
                f"topk_group={M} limits a token to {M} nodes, {cap} of {ep} ranks"), ()
    return (f"routing groups straddle rank boundaries: a token may reach {cap} of {ep} ranks",
            (f"n_group={n_group} and --ep {ep} do not divide one another: routing groups straddle rank "
             f"boundaries, so topk_group={M} no longer limits a token to whole devices (it may reach {cap} "
             f"ranks); results are unaffected, choose --ep dividing n_group (or a multiple of it) to keep "
             f"device-limited communication",))


def shard_experts(model: Transformer, info: ParallelInfo) -> ShardPlan:
    """Keep only this EP rank's E/ep experts in every MoE layer (MTP included), in place.

    Call it on a full model that is identical on every rank (same seed, or the same checkpoint), before
    creating the optimizer. With ep_size 1 the model is left as it is. Raises ValueError if ep does not
    divide n_routed_experts, or if the model is already sharded.
    """
    config = model.config
    layers = model.moe_layers(include_mtp=True)
    if not layers:
        raise ValueError("--ep needs a model with MoE layers")
    E, ep = config.n_routed_experts, info.ep_size
    check_ep_divides_experts(ep, E)
    C = E // ep
    lo = info.ep_rank * C
    if ep > 1:
        for moe in layers:
            experts = moe.experts
            if isinstance(experts, ExpertParallelExperts):
                raise ValueError("the model's experts are already sharded")
            with torch.no_grad():
                parts = [w.detach()[lo:lo + C].clone() for w in (experts.w1, experts.w2, experts.w3)]
            sharded = ExpertParallelExperts(*parts, n_experts=E, info=info)
            for p, old in zip(sharded.parameters(), experts.parameters()):
                p.requires_grad_(old.requires_grad)
            moe.experts = sharded  # same slot in _modules: parameter order and state_dict keys unchanged
    limited = config.group_limited
    mapping, warnings = routing_mapping(config, ep)
    return ShardPlan(ep_size=ep, ep_rank=info.ep_rank, n_experts=E, experts_per_rank=C,
                     local_experts=range(lo, lo + C), layers=len(layers),
                     groups_per_rank=config.n_group / ep if limited else None,
                     max_ranks_per_token=max_ranks_per_token(config, ep), mapping=mapping, warnings=warnings)


def expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> routed-experts module (sharded or not) of every MoE layer, MTP included."""
    from ..model.moe import Experts

    return {name: m for name, m in model.named_modules() if isinstance(m, (Experts, ExpertParallelExperts))}


def expert_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in named_parameters / state_dict) of the routed experts' stacked weights."""
    return {f"{name}.{p}" for name, m in expert_modules(model).items() for p, _ in m.named_parameters()}

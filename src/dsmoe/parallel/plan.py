"""The expert-parallel calculator behind `dsmoe info PRESET --ep N`: per-rank parameters and memory, and
the all-to-all traffic per token, in closed form from the config (nothing is built, nothing communicates).

Traffic model (what `ExpertParallelExperts` sends): in each MoE layer a token's hidden vector (D elements)
goes once to every *remote* EP rank that holds at least one of its K experts, and one combined vector (D
elements) comes back from each. The K ids and weights that travel with it (2K fp32 values per row) are
left out of the byte counts.

"Uniform routing" is the balanced case the losses aim for: the eligible groups are a uniformly random
choice of topk_group of the n_group groups (all of them for greedy routing), the K experts a uniformly
random K-subset of the eligible experts, and the token lives on a uniformly random rank. Then, with
c_j the eligible experts on rank j and U = topk_group * E / n_group,

    P(rank j receives the token) = E_S[1 - C(U - c_j, K) / C(U, K)]

(the expectation over the group choice S is a small knapsack over the groups), the expected number of
distinct ranks is the sum over j, and the expected remote ranks are (ep - 1) / ep of it.
tests/test_parallel.py checks this against an enumeration of every case and against the real router.
"""

from __future__ import annotations

import math
from typing import Any

from ..calc import arch_stats, expert_params
from ..config import ModelConfig
from .expert import max_ranks_per_token, routing_mapping
from .groups import check_ep_divides_experts


def _overlap(a0: int, a1: int, b0: int, b1: int) -> int:
    return max(0, min(a1, b1) - max(a0, b0))


def _check(config: ModelConfig, ep: int) -> None:
    if not config.is_moe:
        raise ValueError("--ep needs a mixture-of-experts model (n_routed_experts > 0)")
    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
        raise ValueError(f"--ep must be a positive integer, got {ep!r}")
    check_ep_divides_experts(ep, config.n_routed_experts)


def rank_hit_probabilities(config: ModelConfig, ep: int) -> list[float]:
    """P(EP rank j holds at least one of a token's K experts) under uniform routing, for each rank j."""
    _check(config, ep)
    E, K = config.n_routed_experts, config.num_experts_per_tok
    n_group, M = (config.n_group, config.topk_group) if config.group_limited else (1, 1)
    G, C = E // n_group, E // ep
    U = M * G  # eligible experts
    if K > U:
        raise ValueError(f"num_experts_per_tok={K} exceeds the {U} experts of topk_group={M} groups")
    choices = math.comb(n_group, M)
    probs = []
    for j in range(ep):
        sizes = [_overlap(g * G, (g + 1) * G, j * C, (j + 1) * C) for g in range(n_group)]
        ways = [[0] * (C + 1) for _ in range(M + 1)]  # ways[m][c]: m groups chosen, c of rank j's experts eligible
        ways[0][0] = 1
        for g, size in enumerate(sizes):
            for m in range(min(g + 1, M), 0, -1):
                row, prev = ways[m], ways[m - 1]
                for c in range(C, size - 1, -1):
                    row[c] += prev[c - size]
        miss = sum(ways[M][c] * math.comb(U - c, K) for c in range(min(C, U) + 1))
        probs.append(1.0 - miss / (choices * math.comb(U, K)))
    return probs


def ep_plan(config: ModelConfig, ep: int, dtype_bytes: int = 2, include_mtp: bool = True) -> dict[str, Any]:
    """Per-rank parameters and memory, and all-to-all bytes per token, for `ep`-way expert parallelism.

    Parameters count the MTP modules when include_mtp (what a training rank holds); router correction
    biases (buffers) are left out. weight_bytes: parameters at dtype_bytes each; train_bytes: fp32 weights
    + fp32 gradients + AdamW's two fp32 moments (16 bytes a parameter), activations excluded.
    All-to-all bytes are per token per MoE layer, dispatch plus combine, at dtype_bytes per element;
    `_total` multiplies by the MoE layers (MTP included when include_mtp).
    """
    _check(config, ep)
    stats = arch_stats(config)
    n_mtp = config.num_nextn_predict_layers if include_mtp else 0
    moe_layers = stats.num_moe_layers + sum(config.is_moe_layer(config.num_hidden_layers + k) for k in range(n_mtp))
    total = stats.total_params + (stats.mtp_params if include_mtp else 0)
    routed = moe_layers * config.n_routed_experts * expert_params(config)
    replicated = total - routed
    local = routed // ep
    per_rank = replicated + local

    K, D = config.num_experts_per_tok, config.hidden_size
    distinct = sum(rank_hit_probabilities(config, ep))
    remote = distinct * (ep - 1) / ep
    cap = max_ranks_per_token(config, ep)
    vector = 2 * D * dtype_bytes  # one hidden vector out, one combined vector back
    per_layer = vector * remote
    mapping, warnings = routing_mapping(config, ep)
    return {
        "ep": ep,
        "experts_per_rank": config.n_routed_experts // ep,
        "moe_layers": moe_layers,
        "total_params": total,
        "replicated_params": replicated,
        "expert_params_per_rank": local,
        "params_per_rank": per_rank,
        "dtype_bytes": dtype_bytes,
        "weight_bytes_per_rank": per_rank * dtype_bytes,
        "train_bytes_per_rank": per_rank * 16,
        "max_ranks_per_token": cap,
        "expected_ranks_per_token": distinct,
        "expected_remote_ranks_per_token": remote,
        "alltoall_bytes_per_token_per_layer": per_layer,
        "alltoall_bytes_per_token_per_layer_max": vector * min(cap, ep - 1),
        "alltoall_bytes_per_token_per_layer_undeduplicated": vector * K * (ep - 1) / ep,
        "alltoall_bytes_per_token_total": per_layer * moe_layers,
        "routing_mapping": mapping,
        "warnings": list(warnings),
    }

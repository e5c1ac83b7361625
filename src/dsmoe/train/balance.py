"""Load balancing for MoE training: auxiliary losses, the V3 bias update, load metrics (token dropping:
`dsmoe.ops.capacity`).

Every function here is pure (apart from `update_routing_bias`, which updates a buffer in place) and takes
router outputs, i.e. the fields of `dsmoe.model.moe.Routing` kept by each MoE layer after a forward:

    scores   (T, E) fp32 softmax / sigmoid scores, unbiased; the losses are differentiable through them
    indices  (T, K) picked experts (integers: the counts built from them carry no gradient)
    logits   (T, E) fp32 raw router logits (Mixtral's loss re-applies the softmax itself)

Notation (DESIGN.md, "Balancing and MTP formulas"): T tokens, N = E routed experts, K picked per token,
s[i,t] the score of expert i for token t, 1[i,t] = 1 if token t picked expert i, D devices holding N/D
contiguous experts each, M the most devices a token may reach.

Every loss takes its coefficient (`alpha`, Mixtral: `coef`) and returns the scaled scalar, so the trainer
adds the results as they are: `loss = ce + sum(balance losses)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "expert_balance_loss",
    "mixtral_balance_loss",
    "device_balance_loss",
    "communication_balance_loss",
    "sequence_balance_loss",
    "expert_load",
    "load_metrics",
    "update_routing_bias",
]


# ---------------------------------------------------------------------------------------------- helpers
def _check_routing(scores: torch.Tensor, indices: torch.Tensor, n_experts: int, top_k: int) -> int:
    """Validate (T, E) scores against (T, K) indices; returns T."""
    if n_experts <= 0:
        raise ValueError(f"n_experts must be positive, got {n_experts}")
    if top_k <= 0 or top_k > n_experts:
        raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
    if scores.ndim != 2 or scores.shape[1] != n_experts:
        raise ValueError(f"scores must be (tokens, n_experts={n_experts}), got shape {tuple(scores.shape)}")
    if indices.ndim != 2 or indices.shape[1] != top_k:
        raise ValueError(f"indices must be (tokens, top_k={top_k}), got shape {tuple(indices.shape)}")
    if indices.shape[0] != scores.shape[0]:
        raise ValueError(f"scores has {scores.shape[0]} tokens but indices has {indices.shape[0]}")
    if scores.shape[0] == 0:
        raise ValueError("balance losses need at least one token")
    return scores.shape[0]


def _f_and_p(scores: torch.Tensor, indices: torch.Tensor, n_experts: int, top_k: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """f_i = N/(K*T) * sum_t 1[i,t] (no gradient) and P_i = 1/T * sum_t s[i,t], both (E,)."""
    T = _check_routing(scores, indices, n_experts, top_k)
    f = expert_load(indices, n_experts).float() * (n_experts / (top_k * T))  # (E,)
    p = scores.float().mean(dim=0)  # (E,)
    return f, p


def _check_devices(n_experts: int, n_devices: int) -> int:
    """Experts per device; D must divide N (one equal, contiguous group of experts per device)."""
    if n_devices <= 0:
        raise ValueError(f"n_devices must be positive, got {n_devices}")
    if n_experts % n_devices:
        raise ValueError(f"n_devices={n_devices} does not divide n_experts={n_experts}: "
                         "experts must split into equal groups, one per device")
    return n_experts // n_devices


# ---------------------------------------------------------------------------------------------- losses
def expert_balance_loss(scores: torch.Tensor, indices: torch.Tensor, n_experts: int, top_k: int,
                        alpha: float = 1.0) -> torch.Tensor:
    """Expert-level balance loss (DeepSeekMoE section 4.2; DeepSeek-V2 section 2.2.3, eq. 12-14).

        L = alpha * sum_i f_i * P_i,   f_i = N/(K*T) * sum_t 1[i,t],   P_i = 1/T * sum_t s[i,t]

    scores (T, E) softmax (V1/V2) or sigmoid scores; indices (T, K). A perfectly uniform router gives
    L = alpha (f_i = 1, P_i = 1/N for softmax scores). Returns a 0-dim fp32 tensor.
    """
    f, p = _f_and_p(scores, indices, n_experts, top_k)
    return alpha * (f * p).sum()


def mixtral_balance_loss(logits: torch.Tensor | Sequence[torch.Tensor], indices: torch.Tensor | Sequence[torch.Tensor],
                         n_experts: int, top_k: int, coef: float = 1.0) -> torch.Tensor:
    """Mixtral's Switch-style loss, as transformers' `load_balancing_loss_func` computes it (no mask).

    Switch Transformer eq. 4-6 with K picks:  L = coef * N * sum_i (c_i / T) * mean_t softmax(logits)[t, i],
    c_i = number of picks of expert i (so sum_i c_i / T = K; this is K times `expert_balance_loss`).

    logits (T, E) raw router logits, or one (T_l, E) tensor per layer; indices (T, K) or one per layer.
    Several layers are pooled as transformers does (counts and probabilities summed over every layer's
    rows, then divided by the total row count), which is not the mean of the per-layer losses.
    transformers re-picks the experts with top-k of the softmax; pass the router's picks (identical for
    Mixtral, whose router takes top-k of the logits). Multiply by `router_aux_loss_coef` via `coef`.
    """
    if not isinstance(logits, torch.Tensor):
        logits = torch.cat(list(logits), dim=0)  # (sum_l T_l, E)
    if not isinstance(indices, torch.Tensor):
        indices = torch.cat(list(indices), dim=0)  # (sum_l T_l, K)
    T = _check_routing(logits, indices, n_experts, top_k)
    probs = F.softmax(logits.float(), dim=-1)  # (T, E) over all experts, not just the K picked
    tokens_per_expert = expert_load(indices, n_experts).float() / T  # (E,)
    router_prob_per_expert = probs.mean(dim=0)  # (E,)
    return coef * n_experts * (tokens_per_expert * router_prob_per_expert).sum()


def device_balance_loss(scores: torch.Tensor, indices: torch.Tensor, n_experts: int, top_k: int,
                        n_devices: int, alpha: float = 1.0) -> torch.Tensor:
    """Device-level balance loss (DeepSeek-V2 section 2.2.3, eq. 15-17; DeepSeekMoE section 4.2).

        L = alpha * sum_d f'_d * P'_d,   f'_d = 1/|E_d| * sum_{j in E_d} f_j,   P'_d = sum_{j in E_d} P_j

    with f_j, P_j as in `expert_balance_loss` and E_d the d-th of D equal contiguous groups of experts
    (experts d*N/D .. (d+1)*N/D - 1 live on device d). Raises ValueError if n_devices does not divide N.
    """
    per_device = _check_devices(n_experts, n_devices)
    f, p = _f_and_p(scores, indices, n_experts, top_k)
    f_dev = f.view(n_devices, per_device).mean(dim=1)  # (D,)
    p_dev = p.view(n_devices, per_device).sum(dim=1)  # (D,)
    return alpha * (f_dev * p_dev).sum()


def communication_balance_loss(scores: torch.Tensor, indices: torch.Tensor, n_experts: int, top_k: int,
                               n_devices: int, max_devices: int, alpha: float = 1.0) -> torch.Tensor:
    """Communication balance loss (DeepSeek-V2 section 2.2.3, eq. 18-20).

        L = alpha * sum_d f''_d * P''_d,   f''_d = D/(M*T) * sum_t 1[token t is sent to device d],
        P''_d = sum_{j in E_d} P_j

    A token is sent to device d when at least one of its K experts lives there (it is sent once however
    many of its experts d holds). M = max_devices is the device limit of device-limited routing
    (`group_limited_greedy` with n_group = D, topk_group = M): each token reaches at most M devices, so
    f''_d = 1 when every device receives its fair share. Raises ValueError if D does not divide N, or if
    max_devices is not in [1, n_devices].
    """
    per_device = _check_devices(n_experts, n_devices)
    if not 1 <= max_devices <= n_devices:
        raise ValueError(f"max_devices must be in [1, n_devices={n_devices}], got {max_devices}")
    T = _check_routing(scores, indices, n_experts, top_k)
    device = indices.long() // per_device  # (T, K) device of each pick
    sent = torch.zeros(T, n_devices, dtype=torch.bool, device=indices.device).scatter_(1, device, True)  # (T, D)
    f_dev = sent.float().sum(dim=0) * (n_devices / (max_devices * T))  # (D,)
    p_dev = scores.float().mean(dim=0).view(n_devices, per_device).sum(dim=1)  # (D,)
    return alpha * (f_dev * p_dev).sum()


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, batch: int, seq_len: int,
                          n_experts: int, top_k: int, alpha: float = 1.0) -> torch.Tensor:
    """Complementary sequence-wise balance loss (DeepSeek-V3 section 2.1.2, eq. 17-20).

    For each sequence of T = seq_len tokens:
        s'[i,t] = s[i,t] / sum_j s[j,t]       (sigmoid scores normalised per token)
        f_i = N/(K*T) * sum_t 1[i,t],   P_i = 1/T * sum_t s'[i,t],   L_seq = sum_i f_i * P_i
    and L = alpha * mean over the batch of L_seq (the paper uses alpha = 0.0001).

    scores (batch*seq_len, E) and indices (batch*seq_len, K), rows ordered (batch, position) flattened, as
    the MoE layer sees a (B, T, D) input. With softmax scores the normalisation is a no-op, so this is also
    DeepSeekMoE/V2's `seq_aux` loss.
    """
    T = _check_routing(scores, indices, n_experts, top_k)
    if batch <= 0 or seq_len <= 0 or batch * seq_len != T:
        raise ValueError(f"batch={batch} * seq_len={seq_len} must equal the number of routed tokens {T}")
    s = scores.float().view(batch, seq_len, n_experts)  # (B, S, E)
    s = s / s.sum(dim=-1, keepdim=True)  # s'
    idx = indices.long().view(batch, seq_len * top_k)  # (B, S*K)
    counts = torch.zeros(batch, n_experts, dtype=torch.float32, device=indices.device).scatter_add_(
        1, idx, torch.ones(idx.shape, dtype=torch.float32, device=indices.device))  # (B, E)
    f = counts * (n_experts / (top_k * seq_len))  # (B, E)
    p = s.mean(dim=1)  # (B, E)
    return alpha * (f * p).sum(dim=1).mean()


# ---------------------------------------------------------------------------------------------- load
def expert_load(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: indices (T, K) -> (E,) int64 counts (sum = T*K). scatter_add, not
    bincount: no device-to-host sync.

    Sum it over data-parallel ranks (all_reduce) before `update_routing_bias` or `load_metrics`."""
    flat = indices.reshape(-1).long()
    return torch.zeros(n_experts, dtype=torch.int64, device=indices.device).scatter_add_(
        0, flat, torch.ones_like(flat))


def load_metrics(load: torch.Tensor) -> dict[str, float]:
    """Balance metrics of one layer's load (E,) (DeepSeek-V3 section 4.5.2 uses MaxVio).

    max_vio = (max_i load_i - mean) / mean;  cv = std / mean (population std);  dead = experts with no
    token;  min, max = extreme loads. With no tokens at all, max_vio and cv are 0.
    """
    if load.ndim != 1 or load.numel() == 0:
        raise ValueError(f"load must be a non-empty (n_experts,) tensor, got shape {tuple(load.shape)}")
    x = load.detach().to(torch.float64)
    mean = float(x.mean())
    lo, hi = float(x.min()), float(x.max())
    std = float(x.std(unbiased=False))
    return {
        "max_vio": (hi - mean) / mean if mean > 0 else 0.0,
        "cv": std / mean if mean > 0 else 0.0,
        "dead": int((x == 0).sum()),
        "min": lo,
        "max": hi,
    }


@torch.no_grad()
def update_routing_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float = 0.001) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3 section 2.1.2): after each step, in place,

        b_i += gamma * sign(mean_j load_j - load_i)

    so overloaded experts become less likely to be picked and underloaded ones more. The bias only
    affects selection (the router adds it to the scores before top-k, never to the gate weights).
    bias (E,) the router's `e_score_correction_bias` buffer; load (E,) counts over the global batch.
    """
    if bias.shape != load.shape or bias.ndim != 1:
        raise ValueError(f"bias {tuple(bias.shape)} and load {tuple(load.shape)} must both be (n_experts,)")
    x = load.to(device=bias.device, dtype=torch.float64)
    bias.add_(torch.sign(x.mean() - x).to(bias.dtype), alpha=gamma)

"""DeepSeek-V4's MoE (V4 report section 2.1): hash-routed and top-k routed layers, sqrt-softplus scores, and
the clamped SwiGLU of its experts.

* `moe` layers: scores s = sqrtsoftplus(logits) = sqrt(softplus(x W^T)) (or softmax / sigmoid), picks = top-k of
  s + bias (the V3 correction bias, selection only), weights = s at the picks, renormalised, times
  routed_scaling_factor.
* `hash_moe` layers: the picks are a frozen table `tid2eid[token id]` (vocab, k) - no learned selection, so
  nothing to balance; the weights are still the renormalised scores of the learned gate at those picks.
* every expert and the shared expert: w2(silu(min(w1 x, limit)) * clamp(w3 x, -limit, limit)), limit =
  `swiglu_limit` (transformers' DeepseekV4Experts / DeepseekV4MLP).
Output = sum_k g_k expert_k(x) + shared(x). Logits and scores in fp32.

Shape legend: T tokens (batch flattened), D hidden, E routed experts, K experts per token, I expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import Linear
from .moe import Routing

SCORES = {
    "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
    "sigmoid": torch.sigmoid,
    "softmax": lambda x: x.softmax(dim=-1),
}


def clamped_swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                   limit: float) -> torch.Tensor:
    """x (n, D), w1/w3 (I, D), w2 (D, I) -> (n, D): gate clamped above at limit, up clamped to +-limit."""
    gate = F.linear(x, w1).clamp(max=limit)
    up = F.linear(x, w3).clamp(min=-limit, max=limit)
    return F.linear(F.silu(gate) * up, w2)


class ClampedMLP(nn.Module):
    """The shared expert (names w1 / w2 / w3)."""

    def __init__(self, dim: int, inter_dim: int, limit: float) -> None:
        super().__init__()
        self.limit = limit
        self.w1 = Linear(dim, inter_dim, bias=False)
        self.w2 = Linear(inter_dim, dim, bias=False)
        self.w3 = Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return clamped_swiglu(x, self.w1.weight, self.w2.weight, self.w3.weight, self.limit)


class V4Router(nn.Module):
    """Gate of one V4 MoE layer: `weight` (E, D); `bias` (E,) for top-k layers, `tid2eid` (vocab, K) for hash
    layers (both buffers, saved with the checkpoint)."""

    def __init__(self, config: ModelConfig, hashed: bool) -> None:
        super().__init__()
        self.hashed, self.top_k, self.n_experts = hashed, config.num_experts_per_tok, config.n_routed_experts
        self.score = SCORES[config.scoring_func]
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        if hashed:
            self.bias = None
            self.tid2eid = nn.Buffer(torch.zeros(config.vocab_size, self.top_k, dtype=torch.long))
        else:
            self.bias = nn.Buffer(torch.zeros(self.n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None) -> Routing:
        """x (T, D), ids (T,) token ids (hash layers need them) -> Routing."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())  # (T, E)
        scores = self.score(logits)
        if self.hashed:
            if ids is None:
                raise ValueError("a hash_moe layer routes by token id: pass input_ids")
            indices = self.tid2eid[ids.reshape(-1)].long()  # (T, K)
        else:
            indices = (scores + self.bias).topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * self.scaling
        return Routing(weights, indices, scores, logits)


class V4MoE(nn.Module):
    """y = sum_k g_k expert_k(x) + shared(x), experts stacked (E, I, D) / (E, D, I) as w1, w2, w3."""

    def __init__(self, config: ModelConfig, hashed: bool) -> None:
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.limit = config.swiglu_limit
        self.gate = V4Router(config, hashed)
        self.experts = nn.Module()
        self.experts.w1 = nn.Parameter(torch.empty(E, I, D))
        self.experts.w2 = nn.Parameter(torch.empty(E, D, I))
        self.experts.w3 = nn.Parameter(torch.empty(E, I, D))
        self.shared_experts = ClampedMLP(D, I * config.n_shared_experts, self.limit)
        self.last_routing: Routing | None = None

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (T, D)
        routing = self.gate(flat, ids)
        self.last_routing = routing if torch.is_grad_enabled() else routing._replace(scores=None, logits=None)
        out = torch.zeros_like(flat, dtype=torch.float32)
        ex = self.experts
        for e in routing.indices.unique().tolist():  # sorted: tokens of one expert in one matmul
            token, slot = torch.where(routing.indices == e)
            y = clamped_swiglu(flat[token], ex.w1[e], ex.w2[e], ex.w3[e], self.limit)
            out.index_add_(0, token, y.float() * routing.weights[token, slot, None])
        return (out.to(x.dtype) + self.shared_experts(flat)).view(shape)

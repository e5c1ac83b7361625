"""Mixture-of-Experts FFN: router (every scoring / selection mode), stacked routed experts, shared experts.

Shape legend: T tokens (batch flattened), D hidden, E routed experts, K experts per token, I expert width.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..ops.capacity import TokenDropping
from ..ops.cpu_kernels import small_batch_kernels
from ..ops.dispatch import DISPATCH
from .layers import MLP


class Routing(NamedTuple):
    weights: torch.Tensor  # (T, K) fp32 gate weights, after normalisation and routed scaling
    indices: torch.Tensor  # (T, K) picked experts
    scores: torch.Tensor | None  # (T, E) fp32 softmax / sigmoid scores (unbiased): what balance losses use
    logits: torch.Tensor | None  # (T, E) fp32 raw router logits
    keep: torch.Tensor | None = None  # (T, K) bool: False for pairs dropped by a capacity (training only)


class Router(nn.Module):
    """Top-k gate. Logits in fp32.

    scoring_func: softmax (V1, V2, Mixtral) or sigmoid (V3).
    topk_method:
      greedy                plain top-k of the scores.
      group_limited_greedy  V2 device-limited routing: experts in n_group groups, a group scored by its
                            best expert, only the topk_group best groups are eligible (V2 section 2.2.2).
      noaux_tc              V3: a per-expert bias (e_score_correction_bias) is added for selection only;
                            a group is scored by the sum of its top-2 biased scores (V3 section 2.1.2).
    The gate weights are the unbiased scores at the picks, normalised if norm_topk_prob, then times
    routed_scaling_factor (V2: only when not normalised, as its reference gate does).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.scoring = config.scoring_func
        self.method = config.topk_method
        self.group_limited = config.group_limited
        self.n_group = config.n_group or 1
        self.topk_group = config.topk_group or 1
        self.normalise = config.renormalise_topk
        self.scaling = config.routed_scaling_factor
        # DeepSeek-V2's gate renormalises OR scales (its MoEGate: normalise if top_k > 1 and norm_topk_prob,
        # else multiply by routed_scaling_factor); V3's does both. Published V2 configs never renormalise.
        self.scale_after_normalising = config.model_type != "deepseek_v2"
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        # Only V3-style routing has a correction bias; it is a buffer (updated by the balancer, not SGD).
        self.bias = nn.Buffer(torch.zeros(self.n_experts, dtype=torch.float32)) if self.method == "noaux_tc" else None

    def kernel_settings(self) -> tuple[bool, int, int, int, int, bool, bool, float]:
        """This rule as the CPU kernels take it after (x, weight, bias) (ops/cpu/decode_kernels.cpp, `route`):
        (sigmoid, top_k, n_group, topk_group, group_mode (0 none, 1 V2's best expert, 2 V3's top-2 sum),
        normalise, scale, routed_scaling_factor)."""
        group_mode = 0 if not self.group_limited else (2 if self.method == "noaux_tc" else 1)
        return (self.scoring != "softmax", self.top_k, self.n_group, self.topk_group, group_mode, self.normalise,
                self.scale_after_normalising or not self.normalise, float(self.scaling))

    def forward(self, x: torch.Tensor) -> Routing:
        ops = None if self.training else small_batch_kernels(x, self.weight)
        if ops is not None:  # a decode step: the whole gate in one kernel call (no scores kept: inference)
            weights, indices = ops.route(x, self.weight, self.bias, *self.kernel_settings())
            return Routing(weights, indices, None, None)
        # Autocast (bf16 training) would run this linear in bf16: routing decisions and the balance losses
        # want fp32 scores (V3 section 3.3.1 keeps the gating in full precision).
        with torch.autocast(x.device.type, enabled=False):
            return self._route(F.linear(x.float(), self.weight.float()))  # logits (T, E)

    def _route(self, logits: torch.Tensor) -> Routing:
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        choice = scores if self.bias is None else scores + self.bias
        if self.group_limited:
            choice = self._limit_groups(choice)
        indices = choice.topk(self.top_k, dim=-1, sorted=False).indices  # (T, K)
        weights = scores.gather(1, indices)
        if self.normalise:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if self.scale_after_normalising or not self.normalise:
            weights = weights * self.scaling
        return Routing(weights, indices, scores, logits)

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Mask every expert outside the topk_group best groups."""
        grouped = choice.view(choice.shape[0], self.n_group, -1)  # (T, n_group, E / n_group)
        if self.method == "noaux_tc":
            group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)
            fill = float("-inf")
        else:
            group_score = grouped.amax(dim=-1)
            fill = 0.0  # as in the V2 reference: softmax scores are >= 0, masked ones lose the top-k
        keep = group_score.topk(self.topk_group, dim=-1, sorted=False).indices  # (T, topk_group)
        mask = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)  # True = drop
        return grouped.masked_fill(mask.unsqueeze(-1), fill).view_as(choice)


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: one tensor per projection, expert index first."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # gate_proj
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))  # down_proj
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # up_proj

    def forward(self, x: torch.Tensor, routing: Routing, dispatch: str = "sorted") -> torch.Tensor:
        return DISPATCH[dispatch](x, routing.indices, routing.weights, self.w1, self.w2, self.w3, routing.keep)


class MoE(nn.Module):
    """y = sum_k g_k * expert_k(x) + shared_experts(x)  (DeepSeekMoE section 3)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (MLP(config.hidden_size, config.shared_intermediate_size)
                               if config.n_shared_experts else None)
        self.dispatch = "sorted"  # "loop" selects the reference path (same results, slower)
        # The last forward's routing, for balance losses and load metrics. A forward in eval mode without
        # autograd (generation, evaluation) keeps only the picks and weights, not the (T, E) scores and
        # logits the balance losses need: a long prefill then holds no two fp32 (T, E) tensors per layer.
        self.last_routing: Routing | None = None
        # Token dropping (Switch Transformer; DeepSeek-V2 section 2.2.4), applied in train mode only: the
        # trainer sets the rule once and, before each step, which rows (sequences) of the (B, T) batch are
        # never dropped (dsmoe.train.loop). Inference never drops.
        self.token_dropping: TokenDropping | None = None
        self.protected_rows: torch.Tensor | None = None  # (B,) bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (T, D)
        routing = self.gate(flat)
        if self.training and self.token_dropping is not None:
            affinity = routing.scores.gather(1, routing.indices)  # the unbiased score of each pick
            keep = self.token_dropping.keep_mask(affinity, routing.indices, self.gate.n_experts,
                                                 self._protected_tokens(shape, x.device))
            routing = routing._replace(keep=keep)
        keep_scores = torch.is_grad_enabled() or self.training
        self.last_routing = routing if keep_scores else routing._replace(scores=None, logits=None)
        y = self.experts(flat, routing, self.dispatch)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(shape)

    def _protected_tokens(self, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
        """(B*T,) bool from protected_rows (B,) for an input of shape (B, T, D)."""
        rows = self.protected_rows
        if rows is None:
            return None
        if len(shape) != 3 or rows.shape != (shape[0],):
            raise ValueError(f"MoE.protected_rows has shape {tuple(rows.shape)}, but the input {tuple(shape)} "
                             f"is not a batch of {rows.shape[0]} sequences")
        return rows.to(device=device, dtype=torch.bool).repeat_interleave(shape[1])

"""Manifold-constrained hyper-connections (mHC; DeepSeek-V4 report section 2.2, after Xie et al., 2026).

The residual stream is widened to `hc_mult` (N) parallel streams h (B, T, N, D). Around each sub-layer
(attention, then MoE) one HyperConnection reads all N streams and produces, per token, from one linear map of
the RMS-normalised flattened streams:
* pre (N): sigmoid weights that collapse the streams into the sub-layer's input x = sum_j pre_j h_j;
* post (N): 2 * sigmoid weights that spread the sub-layer's output y back onto the streams;
* comb (N, N): the residual mixing, projected onto the doubly stochastic matrices (rows and columns summing
  to 1) by `hc_sinkhorn_iters` Sinkhorn-Knopp normalisations, so the mixing cannot amplify the residual;
and the new streams are h'_k = post_k * y + sum_j comb[j, k] h_j. The HyperHead collapses the streams once
more (sigmoid weights, no post/comb) before the final norm and the output head.

Numerics as transformers' DeepseekV4HyperConnection: the projection and Sinkhorn run in fp32, `hc_eps` is
added to pre and comb and to every normalising denominator. Checkpoint names: hc_{attn,ffn}_{fn,base,scale},
hc_head_{fn,base,scale}.

Shape legend: B batch, T tokens, N streams (hc_mult), D hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


def _flat_rms(h: torch.Tensor, eps: float) -> torch.Tensor:
    """h (B, T, N, D) -> the streams flattened and RMS-normalised without weight, fp32 (B, T, N*D)."""
    flat = h.flatten(2).float()
    return flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Sinkhorn-Knopp: (..., N, N) positive -> (approximately) doubly stochastic. Columns first, then
    (iters - 1) rounds of rows and columns, each denominator + eps (transformers' order)."""
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


class HyperConnection(nn.Module):
    """The mHC around one sub-layer: `fn` ((2+N)*N, N*D), `base` ((2+N)*N,), `scale` (3,)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        n, self.iters, self.hc_eps, self.norm_eps = (config.hc_mult, config.hc_sinkhorn_iters, config.hc_eps,
                                                     config.rms_norm_eps)
        self.n = n
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * config.hidden_size))
        self.base = nn.Parameter(torch.zeros((2 + n) * n))
        self.scale = nn.Parameter(torch.ones(3))

    def weights(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (B, T, N, D) -> pre (B, T, N), post (B, T, N), comb (B, T, N, N), all fp32."""
        n = self.n
        mixes = F.linear(_flat_rms(h, self.norm_eps), self.fn.float())  # (B, T, (2+N)N)
        pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        s = self.scale.float()
        pre = torch.sigmoid(pre_w * s[0] + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * s[1] + post_b)
        comb = torch.softmax(comb_w.unflatten(-1, (n, n)) * s[2] + comb_b.view(n, n), dim=-1) + self.hc_eps
        return pre, post, sinkhorn(comb, self.iters, self.hc_eps)

    def forward(self, h: torch.Tensor, sublayer) -> torch.Tensor:
        """h' = post * sublayer(collapse(h)) + comb^T h; sublayer maps (B, T, D) -> (B, T, D)."""
        pre, post, comb = self.weights(h)
        x = (pre.unsqueeze(-1) * h).sum(dim=2).to(h.dtype)  # (B, T, D)
        y = sublayer(x)
        return post.to(h.dtype).unsqueeze(-1) * y.unsqueeze(-2) + torch.matmul(comb.to(h.dtype).transpose(-1, -2), h)


class HyperHead(nn.Module):
    """Collapse the N streams before the final norm: x = sum_j (sigmoid(fn . rms(h) * scale + base)_j + eps) h_j."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        n = config.hc_mult
        self.hc_eps, self.norm_eps = config.hc_eps, config.rms_norm_eps
        self.fn = nn.Parameter(torch.empty(n, n * config.hidden_size))
        self.base = nn.Parameter(torch.zeros(n))
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, T, N, D) -> (B, T, D)."""
        mixes = F.linear(_flat_rms(h, self.norm_eps), self.fn.float())
        pre = torch.sigmoid(mixes * self.scale.float() + self.base.float()) + self.hc_eps
        return (pre.unsqueeze(-1) * h).sum(dim=2).to(h.dtype)

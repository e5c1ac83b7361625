"""DeepSeek-V4's multi-token-prediction (MTP) module, as the published checkpoints store it under `mtp.{k}.*`
(V4 report section 2, MTP kept from DeepSeek-V3 section 2.2; structure of DeepSeek's V4 inference code).

Module k predicts the token k + 2 places ahead. It reads the previous depth's hyper-connected streams h
(B, T, N, D) -- for k = 0 the main model's last block output, *before* its stream-collapsing head -- and the
embeddings of the tokens one place further on:
    e = enorm(Emb(t_{i+k+1}))                         (B, T, D), the main model's embedding (shared)
    x = e_proj(e) broadcast over the N streams + h_proj(hnorm(h))   (B, T, N, D), hnorm per stream
    x = V4Block(x)                                    a full V4 layer: mHC around attention and MoE
    logits = head(norm(hc_head(x)))                  its own HyperHead and norm, the main model's head (shared)
The block is a sliding-window layer with a top-k routed MoE: the published `compress_ratios` list one more
entry than num_hidden_layers, 0 (no compression) for the MTP layer, and it sits past `num_hash_layers`, so it
has a router (`ffn.gate.weight` / `.bias`), no hash table.

Checkpoint names (the original DeepSeek layout; transformers does not build this module): mtp.{k}.e_proj,
h_proj, enorm, hnorm, norm, hc_head_{fn,base,scale}, and the block's own names (attn.*, attn_norm, ffn.*,
ffn_norm, hc_attn_*, hc_ffn_*), exactly as under layers.{i}. The published files hold no copy of the
embedding or the head here.

Shape legend: B batch, T tokens, N hc_mult streams, D hidden.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..config import ModelConfig
from .hyper import HyperHead
from .layers import Linear, RMSNorm
from .v4 import V4Block


def mtp_block_config(config: ModelConfig) -> ModelConfig:
    """A copy of `config` whose layer tables have one more entry, the MTP layer's: sliding, routed MoE."""
    extended = copy.copy(config)
    extended.layer_types = [*config.layer_types[:config.num_hidden_layers], "sliding_attention"]
    extended.mlp_layer_types = [*config.mlp_layer_types[:config.num_hidden_layers], "moe"]
    return extended


class V4MTP(V4Block):
    """One MTP depth: `forward(h_prev, e, ...)` -> streams (B, T, N, D); `logits_input(x)` -> (B, T, D) for the
    shared head. Its parameters are a V4Block's plus e_proj, h_proj, enorm, hnorm, norm and hc_head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(mtp_block_config(config), config.num_hidden_layers)
        D = config.hidden_size
        self.e_proj = Linear(D, D, bias=False)
        self.h_proj = Linear(D, D, bias=False)
        self.enorm = RMSNorm(D, config.rms_norm_eps)
        self.hnorm = RMSNorm(D, config.rms_norm_eps)
        self.norm = RMSNorm(D, config.rms_norm_eps)
        self.hc_head = HyperHead(config)

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor, ropes: dict,
                rope, cache=None) -> torch.Tensor:
        """h_prev (B, T, N, D), emb = Emb(next ids) (B, T, D), ids (B, T) the next ids -> streams (B, T, N, D)."""
        x = self.e_proj(self.enorm(emb)).unsqueeze(2) + self.h_proj(self.hnorm(h_prev))
        return super().forward(x, ids, pos, ropes, rope, cache)

    def logits_input(self, x: torch.Tensor) -> torch.Tensor:
        """Streams (B, T, N, D) -> normed hidden (B, T, D), what the shared output head reads."""
        return self.norm(self.hc_head(x))

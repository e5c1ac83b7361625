"""The decoder: pre-norm blocks (attention, then dense MLP or MoE), final norm, output head.

Shape legend: B batch, T tokens, D hidden, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import GQAttention, MLAttention
from .layers import MLP, RMSNorm, RotaryEmbedding
from .moe import MoE


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = MLAttention(config) if config.uses_mla else GQAttention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = MoE(config) if config.is_moe_layer(layer) else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """`Transformer(config)(input_ids)` -> logits (B, T, V) in fp32 for training and comparison."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rope = RotaryEmbedding(config)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.head.weight = self.embed.weight
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms, zero router bias."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.ndim >= 2:
                p.normal_(0.0, std)
            else:
                p.zero_()  # biases
        for m in self.modules():
            if isinstance(m, MoE) and m.gate.bias is not None:
                m.gate.bias.zero_()

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.layers if isinstance(b.ffn, MoE)]

    def set_dispatch(self, mode: str) -> None:
        """"sorted" (default) or "loop" (reference) token dispatch in every MoE layer."""
        for moe in self.moe_layers():
            moe.dispatch = mode

    def check_input(self, input_ids: torch.Tensor, start_pos: int = 0) -> None:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                where = (input_ids == bad).nonzero()[0].tolist()
                raise ValueError(f"token id {bad} at (batch {where[0]}, position {where[1]}) is outside the "
                                 f"vocabulary [0, {self.config.vocab_size})")
        end = start_pos + input_ids.shape[1]
        if end > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {end} positions is longer than "
                             f"max_position_embeddings={self.config.max_position_embeddings}")

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) -> final-normed hidden states (B, T, D)."""
        self.check_input(input_ids)
        x = self.embed(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        rope = self.rope(positions, x.dtype)
        for block in self.layers:
            x = block(x, rope)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden_states(input_ids)).float()

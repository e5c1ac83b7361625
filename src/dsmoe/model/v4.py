"""The DeepSeek-V4 decoder (V4 report section 2): hyper-connected blocks of compressed / sliding attention and
hash- or top-k-routed MoE, the stream-collapsing head, final norm, output head.

`V4Transformer` has the calling convention of `Transformer` (forward(input_ids, cache, start) -> fp32 logits,
hidden_states, make_cache, moe_layers), so checkpoints, generation and the calculator treat both alike; V1-V3
stay in transformer.py. The published checkpoints' MTP module (`mtp.*`, dsmoe.model.mtp_v4) is built only when
asked (with_mtp=True: num_nextn_predict_layers depths), since transformers' DeepseekV4ForCausalLM, the oracle,
never builds it; load_pretrained asks when the checkpoint holds `mtp.{k}.e_proj.weight` for every depth.

Shape legend: B batch, T tokens, N hc_mult streams, D hidden, V vocabulary, R rope dims.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..config_v4 import v4_rope_dim
from .compressed import V4Attention, V4LayerCache
from .hyper import HyperConnection, HyperHead
from .layers import Linear, RMSNorm, rope_inv_freq
from .moe_v4 import V4MoE


class V4Rope(nn.Module):
    """Two rope tables: "main" (rope_theta, plain) for sliding layers, "compress" (compress_rope_theta with the
    config's YaRN, cos/sin amplitude `attention_factor`, 1.0 by default as in transformers) for the compressed
    layers, their compressed entries and the indexer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim = v4_rope_dim(config)
        main, _ = rope_inv_freq(config, dim, config.rope_theta, scaled=False)
        comp, _ = rope_inv_freq(config, dim, config.compress_rope_theta, scaled=True)
        self.amplitude = float((config.rope_scaling or {}).get("attention_factor") or 1.0)
        self.main = nn.Buffer(main, persistent=False)
        self.compress = nn.Buffer(comp, persistent=False)

    def forward(self, positions: torch.Tensor, kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin (B, T, R/2)."""
        inv = (self.main if kind == "main" else self.compress).to(positions.device)
        amp = 1.0 if kind == "main" else self.amplitude
        freqs = positions.float()[..., None] * inv
        return (freqs.cos() * amp).to(dtype), (freqs.sin() * amp).to(dtype)


class V4Block(nn.Module):
    """h (B, T, N, D) -> h: attention then MoE, each wrapped in a HyperConnection (pre-norm inside)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer_type = config.layer_types[layer]
        self.rope_kind = "main" if self.layer_type == "sliding_attention" else "compress"
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = V4Attention(config, self.layer_type)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = V4MoE(config, hashed=config.mlp_layer_types[layer] == "hash_moe")
        self.hc_attn = HyperConnection(config)
        self.hc_ffn = HyperConnection(config)

    def forward(self, h: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor, ropes: dict, rope: V4Rope,
                cache: V4LayerCache | None) -> torch.Tensor:
        cos, sin = ropes[self.rope_kind]
        entry_rope = lambda p: rope(p, "compress", h.dtype)  # noqa: E731  compressed entries' positions
        h = self.hc_attn(h, lambda x: self.attn(self.attn_norm(x), cos, sin, entry_rope, pos, cache))
        return self.hc_ffn(h, lambda x: self.ffn(self.ffn_norm(x), ids))


class V4Cache:
    """Per-layer V4LayerCache for a batch whose rows share positions (see dsmoe.generate_v4 for batching)."""

    def __init__(self, n_layers: int) -> None:
        self.layers = [V4LayerCache() for _ in range(n_layers)]

    @property
    def seen(self) -> int:
        return self.layers[0].seen if self.layers else 0


class V4Transformer(nn.Module):
    """`V4Transformer(config)(input_ids)` -> logits (B, T, V) in fp32."""

    def __init__(self, config: ModelConfig, with_mtp: bool | None = None) -> None:
        super().__init__()
        if config.model_type != "deepseek_v4":
            raise ValueError(f"V4Transformer builds deepseek_v4 models, got model_type {config.model_type!r}")
        self.config = config
        self.generation_config = None
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rope = V4Rope(config)
        self.layers = nn.ModuleList(V4Block(config, i) for i in range(config.num_hidden_layers))
        self.hc_head = HyperHead(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = Linear(config.hidden_size, config.vocab_size, bias=False)
        from .mtp_v4 import V4MTP  # mtp_v4 builds on V4Block

        self.mtp = nn.ModuleList(V4MTP(config) for _ in range(config.num_nextn_predict_layers if with_mtp else 0))
        if config.tie_word_embeddings:
            self.head.weight = self.embed.weight
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for matrices, ones for norms and hc scales, zeros for the rest; hash
        tables tid2eid spread tokens over experts (token t -> experts t, t+1, ... mod E)."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".scale"):
                p.fill_(1.0)
            elif p.ndim >= 2 and not name.endswith(".ape"):
                p.normal_(0.0, std)
            else:
                p.zero_()
        E, K = self.config.n_routed_experts, self.config.num_experts_per_tok
        for moe in self.all_moe_layers():
            if moe.gate.hashed:
                t = torch.arange(self.config.vocab_size)[:, None] + torch.arange(K)[None]
                moe.gate.tid2eid.copy_(t % E)
            else:
                moe.gate.bias.zero_()

    def moe_layers(self, include_mtp: bool = False) -> list[V4MoE]:
        """The routed (top-k) MoE layers: what balancing and load metrics act on. Hash layers pick experts by
        a frozen table, so they have no router to balance (all_moe_layers lists them too)."""
        blocks = [*self.layers, *self.mtp] if include_mtp else list(self.layers)
        return [b.ffn for b in blocks if not b.ffn.gate.hashed]

    def all_moe_layers(self) -> list[V4MoE]:
        return [b.ffn for b in [*self.layers, *self.mtp]]

    def check_input(self, input_ids: torch.Tensor, start_pos: int = 0) -> None:
        from .transformer import Transformer

        Transformer.check_input(self, input_ids, start_pos)  # same rules

    def make_cache(self, batch: int = 1, capacity: int = 0, extra_layers: int = 0) -> V4Cache:
        """An empty cache (grows as tokens arrive; batch and capacity are accepted for Transformer's signature);
        extra_layers more layer caches after the main ones (speculative decoding's MTP layer)."""
        return V4Cache(len(self.layers) + extra_layers)

    def hidden_states(self, input_ids: torch.Tensor, cache: V4Cache | None = None, start: int = 0,
                      pad: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
        """input_ids (B, T) at positions start..start+T -> final-normed hidden states (B, T, D)."""
        return self.norm(self.hc_head(self.streams(input_ids, cache, start, pad, check)))

    def streams(self, input_ids: torch.Tensor, cache: V4Cache | None = None, start: int = 0,
                pad: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
        """input_ids (B, T) -> the last block's hyper-connected streams (B, T, N, D), before the HyperHead
        (what MTP depth 0 reads)."""
        if pad is not None and bool((pad > 0).any()):
            raise ValueError("DeepSeek-V4 does not take left-padded batches (its compressed windows are "
                             "positional): run rows of different lengths separately (dsmoe.generate does)")
        if check:
            self.check_input(input_ids, start)
        if cache is None and start != 0:
            raise ValueError("start > 0 needs a cache holding the earlier positions")
        if cache is not None and cache.seen != start:
            raise ValueError(f"the cache holds {cache.seen} positions; start must be {cache.seen}, got {start}")
        B, T = input_ids.shape
        x = self.embed(input_ids)  # (B, T, D)
        pos = torch.arange(start, start + T, device=x.device).expand(B, T)
        ropes = {k: self.rope(pos, k, x.dtype) for k in ("main", "compress")}
        h = x.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()  # (B, T, N, D)
        for i, block in enumerate(self.layers):
            h = block(h, input_ids, pos, ropes, self.rope, None if cache is None else cache.layers[i])
        return h

    def mtp_hidden(self, depth: int, h_prev: torch.Tensor, next_ids: torch.Tensor, cache=None,
                   start: int = 0) -> torch.Tensor:
        """MTP depth `depth` at positions start..start+T: h_prev (B, T, N, D) the previous depth's streams
        (streams() for depth 0), next_ids (B, T) the tokens one place ahead -> its streams (B, T, N, D).
        cache: a V4LayerCache for this depth (the MTP layer keeps its own sliding window)."""
        B, T = next_ids.shape
        pos = torch.arange(start, start + T, device=next_ids.device).expand(B, T)
        ropes = {k: self.rope(pos, k, h_prev.dtype) for k in ("main", "compress")}
        return self.mtp[depth](h_prev, self.embed(next_ids), next_ids, pos, ropes, self.rope, cache)

    def mtp_logits(self, depth: int, h: torch.Tensor) -> torch.Tensor:
        """MTP depth `depth`'s streams (B, T, N, D) -> logits (B, T, V) in fp32 (its hc_head and norm, the
        shared output head)."""
        return self.head(self.mtp[depth].logits_input(h)).float()

    def forward(self, input_ids: torch.Tensor, cache: V4Cache | None = None, start: int = 0,
                pad: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
        """Logits (B, T, V) in fp32."""
        return self.head(self.hidden_states(input_ids, cache, start, pad, check)).float()

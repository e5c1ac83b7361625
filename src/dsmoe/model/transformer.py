"""The decoder: pre-norm blocks (attention, then dense MLP or MoE), final norm, output head.

Shape legend: B batch, T tokens, D hidden, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..ops.capacity import TokenDropping
from .attention import GQAttention, MLAttention, Rope, causal_mask, sliding_window_mask
from .cache import LayerCache, ModelCache
from .layers import MLP, Linear, RMSNorm, RotaryEmbedding
from .moe import MoE


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = MLAttention(config) if config.uses_mla else GQAttention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = MoE(config) if config.is_moe_layer(layer) else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, rope: Rope, cache: LayerCache | None = None, start: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cache, start, mask)
        return x + self.ffn(self.ffn_norm(x))


class MTPModule(nn.Module):
    """One multi-token-prediction depth (DeepSeek-V3 section 2.2).

    h_k = Block(eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_{k-1})])), and the prediction is head(norm(h_k)).
    Embedding and output head are the main model's; `norm` is the checkpoint's `shared_head.norm`.
    h_0 is the main model's final-normed hidden state.
    """

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        dim, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = RMSNorm(dim, eps)
        self.hnorm = RMSNorm(dim, eps)
        self.eh_proj = Linear(2 * dim, dim, bias=False)
        self.block = Block(config, layer)
        self.norm = RMSNorm(dim, eps)

    def forward(self, h_prev: torch.Tensor, next_emb: torch.Tensor, rope: Rope, cache: LayerCache | None = None,
                start: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        """h_prev, next_emb (B, T, D) -> h (B, T, D), un-normed (apply self.norm before the head)."""
        x = self.eh_proj(torch.cat((self.enorm(next_emb), self.hnorm(h_prev)), dim=-1))
        return self.block(x, rope, cache, start, mask)


class Transformer(nn.Module):
    """`Transformer(config)(input_ids)` -> logits (B, T, V) in fp32 for training and comparison.

    with_mtp: build the config's `num_nextn_predict_layers` MTP modules (default: yes when it has any).
    generation_config: the checkpoint's generation_config.json (dsmoe.checkpoint.GenerationConfig: EOS ids,
    sampling defaults) when loaded by load_pretrained, else None; save_pretrained writes it back.
    """

    def __new__(cls, config: ModelConfig | None = None, *args, **kwargs):
        # DeepSeek-V4's decoder is its own class (model/v4.py); Transformer(config) builds it for a V4 config so
        # that every caller (trainer, CLI, benchmarks) builds models one way. (config is None when copy/pickle
        # recreate an instance.)
        if cls is Transformer and config is not None and config.model_type == "deepseek_v4":
            from .v4 import V4Transformer

            return V4Transformer(config, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, config: ModelConfig, with_mtp: bool | None = None) -> None:
        super().__init__()
        self.config = config
        self.generation_config = None  # set by load_pretrained (checkpoint/ is not imported by model code)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rope = RotaryEmbedding(config)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if with_mtp is None:
            with_mtp = config.num_nextn_predict_layers > 0
        depth = config.num_nextn_predict_layers if with_mtp else 0
        self.mtp = nn.ModuleList(MTPModule(config, config.num_hidden_layers + k) for k in range(depth))
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
        for moe in self.moe_layers(include_mtp=True):
            if moe.gate.bias is not None:
                moe.gate.bias.zero_()

    def moe_layers(self, include_mtp: bool = False) -> list[MoE]:
        """MoE layers of the main model (then of the MTP modules, if asked)."""
        blocks = [*self.layers, *(m.block for m in self.mtp)] if include_mtp else list(self.layers)
        return [b.ffn for b in blocks if isinstance(b.ffn, MoE)]

    def set_dispatch(self, mode: str) -> None:
        """"sorted" (default) or "loop" (reference) token dispatch in every MoE layer."""
        for moe in self.moe_layers(include_mtp=True):
            moe.dispatch = mode

    def set_token_dropping(self, rule: TokenDropping | None, protected_rows: torch.Tensor | None = None) -> None:
        """Token dropping in train mode for every MoE layer (None: off), and which rows (B,) bool of the next
        batches are never dropped (see dsmoe.ops.capacity.protected_sequences); a custom training loop calls it
        with the rows of each step's batch."""
        if rule is not None:
            rule.check_experts(self.config.n_routed_experts)
        for moe in self.moe_layers(include_mtp=True):
            moe.token_dropping, moe.protected_rows = rule, protected_rows

    def check_input(self, input_ids: torch.Tensor, start_pos: int = 0) -> None:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if 0 in input_ids.shape:
            raise ValueError(f"input_ids has no tokens: shape {tuple(input_ids.shape)}")
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

    def make_cache(self, batch: int, capacity: int, extra_layers: int = 0) -> ModelCache:
        """An empty cache for `batch` rows of up to `capacity` positions, in the model's dtype."""
        return ModelCache(self.config, batch, capacity, self.embed.weight.dtype, self.embed.weight.device,
                          extra_layers)

    def mtp_hidden(self, depth: int, h_prev: torch.Tensor, next_ids: torch.Tensor, cache: LayerCache | None = None,
                   start: int = 0) -> torch.Tensor:
        """Run MTP module `depth` (0-based) on h_prev (B, T, D) and the next tokens (B, T) at slots
        start..start+T -> h (B, T, D). Logits: self.head(self.mtp[depth].norm(h))."""
        rope, mask = self._rope_and_mask(next_ids, start, None, cache is not None, h_prev.dtype)
        return self.mtp[depth](h_prev, self.embed(next_ids), rope, cache, start, mask)

    def positions_and_mask(self, batch: int, length: int, start: int = 0, pad: torch.Tensor | None = None,
                           device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions of tokens start..start+length and the attention mask over keys 0..start+length.

        pad (B,): left-padding per row (batched prompts of different lengths). A row's real tokens get
        positions 0, 1, ... as if unpadded, and no query attends to its padding. Padding queries attend to
        themselves only, so they stay finite and never feed NaN into the cache.
        config.sliding_window: each query also sees only the last `sliding_window` keys (sliding_window_mask);
        a layer whose rolling cache returns fewer keys uses the mask's last columns (attention()).
        Returns positions (T,) or (B, T), and a bool mask (B, 1, T, S) or None. None means plain causal
        where no tensor is needed: a prefill from slot 0 (SDPA's is_causal) or a single decode token (sees
        every key). Several new tokens after cached ones get their causal mask built here, once per forward.
        """
        pos = torch.arange(start, start + length, device=device)  # (T,) absolute slots
        window = self.config.sliding_window
        if window is not None and start + length <= window:
            window = None  # no query is further than the window from key 0: plain causal
        if pad is None:
            if window is not None:
                return pos, sliding_window_mask(pos, torch.arange(start + length, device=device), window)[None, None]
            mask = None if start == 0 else causal_mask(length, start + length, device)  # None: SDPA's is_causal
            return pos, None if mask is None else mask[None, None]
        keys = torch.arange(start + length, device=device)  # (S,)
        mask = sliding_window_mask(pos, keys, window)  # (T, S) causal, windowed
        pad = pad.to(device)
        real_key = keys[None, :] >= pad[:, None]  # (B, S)
        mask = (mask[None] & real_key[:, None]) | (keys[None, None, :] == pos[None, :, None])  # (B, T, S)
        return (pos[None, :] - pad[:, None]).clamp(min=0), mask[:, None]

    def _rope_and_mask(self, ids: torch.Tensor, start: int, pad: torch.Tensor | None, cached: bool,
                       dtype: torch.dtype) -> tuple[Rope, torch.Tensor | None]:
        """cos/sin and the attention mask for tokens ids (B, T) at slots start..start+T."""
        if not cached and start != 0:
            raise ValueError("start > 0 needs a cache holding the earlier positions")
        positions, mask = self.positions_and_mask(ids.shape[0], ids.shape[1], start, pad, ids.device)
        return self.rope(positions, dtype), mask

    def hidden_states(self, input_ids: torch.Tensor, cache: ModelCache | None = None, start: int = 0,
                      pad: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
        """input_ids (B, T) at positions start..start+T -> final-normed hidden states (B, T, D).

        With a cache, keys and values of these positions are written into it and earlier ones read
        from it; without one, the call is a plain causal forward over the T tokens (start must be 0).
        check=False skips check_input (two host syncs for the id range): for callers that validated the
        prompt once and feed back tokens the model itself sampled, like a decode loop.
        """
        if check:
            self.check_input(input_ids, start)
        x = self.embed(input_ids)
        rope, mask = self._rope_and_mask(input_ids, start, pad, cache is not None, x.dtype)
        for i, block in enumerate(self.layers):
            x = block(x, rope, None if cache is None else cache.layers[i], start, mask)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, cache: ModelCache | None = None, start: int = 0,
                pad: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
        """Logits (B, T, V) in fp32."""
        return self.head(self.hidden_states(input_ids, cache, start, pad, check)).float()

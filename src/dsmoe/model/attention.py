"""Attention: GQA/MHA (DeepSeekMoE V1, Mixtral) and Multi-head Latent Attention (DeepSeek-V2/V3).

Shape legend: B batch, T query tokens, S key tokens, H query heads, G kv heads, D head width,
N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, C kv_lora_rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cache import KVCache, LatentCache
from .dsa import LightningIndexer, indexed_attention
from ..ops.cpu_kernels import small_batch_kernels
from .layers import Linear, RMSNorm, apply_rope

Rope = tuple[torch.Tensor, torch.Tensor]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              mask: torch.Tensor | None) -> torch.Tensor:
    """q (B, H, T, D), k (B, G, S, D), v (B, G, S, V) -> (B, H, T, V).

    mask: bool (B, 1, T, S'), True = may attend; None = causal with the T queries at the last T of the S
    key slots (see causal_mask). S' >= S: a mask over more keys than given is cut to its last S columns,
    because a rolling cache (sliding window) returns only the most recent keys.
    SDPA's fast CPU kernel needs q, k and v of one width; MLA's value head (V) is narrower than its
    query/key head (N + R), so V is zero-padded to D and the padding sliced off afterwards.
    """
    v_dim = v.shape[-1]
    if v_dim < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - v_dim))
    T, S = q.shape[2], k.shape[2]
    if mask is not None and mask.shape[-1] > S:
        mask = mask[..., -S:]
    # SDPA's is_causal aligns the query block with the first keys, right only when T == S.
    is_causal = mask is None and T == S
    if mask is None and not is_causal:
        mask = causal_mask(T, S, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out[..., :v_dim]


def causal_mask(T: int, S: int, device: torch.device) -> torch.Tensor | None:
    """(T, S) bool mask, True = may attend, for T queries at key slots S-T..S-1 (new tokens after S-T
    cached ones); None when every query may see every key (a single decode step)."""
    if T == 1:
        return None
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


def sliding_window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which keys each query may see: bool (..., T, S), True = may attend, for query positions q_pos (..., T)
    and key positions k_pos (..., S) (any leading batch dims broadcast).

    Causal (key <= query) and, with a window, key > query - window: each query sees the last `window` keys,
    itself included (Mistral's sliding-window attention; transformers' Mixtral applies the same rule).
    window None: plain causal. Positions may be absolute cache slots: only their differences matter.
    """
    q, k = q_pos[..., :, None], k_pos[..., None, :]
    mask = k <= q
    if window is not None:
        mask = mask & (k > q - window)
    return mask


class GQAttention(nn.Module):
    """Grouped-query attention with Llama's rotate-half RoPE (MHA when kv heads == heads).

    With config.sliding_window the mask (Transformer.positions_and_mask) limits each query to the last
    `sliding_window` keys, and the cache keeps only those (cache.RollingKVCache)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim, heads, kv_heads, head_dim = (config.hidden_size, config.num_attention_heads, config.kv_heads,
                                          config.gqa_head_dim)
        bias = config.attention_bias
        self.head_dim = head_dim
        self.scale = config.softmax_scale
        self.wq = Linear(dim, heads * head_dim, bias=bias)
        self.wk = Linear(dim, kv_heads * head_dim, bias=bias)
        self.wv = Linear(dim, kv_heads * head_dim, bias=bias)
        self.wo = Linear(heads * head_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, rope: Rope, cache: KVCache | None = None, start: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, dim); with a cache, x holds positions start..start+T and attends to everything cached."""
        B, T, _ = x.shape
        cos, sin = rope
        q = apply_rope(self.wq(x).view(B, T, -1, self.head_dim), cos, sin, interleaved=False)  # (B, T, H, D)
        k = apply_rope(self.wk(x).view(B, T, -1, self.head_dim), cos, sin, interleaved=False)  # (B, T, G, D)
        v = self.wv(x).view(B, T, -1, self.head_dim)  # (B, T, G, D)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, G, T, D)
        if cache is not None:
            k, v = cache.update(start, k, v)  # (B, G, S, D)
        out = attention(q.transpose(1, 2), k, v, self.scale, mask)  # (B, H, T, D)
        return self.wo(out.transpose(1, 2).reshape(B, T, out.shape[1] * out.shape[3]))


class MLAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2 section 2.1).

    Keys and values are rebuilt from one low-rank latent c_kv = norm(W_DKV x) (width C); position goes
    through a separate rope key k_pe (width R) shared by all heads, so the latent itself carries no
    position and W_UK can be folded into the query at inference. The query is low-rank too when
    q_lora_rank is set (V2, V3), a plain projection otherwise (V2-Lite).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim, heads = config.hidden_size, config.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_rank = config.kv_lora_rank
        self.q_rank = config.q_lora_rank
        self.interleaved = config.rope_interleaved
        self.scale = config.softmax_scale
        bias = config.attention_bias
        qk_dim = self.nope_dim + self.rope_dim
        if self.q_rank is None:
            self.wq = Linear(dim, heads * qk_dim, bias=False)
        else:
            self.wq_a = Linear(dim, self.q_rank, bias=bias)
            self.q_norm = RMSNorm(self.q_rank)
            self.wq_b = Linear(self.q_rank, heads * qk_dim, bias=False)
        self.wkv_a = Linear(dim, self.kv_rank + self.rope_dim, bias=bias)  # [c_kv | k_pe]
        self.kv_norm = RMSNorm(self.kv_rank)
        self.wkv_b = Linear(self.kv_rank, heads * (self.nope_dim + self.v_dim), bias=False)  # [W_UK; W_UV]
        self.wo = Linear(heads * self.v_dim, dim, bias=bias)
        self.absorb: bool | None = None  # None: whichever form costs fewer FLOPs (_absorb_is_cheaper)
        self.indexer = LightningIndexer(config) if config.uses_dsa else None  # V3.2 sparse attention

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              q_latent: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, dim) -> q_nope (B, T, H, N), q_pe (B, T, H, R) with rope applied. q_latent: norm(wq_a(x))
        when the caller already has it (the V3.2 indexer reads it too)."""
        B, T, _ = x.shape
        if self.q_rank is None:
            q = self.wq(x)
        else:
            q = self.wq_b(self.q_norm(self.wq_a(x)) if q_latent is None else q_latent)
        q = q.view(B, T, -1, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin, self.interleaved)

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, dim) -> c_kv (B, T, C) normalised, k_pe (B, T, R) with rope: all an MLA cache keeps."""
        c_kv, k_pe = self.wkv_a(x).split([self.kv_rank, self.rope_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin, self.interleaved).squeeze(2)
        return self.kv_norm(c_kv), k_pe

    def forward(self, x: torch.Tensor, rope: Rope, cache: LatentCache | None = None, start: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, dim). With a cache only the latent is stored; steps with few new tokens over a long
        cache attend in the absorbed form, prefills decompress keys and values (fewer FLOPs when many
        queries share them; see _absorb_is_cheaper). `self.absorb` forces one form: True / False;
        None = that automatic choice."""
        cos, sin = rope
        q_latent = None if self.q_rank is None else self.q_norm(self.wq_a(x))  # (B, T, Q)
        q_nope, q_pe = self.query(x, cos, sin, q_latent)
        c_kv, k_pe = self.latent(x, cos, sin)
        if cache is None:
            latent = torch.cat((c_kv, k_pe), dim=-1)  # (B, T, C + R)
        else:
            latent = cache.update(start, c_kv, k_pe)  # (B, S, C + R)
        if self.indexer is not None:  # V3.2: attend to the indexer's top-k keys only (dsa.py)
            return self.wo(indexed_attention(self, x, q_latent, q_nope, q_pe, latent, rope, cache, start, mask))
        absorb = self.absorb if self.absorb is not None else self._absorb_is_cheaper(x.shape[1], latent.shape[1],
                                                                                       cache is not None)
        impl = self._absorbed if absorb else self._naive
        return self.wo(impl(q_nope, q_pe, latent, mask))

    def _absorb_is_cheaper(self, T: int, S: int, cached: bool) -> bool:
        """Per head, decompressing S cached latents costs S*C*(N+V) and attends with T*S*(N+R+V); absorbed
        attention costs T*S*(2C+R) plus T*C*(N+V) to fold the query and output. Absorbed wins when
        T*S*(2C-N-V) < C*(N+V)*(S-T): every decode step, short multi-token steps (speculative verification)
        over a long cache, never a prefill into an empty cache (S == T)."""
        C, N, V = self.kv_rank, self.nope_dim, self.v_dim
        return cached and T * S * (2 * C - N - V) < C * (N + V) * (S - T)

    def _naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Decompress per-head keys and values from the latent, then ordinary attention -> (B, T, H*V)."""
        B, T, H, _ = q_nope.shape
        c_kv, k_pe = latent.split([self.kv_rank, self.rope_dim], dim=-1)
        S = c_kv.shape[1]
        kv = self.wkv_b(c_kv).view(B, S, H, self.nope_dim + self.v_dim)  # (B, S, H, N + V)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)  # (B, T, H, N + R)
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(-1, -1, H, -1)), dim=-1)  # (B, S, H, N + R)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale, mask)
        return out.transpose(1, 2).reshape(B, T, H * self.v_dim)

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
        """W_UK folded into the query and W_UV applied after attention: attention runs in latent space as
        multi-query attention with one (C + R)-wide key and C-wide value shared by all heads. Heads are
        folded into the query length so scores and outputs are one batched matmul each -> (B, T, H*V)."""
        B, T, H, _ = q_nope.shape
        one_query = T == 1 and (mask is None or mask.shape[-2] == 1)
        ops = small_batch_kernels(q_nope.flatten(2), self.wkv_b.weight) if one_query else None
        if ops is not None and latent.dtype in (torch.float32, torch.bfloat16):
            return self._absorbed_decode(ops, q_nope, q_pe, latent, mask)
        S, C = latent.shape[1], self.kv_rank
        q = self.absorbed_query(q_nope, q_pe).view(B, T * H, C + self.rope_dim)  # (B, T*H, C + R)
        scores = torch.bmm(q, latent.transpose(1, 2)).float() * self.scale  # (B, T*H, S)
        if mask is None:
            mask = causal_mask(T, S, q.device)
        if mask is not None:
            mask = mask.expand(B, 1, T, S).transpose(1, 2).expand(B, T, H, S).reshape(B, T * H, S)
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1).to(q.dtype)
        return self.absorbed_output(torch.bmm(probs, latent[..., :C]).view(B, T, H, C))

    def _absorbed_decode(self, ops, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                         mask: torch.Tensor | None) -> torch.Tensor:
        """`_absorbed` for one query token per sequence in one call of dsmoe's CPU decode kernels
        (ops/cpu_kernels.py, mla_decode): W_UK and W_UV read in place from wkv_b, scores, softmax and the
        weighted latent sum split over the keys across threads. mask (B or 1, 1, 1, S) or None -> (B, 1, H*V)."""
        B, _, H, _ = q_nope.shape
        visible = None if mask is None else mask.reshape(mask.shape[0], mask.shape[-1]).expand(B, -1)
        out = ops.mla_decode(q_nope.reshape(B, H, self.nope_dim), q_pe.reshape(B, H, self.rope_dim), latent,
                             self.wkv_b.weight, self.v_dim, self.scale, visible)  # (B, H * V)
        return out.view(B, 1, H * self.v_dim)

    def _w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK (H, N, C) and W_UV (H, V, C), views of wkv_b."""
        w = self.wkv_b.weight.view(-1, self.nope_dim + self.v_dim, self.kv_rank)
        return w[:, :self.nope_dim], w[:, self.nope_dim:]

    def absorbed_query(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """q_nope (B, T, H, N), q_pe (B, T, H, R) -> [q_nope W_UK | q_pe] (B, T, H, C + R): a query whose dot
        product with a latent row [c_kv | k_pe] is the naive form's q.k."""
        B, T, H, _ = q_nope.shape
        # Per head, (B*T, N) @ (N, C): one bmm over heads (einsum re-plans the same contraction per call).
        q_lat = torch.bmm(q_nope.reshape(B * T, H, self.nope_dim).transpose(0, 1), self._w_uk_uv()[0])  # (H, B*T, C)
        return torch.cat((q_lat.transpose(0, 1).view(B, T, H, self.kv_rank), q_pe), dim=-1)

    def absorbed_output(self, out: torch.Tensor) -> torch.Tensor:
        """Attention outputs in latent space (B, T, H, C) -> through W_UV per head -> (B, T, H * V)."""
        B, T, H, C = out.shape
        out = torch.bmm(out.reshape(B * T, H, C).transpose(0, 1), self._w_uk_uv()[1].transpose(1, 2))  # (H, B*T, V)
        return out.transpose(0, 1).reshape(B, T, H * self.v_dim)

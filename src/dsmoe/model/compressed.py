"""DeepSeek-V4 attention (V4 report section 2.3): shared-KV multi-query attention over a sliding window, plus
compressed entries of the older context.

Three layer types (`config.layer_types`):
* sliding_attention: each query sees the last `sliding_window` tokens (itself included);
* compressed_sparse_attention (CSA, section 2.3.1): every m=4 tokens are compressed into one entry by a
  learned softmax gate over two overlapping windows (width 2m, stride m); a lightning indexer scores the
  entries per query and the query attends to its `index_topk` best ones, beside its sliding window;
* heavily_compressed_attention (HCA, section 2.3.2): every m'=128 tokens are compressed into one entry (no
  overlap); each query attends to every entry whose window closed before it, beside its sliding window.

A compressed entry w covers tokens [w*m, (w+1)*m) and becomes visible to the query at position p once
(p + 1) // m > w. Entries carry rope at position w*m ("compress" rope: `compress_rope_theta` with YaRN, cos/sin
amplitude 1). Keys and values are the same tensor (shared KV): values thus carry rope on their trailing rope
dims too, and the attention output's rope dims are rotated back by the query position (the "-i" rotation).
Each head also has a learned attention sink: a logit that joins the softmax and is then dropped. The output
projection is grouped (section 2.3.1, "Grouped Output Projection"): the H*D head outputs are split into
`o_groups` groups, each projected to `o_lora_rank` (wo_a, block diagonal), then mixed to the hidden size (wo_b).

Numerics follow transformers' DeepseekV4Attention (the oracle): rope is DeepSeek's interleaved pairs on the
*trailing* rope dims of each head; q gets an unweighted RMSNorm per head; gate softmaxes run in fp32.

Shape legend: B batch, T query tokens, S keys, H heads, D head_dim, R rope dims, m compression rate,
n compressed entries, H_I / D_I indexer heads / width, Q q_lora_rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import Linear, RMSNorm


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Unweighted RMSNorm over the last dim (stats in fp32)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def rope_trailing(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing R dims of x (..., T, heads, D) as interleaved pairs (2i, 2i+1) by cos/sin (..., T, R/2);
    the leading D - R dims pass through. Pass -sin for the inverse rotation."""
    r = 2 * cos.shape[-1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    nope, pe = x[..., :-r], x[..., -r:].float()
    x1, x2 = pe[..., 0::2], pe[..., 1::2]
    rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((nope, rot.to(x.dtype)), dim=-1)


@dataclass
class CompressorState:
    """What a compressor carries between calls of a cached forward: the tokens of the unfinished window
    (projected kv and gate), the previous window's first-half series (CSA's overlap) and the entries so far."""

    buffer_kv: torch.Tensor | None = None  # (B, <m, width)
    buffer_gate: torch.Tensor | None = None
    overlap_kv: torch.Tensor | None = None  # (B, m, D): series Ca of the last closed window
    overlap_gate: torch.Tensor | None = None
    entries: torch.Tensor | None = None  # (B, n, D), rope applied
    count: int = 0  # entries emitted; count * m is the first position of the next window


@dataclass
class V4LayerCache:
    """One V4 layer's cache: the last sliding_window - 1 shared keys/values, and the compressors' state."""

    window: torch.Tensor | None = None  # (B, <W, D)
    seen: int = 0  # tokens processed so far
    compressor: CompressorState = field(default_factory=CompressorState)
    indexer: CompressorState = field(default_factory=CompressorState)


class Compressor(nn.Module):
    """Softmax-gated token compression (V4 eqs. 9-12 for CSA with overlap; eqs. 20-23 for HCA without).

    Each token t gives kv_t = wkv(x_t) and gate logits z_t = wgate(x_t) + ape[t mod m]. HCA: entry w =
    norm(sum over its m tokens of softmax_t(z) * kv), the softmax per channel. CSA (overlap=True): wkv / wgate
    are 2D wide, two series Ca = [:D] and Cb = [D:]; entry w mixes window w-1's Ca with window w's Cb over the
    2m slots (window 0's Ca half is empty). Checkpoint names: `wkv`, `wgate`, `ape`, `norm`.
    """

    def __init__(self, config: ModelConfig, head_dim: int, rate: int, overlap: bool) -> None:
        super().__init__()
        self.head_dim, self.rate, self.overlap = head_dim, rate, overlap
        width = 2 * head_dim if overlap else head_dim
        self.wkv = Linear(config.hidden_size, width, bias=False)
        self.wgate = Linear(config.hidden_size, width, bias=False)
        self.ape = nn.Parameter(torch.zeros(rate, width))
        self.norm = RMSNorm(head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope, state: CompressorState | None) -> torch.Tensor:
        """x (B, T, dim) -> all entries so far (B, n, D) with rope; `rope(positions)` gives (cos, sin).
        Without a state, x starts at position 0 and an unfinished last window is dropped."""
        B, m, D = x.shape[0], self.rate, self.head_dim
        kv, gate = self.wkv(x), self.wgate(x)
        first = 0
        if state is not None:
            first = state.count * m
            if state.buffer_kv is not None:
                kv, gate = torch.cat((state.buffer_kv, kv), 1), torch.cat((state.buffer_gate, gate), 1)
        usable = kv.shape[1] // m * m
        if state is not None:
            state.buffer_kv, state.buffer_gate = kv[:, usable:], gate[:, usable:]
        n = usable // m
        if n == 0:
            new = kv.new_zeros(B, 0, D)
        else:
            kv = kv[:, :usable].view(B, n, m, -1)  # (B, n, m, width)
            gate = gate[:, :usable].view(B, n, m, -1) + self.ape
            if self.overlap:
                kv, gate = self._overlap(kv, gate, state)  # (B, n, 2m, D)
            weights = gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)
            new = self.norm((kv * weights).sum(dim=2))  # (B, n, D)
            pos = (torch.arange(n, device=x.device) * m + first).expand(B, n)
            cos, sin = rope(pos)
            new = rope_trailing(new.unsqueeze(2), cos, sin).squeeze(2)
        if state is None:
            return new
        state.entries = new if state.entries is None else torch.cat((state.entries, new), 1)
        state.count += n
        return state.entries

    def _overlap(self, kv: torch.Tensor, gate: torch.Tensor, state: CompressorState | None):
        """(B, n, m, 2D) -> (B, n, 2m, D): slots [0, m) hold the previous window's Ca, [m, 2m) this one's Cb."""
        B, n, m, _ = kv.shape
        D = self.head_dim
        new_kv = kv.new_zeros(B, n, 2 * m, D)
        new_gate = gate.new_full((B, n, 2 * m, D), float("-inf"))  # empty slots get softmax weight 0
        new_kv[:, :, m:], new_gate[:, :, m:] = kv[..., D:], gate[..., D:]
        new_kv[:, 1:, :m], new_gate[:, 1:, :m] = kv[:, :-1, :, :D], gate[:, :-1, :, :D]
        if state is not None:
            if state.overlap_kv is not None:
                new_kv[:, 0, :m], new_gate[:, 0, :m] = state.overlap_kv, state.overlap_gate
            state.overlap_kv, state.overlap_gate = kv[:, -1, :, :D].clone(), gate[:, -1, :, :D].clone()
        return new_kv, new_gate


class Indexer(nn.Module):
    """CSA's lightning indexer (V4 eqs. 13-17): its own compressor at index_head_dim over the same windows,
    queries wq_b(q_latent) with compress rope, and score I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s]) *
    D_I**-0.5 with w = weights_proj(x) * H_I**-0.5.

    Same scoring formula as V3.2's LightningIndexer (dsa.py), but not the same module: V4's keys are
    compressed entries (gated, RMS-normed, rope on the trailing dims as interleaved pairs) where V3.2's are
    per-token keys (LayerNorm, rotate-half rope on the leading dims), so the key path and the rope differ.
    """

    def __init__(self, config: ModelConfig, rate: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.topk, self.rate = (config.index_n_heads, config.index_head_dim,
                                                             config.index_topk, rate)
        self.wq_b = Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = Linear(config.hidden_size, self.n_heads, bias=False)
        self.compressor = Compressor(config, self.head_dim, rate, overlap=True)

    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, rope, state: CompressorState | None) -> torch.Tensor:
        """-> picked entries (B, T, k) with -1 where the pick is not visible to the query; pos (B, T)."""
        B, T, _ = x.shape
        keys = self.compressor(x, rope, state).float()  # (B, n, D_I)
        n = keys.shape[1]
        q = rope_trailing(self.wq_b(q_latent).view(B, T, self.n_heads, self.head_dim), cos, sin).float()
        s = torch.relu(torch.einsum("bthd,bnd->bthn", q, keys)) * self.head_dim ** -0.5  # (B, T, H_I, n)
        # weights_proj stays fp32 in checkpoints (as transformers keeps it): score in fp32
        w = F.linear(x.float(), self.weights_proj.weight.float()) * self.n_heads ** -0.5  # (B, T, H_I)
        index = (s * w.unsqueeze(-1)).sum(dim=2)  # (B, T, n)
        visible = torch.arange(n, device=x.device) < ((pos + 1) // self.rate).unsqueeze(-1)  # (B, T, n)
        picks = index.masked_fill(~visible, float("-inf")).topk(min(self.topk, n), dim=-1).indices
        ok = picks < ((pos + 1) // self.rate).unsqueeze(-1)
        return torch.where(ok, picks, torch.full_like(picks, -1))


class V4Attention(nn.Module):
    """One V4 attention layer (see the module docstring). Checkpoint names: wq_a, q_norm, wq_b, wkv, norm,
    wo_a, wo_b, attn_sink, compressor.*, indexer.*."""

    def __init__(self, config: ModelConfig, layer_type: str) -> None:
        super().__init__()
        H, D, dim = config.num_attention_heads, config.head_dim, config.hidden_size
        self.layer_type, self.n_heads, self.head_dim = layer_type, H, D
        self.window, self.eps, self.groups = config.sliding_window, config.rms_norm_eps, config.o_groups
        self.wq_a = Linear(dim, config.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.wq_b = Linear(config.q_lora_rank, H * D, bias=False)
        self.wkv = Linear(dim, D, bias=False)
        self.norm = RMSNorm(D, config.rms_norm_eps)
        # wo_a: block diagonal, stored as (groups * o_lora_rank, H*D / groups) like transformers' grouped linear
        self.wo_a = Linear(H * D // config.o_groups, config.o_groups * config.o_lora_rank, bias=False)
        self.wo_b = Linear(config.o_groups * config.o_lora_rank, dim, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(H))
        self.compressor = self.indexer = None
        if layer_type != "sliding_attention":
            rate = config.compress_rates[layer_type]
            self.rate = rate
            csa = layer_type == "compressed_sparse_attention"
            self.compressor = Compressor(config, D, rate, overlap=csa)
            self.indexer = Indexer(config, rate) if csa else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope, pos: torch.Tensor,
                cache: V4LayerCache | None = None) -> torch.Tensor:
        """x (B, T, dim) at positions pos (B, T) (start .. start+T-1, the same in every row) -> (B, T, dim).
        cos/sin (B, T, R/2) of this layer's rope; rope(positions) -> (cos, sin) for compressed entries."""
        B, T, _ = x.shape
        q_latent = self.q_norm(self.wq_a(x))  # (B, T, Q)
        q = rms(self.wq_b(q_latent).view(B, T, self.n_heads, self.head_dim), self.eps)  # (B, T, H, D)
        q = rope_trailing(q, cos, sin)
        kv = rope_trailing(self.norm(self.wkv(x)).unsqueeze(2), cos, sin).squeeze(2)  # (B, T, D)
        start = int(pos[0, 0])
        if cache is not None:
            keys = kv if cache.window is None else torch.cat((cache.window, kv), 1)
            cache.window = keys[:, -(self.window - 1):] if self.window > 1 else keys[:, :0]
            cache.seen += T
        else:
            keys = kv
        kpos = torch.arange(start + T - keys.shape[1], start + T, device=x.device)  # (S,)
        qpos = pos[0]  # (T,)
        bias = torch.zeros(T, keys.shape[1], dtype=torch.float32, device=x.device)
        bias.masked_fill_(~((kpos[None] <= qpos[:, None]) & (qpos[:, None] - kpos[None] < self.window)),
                          float("-inf"))
        bias = bias.expand(B, T, -1)
        if self.compressor is not None:
            entries = self.compressor(x, rope, None if cache is None else cache.compressor)  # (B, n, D)
            n = entries.shape[1]
            if self.indexer is not None:
                picks = self.indexer(x, q_latent, pos, cos, sin, rope, None if cache is None else cache.indexer)
                safe = torch.where(picks >= 0, picks, torch.full_like(picks, n))
                extra = torch.full((B, T, n + 1), float("-inf"), device=x.device)
                extra = extra.scatter(-1, safe, 0.0)[..., :n]
            else:
                visible = torch.arange(n, device=x.device) < ((pos + 1) // self.rate).unsqueeze(-1)  # (B, T, n)
                extra = torch.zeros(B, T, n, device=x.device).masked_fill(~visible, float("-inf"))
            keys = torch.cat((keys, entries.to(keys.dtype)), 1)
            bias = torch.cat((bias, extra), -1)
        out = self._attend(q, keys, bias)  # (B, T, H, D)
        out = rope_trailing(out, cos, -sin)  # undo the values' rope at the query position
        grouped = out.reshape(B, T, self.groups, -1)  # (B, T, g, H*D/g)
        w = self.wo_a.weight.view(self.groups, -1, grouped.shape[-1])  # (g, r, H*D/g)
        mid = torch.einsum("btgi,gri->btgr", grouped, w).flatten(2)  # (B, T, g*r)
        return self.wo_b(mid)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Softmax attention with a per-head sink logit: q (B, T, H, D), keys = values (B, S, D), bias
        (B, T, S) additive -> (B, T, H, D)."""
        scores = torch.einsum("bthd,bsd->bhts", q, keys) * self.head_dim ** -0.5 + bias.unsqueeze(1).to(q.dtype)
        sink = self.attn_sink.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        logits = torch.cat((scores, sink), -1)
        logits = logits - logits.amax(-1, keepdim=True)
        probs = F.softmax(logits, dim=-1)[..., :-1]  # drop the sink
        return torch.einsum("bhts,bsd->bthd", probs.to(keys.dtype), keys)

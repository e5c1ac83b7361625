"""DeepSeek Sparse Attention (DeepSeek-V3.2 report, section 2.1): the lightning indexer and top-k selection.

For each query t the indexer scores every visible key s with a few cheap ReLU heads,

    I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s])          (V3.2 eq. 1)

and the main attention (MLA) looks only at the `index_topk` best keys of each query. The indexer's query
heads come from MLA's query latent (`wq_b`), its single key from the hidden state (`wk`, then a LayerNorm
`k_norm`), and the per-head weights from the hidden state (`weights_proj`, scaled by n_heads**-0.5). Its first
qk_rope_head_dim dims carry rope in the rotate-half layout (unlike MLA's interleaved rope), with MLA's cos/sin.
The official code's Hadamard rotation and FP8 scoring are precision devices (q.k is unchanged), so the
computation here is the plain one, as transformers' DeepseekV32Indexer does it, in fp32.

Below `index_topk` visible keys every key is selected: sparse attention is then exactly dense MLA.

Two forms of the sparse attention, one the twin of the other (tests assert they agree):
* masked (`MLAttention._naive` with the selection folded into the mask): per-head keys decompressed for all
  S positions, O(T * S) work; the reference.
* gathered (`sparse_latent_attention`): MLA's absorbed form over only the k selected latent rows of each query,
  O(T * k) work: what makes long-context prefill and decode cheaper than dense MLA.

The indexer is reusable on its own (V4's compressed sparse attention scores compressed keys the same way):
`LightningIndexer.key`, `.scores` and `select_topk` take plain tensors.

Shape legend: B batch, T query tokens, S key tokens, H_I indexer heads, D_I index_head_dim, K index_topk,
H MLA heads, C kv_lora_rank, R qk_rope_head_dim, Q q_lora_rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import ModelConfig
from .layers import Linear, apply_rope

if TYPE_CHECKING:
    from .attention import MLAttention
    from .cache import LatentCache

# Elements of one fp32 (chunk, heads, keys) score block: bounds the indexer's and the gathered attention's
# working memory at long context (~64 MiB) by scoring the queries in chunks.
_CHUNK_ELEMENTS = 1 << 24


class LightningIndexer(nn.Module):
    """The V3.2 lightning indexer of one layer (checkpoint names `self_attn.indexer.*`).

    Training hooks (dsmoe.train.indexer sets them; inference leaves them alone):
    `dense`: select every key (the report's dense warm-up stage); `loss_mode`: None, "dense" or "sparse" -
    when set, each forward stores in `last_loss` the KL divergence between the main attention's distribution
    and the indexer's (a scalar with gradients only into the indexer; see indexer_kl).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.q_lora_rank is None:
            raise ValueError("ModelConfig.q_lora_rank: the lightning indexer reads the query latent; it must be set")
        self.n_heads, self.head_dim, self.topk = config.index_n_heads, config.index_head_dim, config.index_topk
        self.rope_dim = config.qk_rope_head_dim
        self.wq_b = Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = Linear(config.hidden_size, self.n_heads, bias=False)
        self.softmax_scale = self.head_dim ** -0.5
        self.dense = False
        self.loss_mode: str | None = None
        self.last_loss: torch.Tensor | None = None

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half rope on the first R dims of x (B, T, heads, D_I); the rest pass through."""
        x_pe, x_rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat((apply_rope(x_pe, cos, sin, interleaved=False), x_rest), dim=-1)

    def key(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, T, dim) -> the shared index key (B, T, D_I): what the cache keeps beside MLA's latent."""
        k = self.k_norm(self.wk(x)).unsqueeze(2)  # (B, T, 1, D_I)
        return self._rope(k, cos, sin).squeeze(2)

    def scores(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Index scores I (B, T, S) in fp32, -inf where `mask` (bool, broadcastable to (B, T, S), True = visible)
        hides a key; mask None = every key visible.

        x (B, T, dim) and q_latent (B, T, Q) of the T queries; keys (B, S, D_I) from `key`. Per head the score
        is ReLU(softmax_scale * q.k); heads are summed with weights weights_proj(x) * H_I**-0.5."""
        B, T, _ = x.shape
        H, S = self.n_heads, keys.shape[1]
        q = self._rope(self.wq_b(q_latent).view(B, T, H, self.head_dim), cos, sin).float()  # (B, T, H_I, D_I)
        # ReLU(scale * q.k) = scale * ReLU(q.k): the scale goes on the (smaller) query
        q = (q * self.softmax_scale).reshape(B, T * H, self.head_dim)  # (B, T*H_I, D_I): one bmm per chunk
        w = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * H ** -0.5  # (B, T, H_I)
        k = keys.float().transpose(1, 2)  # (B, D_I, S)
        step = max(1, _CHUNK_ELEMENTS // max(1, H * S * B))
        index = torch.empty(B, T, S, dtype=torch.float32, device=x.device)
        for i in range(0, T, step):
            t = min(step, T - i)
            s = torch.relu(torch.bmm(q[:, i * H:(i + t) * H], k)).view(B * t, H, S)  # (B*t, H_I, S)
            index[:, i:i + t] = torch.bmm(w[:, i:i + t].reshape(B * t, 1, H), s).view(B, t, S)
        return index if mask is None else index.masked_fill(~mask, float("-inf"))


def visible_keys(mask: torch.Tensor | None, T: int, S: int, device: torch.device) -> torch.Tensor | None:
    """The bool (B or 1, T, S) visibility of keys for T queries at the last T of S slots, from the model's
    attention mask (bool (B, 1, T, S) or None = causal); None when every key is visible (one decode token)."""
    if mask is not None:
        return mask[:, 0]
    if T == 1:
        return None
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None]


def select_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (B, T, S) -> indices (B, T, k') of the k' = min(k, S) best keys per query and valid (B, T, k'),
    False where the pick is a hidden key (-inf score: fewer than k visible keys). Ties go to torch.topk's
    order, as in transformers."""
    values, indices = scores.topk(min(k, scores.shape[-1]), dim=-1)
    return indices, values > float("-inf")


def selection_mask(indices: torch.Tensor, valid: torch.Tensor, S: int) -> torch.Tensor:
    """indices, valid (B, T, k) -> bool (B, 1, T, S): True at the valid selected keys."""
    B, T, _ = indices.shape
    chosen = torch.zeros(B, T, S, dtype=torch.bool, device=indices.device)
    return chosen.scatter_(-1, indices, valid).unsqueeze(1)


def gather_rows(latent: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """latent (B, S, W), indices (B, t, k) -> (B, t, k, W): each query's selected rows."""
    B, S, W = latent.shape
    flat = indices + torch.arange(B, device=indices.device).view(B, 1, 1) * S  # (B, t, k) rows of (B*S, W)
    return latent.reshape(B * S, W).index_select(0, flat.reshape(-1)).view(*indices.shape, W)


def sparse_latent_attention(q: torch.Tensor, latent: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor,
                            scale: float, kv_rank: int) -> torch.Tensor:
    """Absorbed MLA over the selected latent rows only.

    q (B, T, H, C + R): queries folded into latent space (MLAttention.absorbed_query); latent (B, S, C + R);
    indices, valid (B, T, K) from select_topk. Returns (B, T, H, C) attention outputs in latent space (apply
    W_UV with MLAttention.absorbed_output). Work and memory are O(T * K), whatever S is; queries are processed
    in chunks so the gathered rows stay bounded."""
    B, T, H, W = q.shape
    K = indices.shape[-1]
    step = max(1, _CHUNK_ELEMENTS // max(1, B * K * max(H, W)))
    if step >= T:  # one chunk (every decode step): no copy into a preallocated output
        return _gathered_chunk(q, latent, indices, valid, scale, kv_rank)
    out = q.new_empty(B, T, H, kv_rank)
    for i in range(0, T, step):
        out[:, i:i + step] = _gathered_chunk(q[:, i:i + step], latent, indices[:, i:i + step],
                                             valid[:, i:i + step], scale, kv_rank)
    return out


def _gathered_chunk(q: torch.Tensor, latent: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor,
                    scale: float, kv_rank: int) -> torch.Tensor:
    rows = gather_rows(latent, indices)  # (B, t, K, C + R)
    scores = torch.matmul(q, rows.transpose(-1, -2)).float() * scale  # (B, t, H, K)
    probs = scores.masked_fill(~valid.unsqueeze(2), float("-inf")).softmax(dim=-1).to(q.dtype)
    return torch.matmul(probs, rows[..., :kv_rank])  # (B, t, H, C)


def indexed_attention(attn: "MLAttention", x: torch.Tensor, q_latent: torch.Tensor, q_nope: torch.Tensor,
                      q_pe: torch.Tensor, latent: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                      cache: "LatentCache | None", start: int, mask: torch.Tensor | None) -> torch.Tensor:
    """MLA restricted to the indexer's top-k keys -> (B, T, H * V), before the output projection.

    latent (B, S, C + R) holds all S visible positions (the cache's, or this call's); the index keys of
    the T new tokens are written to the cache beside it. While S <= index_topk (or in the dense warm-up)
    every key is selected and this is MLA's dense path. Otherwise the gathered absorbed form runs when it
    costs fewer FLOPs (attn.absorb None) or is forced (True), the masked naive form when forced (False)."""
    indexer: LightningIndexer = attn.indexer
    cos, sin = rope
    T, S = x.shape[1], latent.shape[1]
    if indexer.loss_mode is not None:  # the indexer learns from its own loss only (V3.2 section 2.1.1)
        x, q_latent = x.detach(), q_latent.detach()
    keys = indexer.key(x, cos, sin)  # (B, T, D_I)
    if cache is not None:
        keys = cache.update_index(start, keys)  # (B, S, D_I)
    sparse = S > indexer.topk and not indexer.dense
    visible = visible_keys(mask, T, S, x.device)
    scores = None
    if sparse or indexer.loss_mode is not None:
        scores = indexer.scores(x, q_latent, cos, sin, keys, visible)
    if not sparse:
        absorb = attn.absorb if attn.absorb is not None else attn._absorb_is_cheaper(T, S, cache is not None)
        out = (attn._absorbed if absorb else attn._naive)(q_nope, q_pe, latent, mask)
        if indexer.loss_mode is not None:
            indexer.last_loss = indexer_kl(attn, q_nope, q_pe, latent, scores, keys=visible)
        return out
    with torch.no_grad():
        indices, valid = select_topk(scores, indexer.topk)
    absorb = attn.absorb if attn.absorb is not None else _gather_is_cheaper(attn, T, S, indices.shape[-1])
    if absorb:
        q = attn.absorbed_query(q_nope, q_pe)  # (B, T, H, C + R)
        out = attn.absorbed_output(sparse_latent_attention(q, latent, indices, valid, attn.scale, attn.kv_rank))
    else:
        # a valid pick is a visible key (finite score): the selection alone is the whole mask
        out = attn._naive(q_nope, q_pe, latent, selection_mask(indices, valid, S))
    if indexer.loss_mode is not None:
        indexer.last_loss = indexer_kl(attn, q_nope, q_pe, latent, scores, selected=(indices, valid))
    return out


def _gather_is_cheaper(attn: "MLAttention", T: int, S: int, K: int) -> bool:
    """Per head: the masked naive form decompresses S latents, S*C*(N+V), and attends over all S keys,
    T*S*(N+R+V); the gathered form folds the query and output, T*C*(N+V), and attends over K latent rows,
    T*K*(2C+R)."""
    C, N, R, V = attn.kv_rank, attn.nope_dim, attn.rope_dim, attn.v_dim
    return T * C * (N + V) + T * K * (2 * C + R) < S * C * (N + V) + T * S * (N + R + V)


def indexer_kl(attn: "MLAttention", q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
               scores: torch.Tensor, keys: torch.Tensor | None = None,
               selected: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The indexer's training loss (V3.2 section 2.1.1): mean over queries of KL(p_t || softmax(I_t)).

    p_t is the main attention's distribution summed over heads and L1-normalised, computed without gradients
    over the keys the main attention uses. Dense warm-up: `keys` (bool (B, T, S), True = visible; None = all).
    Sparse stage: `selected` = (indices, valid) (B, T, K) from select_topk, the set S_t; there p is the sparse
    attention's own distribution and softmax(I) is restricted to S_t too, both over the K gathered rows (O(T*K)).
    scores (B, T, S): the indexer's I, -inf at hidden keys; gradients flow into the indexer only."""
    with torch.no_grad():
        q = attn.absorbed_query(q_nope, q_pe)  # (B, T, H, C + R): q.k of the absorbed form = the naive q.k
        B, T, H, W = q.shape
        if selected is None:  # one bmm over all T*H query rows (a broadcast matmul would copy latent T times)
            allowed = keys
            logits = torch.bmm(q.reshape(B, T * H, W), latent.transpose(1, 2)).view(B, T, H, -1)  # (B, T, H, S)
        else:
            indices, allowed = selected
            rows = gather_rows(latent, indices)  # (B, T, K, C + R)
            logits = torch.matmul(q, rows.transpose(-1, -2))  # (B, T, H, K)
        logits = logits.float() * attn.scale
        if allowed is not None:
            logits = logits.masked_fill(~allowed.unsqueeze(2), float("-inf"))
        p = logits.softmax(dim=-1).mean(dim=2)  # (B, T, S or K): heads summed, L1-normalised (each sums to 1)
    if selected is not None:
        scores = scores.gather(-1, selected[0])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    log_q = torch.log_softmax(scores, dim=-1)
    # masked_fill, not where: a hidden key's -inf never meets a 0 in the product, forward or backward
    log_q = log_q.masked_fill(p == 0, 0.0)
    kl = (torch.special.xlogy(p, p) - p * log_q).sum(dim=-1)  # (B, T)
    return kl.mean()

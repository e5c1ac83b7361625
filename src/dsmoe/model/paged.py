"""Forward over a paged cache: one packed, ragged batch of tokens for the serving engine (dsmoe.serve).

An engine step packs the tokens of many sequences into one row: each running sequence's decode token and
chunks of prompts, every token with its own position (no left padding). Keys live in a pool of fixed-size
blocks (vLLM's PagedAttention); each sequence's block table says which blocks hold its positions in order.
Projections, norms and MoE layers run once over the packed row; only attention is per sequence: the
single-token sequences (decodes) as one batch over their gathered keys with a key-length mask, each longer
chunk on its own with the causal mask at the end of its keys.

The contiguous cache (model/cache.py, Transformer.forward with a ModelCache) is the slow twin: the same
projections, the same attention forms (GQAttention's; MLAttention's _naive / _absorbed), only the keys'
storage differs.

Pool layouts per layer (P = block_size, NB blocks):
  latent        MLA: (NB, P, C + R), [c_kv | k_pe] as LatentCache keeps it (DeepSeek-V2 section 2.1.3).
  kv            GQA/MHA: K and V, each (NB, P, G, D).
  decompressed  MLA with per-head keys (NB, P, H, N + R) and values (NB, P, H, V), as an MHA cache would
                hold them; only for comparing cache sizes (the same outputs in H(N+R+V)/(C+R) times the memory).

Shape legend: M packed tokens, Bd decoding sequences, K blocks per table, S keys of a sequence, H heads,
G kv heads, D head width, N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, C kv_lora_rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import GQAttention, MLAttention, Rope, attention
from .layers import apply_rope
from .transformer import Transformer

PagedLayer = tuple[torch.Tensor, ...]  # (latent,) or (k, v)


@dataclass
class Chunk:
    """A sequence with several new tokens: packed rows start..start+length, at the last `length` of its
    `context` positions; table (K,) its block ids. mask: (1, 1, T, S) bool when a sliding window hides
    keys; None = plain causal with the queries at the last T of the S keys."""

    start: int
    length: int
    table: torch.Tensor
    context: int
    mask: torch.Tensor | None = None


@dataclass
class PagedBatch:
    """Attention metadata of one packed step.

    positions (M,): each token's position in its sequence (rope). slots (M,): where its keys are written,
    block * block_size + offset. Decoding sequences (one new token each): decode_rows (Bd,) their packed
    rows, decode_tables (Bd, K) block tables padded with any valid block id, decode_lens (Bd,) context
    lengths including the new token. chunks: every sequence with more than one new token.
    window: sliding-window attention (Mistral / Mixtral): a query sees only the last `window` positions,
    itself included; None = all.
    `with_masks()` fills decode_keys (the longest context), decode_mask (None when every decoding sequence
    has that many keys and no window hides any: e.g. a single stream) and the chunks' window masks.
    """

    positions: torch.Tensor
    slots: torch.Tensor
    decode_rows: torch.Tensor | None = None
    decode_tables: torch.Tensor | None = None
    decode_lens: torch.Tensor | None = None
    chunks: tuple[Chunk, ...] = ()
    decode_keys: int = 0
    decode_mask: torch.Tensor | None = None
    window: int | None = None

    def with_masks(self) -> "PagedBatch":
        """Compute the masks once per step (every layer uses them)."""
        if self.decode_lens is not None:
            lo, hi = (int(v) for v in torch.aminmax(self.decode_lens))
            self.decode_keys = hi
            windowed = self.window is not None and hi > self.window
            self.decode_mask = None if lo == hi and not windowed else _key_mask(self.decode_lens, hi, self.window)
        for c in self.chunks:
            if self.window is not None and c.context > self.window:
                q = torch.arange(c.context - c.length, c.context, device=c.table.device)[:, None]  # (T, 1)
                k = torch.arange(c.context, device=c.table.device)[None, :]  # (1, S)
                c.mask = ((k <= q) & (k > q - self.window))[None, None]
        return self

    @property
    def only_decodes(self) -> bool:
        """Every packed token is a decode, in order (rows 0..M-1): outputs need no scatter."""
        return not self.chunks and self.decode_rows is not None


def _write(pool: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """Store values (M, ...) at flat slots of pool (NB, P, ...)."""
    pool.view(-1, *pool.shape[2:]).index_copy_(0, slots, values.to(pool.dtype))


def _gather(pool: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """pool (NB, P, ...), tables (B, K) -> every listed block's slots in order (B, K*P, ...)."""
    B, K = tables.shape
    # index_select over the block dimension: a plain row copy, cheaper than advanced indexing
    return pool.index_select(0, tables.reshape(-1)).view(B, K * pool.shape[1], *pool.shape[2:])


def _key_mask(lens: torch.Tensor, S: int, window: int | None = None) -> torch.Tensor:
    """(Bd, 1, 1, S) bool: key s is one of the sequence's first lens[b] (and of its last `window`)."""
    keys = torch.arange(S, device=lens.device)[None, :]
    mask = keys < lens[:, None]
    if window is not None:
        mask &= keys >= lens[:, None] - window
    return mask[:, None, None]


def _attend_kv(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: PagedBatch,
               scale: float) -> torch.Tensor:
    """Ordinary attention of q (M, H, D) over paged k (NB, P, G, D) and v (NB, P, G, V) -> (M, H, V)."""
    out = q.new_empty(q.shape[0], q.shape[1], v_pool.shape[-1])
    if meta.decode_rows is not None:
        S = meta.decode_keys
        k = _gather(k_pool, meta.decode_tables)[:, :S]  # (Bd, S, G, D)
        v = _gather(v_pool, meta.decode_tables)[:, :S]
        q_dec = q[:, :, None] if meta.only_decodes else q[meta.decode_rows][:, :, None]  # (Bd, H, 1, D)
        o = attention(q_dec, k.transpose(1, 2), v.transpose(1, 2), scale, meta.decode_mask)[:, :, 0]
        if meta.only_decodes:
            return o  # (Bd, H, V)
        out[meta.decode_rows] = o
    for c in meta.chunks:
        k = _gather(k_pool, c.table[None])[:, :c.context]  # (1, S, G, D)
        v = _gather(v_pool, c.table[None])[:, :c.context]
        qc = q[c.start:c.start + c.length].transpose(0, 1)[None]  # (1, H, T, D)
        # mask None: causal with the chunk's queries at the last T of the S keys
        o = attention(qc, k.transpose(1, 2), v.transpose(1, 2), scale, c.mask)
        out[c.start:c.start + c.length] = o[0].transpose(0, 1)
    return out


def _gqa(attn: GQAttention, x: torch.Tensor, rope: Rope, layer: PagedLayer, meta: PagedBatch) -> torch.Tensor:
    """GQAttention.forward's projections over packed x (1, M, dim); keys read from the paged pool."""
    M, D = x.shape[1], attn.head_dim
    cos, sin = rope
    q = apply_rope(attn.wq(x).view(1, M, -1, D), cos, sin, interleaved=False)[0]  # (M, H, D)
    k = apply_rope(attn.wk(x).view(1, M, -1, D), cos, sin, interleaved=False)[0]  # (M, G, D)
    v = attn.wv(x).view(M, -1, D)
    k_pool, v_pool = layer
    _write(k_pool, meta.slots, k)
    _write(v_pool, meta.slots, v)
    out = _attend_kv(q, k_pool, v_pool, meta, attn.scale)
    return attn.wo(out.reshape(1, M, -1))


def _use_absorbed(attn: MLAttention, T: int, S: int) -> bool:
    return attn.absorb if attn.absorb is not None else attn._absorb_is_cheaper(T, S, S > T)


def _mla(attn: MLAttention, x: torch.Tensor, rope: Rope, layer: PagedLayer, meta: PagedBatch) -> torch.Tensor:
    """MLAttention.forward over packed x (1, M, dim) with the latent [c_kv | k_pe] paged: decodes attend in
    the absorbed form on the gathered latent (or naive when attn.absorb is False), chunks by the same
    FLOP rule as the contiguous path."""
    M = x.shape[1]
    cos, sin = rope
    q_nope, q_pe = attn.query(x, cos, sin)  # (1, M, H, N), (1, M, H, R)
    c_kv, k_pe = attn.latent(x, cos, sin)  # (1, M, C), (1, M, R)
    if len(layer) == 2:
        return _mla_decompressed(attn, q_nope, q_pe, c_kv, k_pe, layer, meta)
    pool = layer[0]
    _write(pool, meta.slots, torch.cat((c_kv, k_pe), dim=-1)[0])
    out = q_nope.new_empty(1, M, q_nope.shape[2] * attn.v_dim)
    if meta.decode_rows is not None:
        latent = _gather(pool, meta.decode_tables)[:, :meta.decode_keys]  # (Bd, S, C + R)
        impl = attn._absorbed if _use_absorbed(attn, 1, latent.shape[1]) else attn._naive
        if meta.only_decodes:  # (1, Bd, ...) -> (Bd, 1, ...): a view, no gather
            o = impl(q_nope.transpose(0, 1), q_pe.transpose(0, 1), latent, meta.decode_mask)  # (Bd, 1, H*V)
            return attn.wo(o.transpose(0, 1))
        rows = meta.decode_rows
        o = impl(q_nope[0, rows][:, None], q_pe[0, rows][:, None], latent, meta.decode_mask)
        out[0, rows] = o[:, 0]  # (Bd, H*V)
    for c in meta.chunks:
        latent = _gather(pool, c.table[None])[:, :c.context]  # (1, S, C + R)
        impl = attn._absorbed if _use_absorbed(attn, c.length, c.context) else attn._naive
        span = slice(c.start, c.start + c.length)
        out[:, span] = impl(q_nope[:, span], q_pe[:, span], latent, c.mask)
    return attn.wo(out)


def _mla_decompressed(attn: MLAttention, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
                      k_pe: torch.Tensor, layer: PagedLayer, meta: PagedBatch) -> torch.Tensor:
    """MLA with per-head keys and values cached (the MHA-sized layout), attention as MLAttention._naive."""
    _, M, H, _ = q_nope.shape
    kv = attn.wkv_b(c_kv[0]).view(M, H, attn.nope_dim + attn.v_dim)
    k_nope, v = kv.split([attn.nope_dim, attn.v_dim], dim=-1)  # (M, H, N), (M, H, V)
    k = torch.cat((k_nope, k_pe[0][:, None].expand(-1, H, -1)), dim=-1)  # (M, H, N + R)
    k_pool, v_pool = layer
    _write(k_pool, meta.slots, k)
    _write(v_pool, meta.slots, v)
    q = torch.cat((q_nope, q_pe), dim=-1)[0]  # (M, H, N + R)
    out = _attend_kv(q, k_pool, v_pool, meta, attn.scale)  # (M, H, V)
    return attn.wo(out.reshape(1, M, H * attn.v_dim))


def paged_attention(attn: torch.nn.Module, x: torch.Tensor, rope: Rope, layer: PagedLayer,
                    meta: PagedBatch) -> torch.Tensor:
    """One attention layer over the packed step x (1, M, dim) -> (1, M, dim)."""
    if isinstance(attn, MLAttention):
        return _mla(attn, x, rope, layer, meta)
    if isinstance(attn, GQAttention):
        return _gqa(attn, x, rope, layer, meta)
    raise TypeError(f"paged attention supports GQAttention and MLAttention, not {type(attn).__name__}")


def paged_hidden_states(model: Transformer, ids: torch.Tensor, meta: PagedBatch,
                        layers: list[PagedLayer]) -> torch.Tensor:
    """Packed ids (M,) at meta.positions -> final-normed hidden states (M, D); every token's keys are
    written to its slot first, so a token attends to itself and the earlier positions of its sequence.
    The same pre-norm blocks as Block.forward: attention, then dense MLP or MoE over the packed tokens."""
    x = model.embed(ids)[None]  # (1, M, D)
    rope = model.rope(meta.positions, x.dtype)  # cos, sin (M, R/2)
    for block, layer in zip(model.layers, layers[:len(model.layers)], strict=True):
        x = x + paged_attention(block.attn, block.attn_norm(x), rope, layer, meta)
        x = x + block.ffn(block.ffn_norm(x))
    return model.norm(x)[0]


def paged_mtp_hidden(model: Transformer, depth: int, h_prev: torch.Tensor, next_ids: torch.Tensor,
                     meta: PagedBatch, layer: PagedLayer) -> torch.Tensor:
    """MTP module `depth` (DeepSeek-V3 section 2.2) over a packed step: h_prev (M, D) the main model's
    final-normed hidden states at meta.positions, next_ids (M,) the token after each -> h (M, D), un-normed
    (logits: model.head(model.mtp[depth].norm(h))). MTPModule.forward with its block's keys paged in `layer`."""
    mtp = model.mtp[depth]
    x = mtp.eh_proj(torch.cat((mtp.enorm(model.embed(next_ids)), mtp.hnorm(h_prev)), dim=-1))[None]  # (1, M, D)
    rope = model.rope(meta.positions, x.dtype)
    block = mtp.block
    x = x + paged_attention(block.attn, block.attn_norm(x), rope, layer, meta)
    return (x + block.ffn(block.ffn_norm(x)))[0]

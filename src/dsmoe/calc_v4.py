"""The architecture calculator for DeepSeek-V4 (closed forms over a deepseek_v4 ModelConfig).

Counted as dsmoe.model.v4 / transformers' DeepseekV4ForCausalLM build them (tests/test_v4_calc.py checks both
on the meta device for the published configurations):

* attention, every layer: wq_a (dim x Q), q_norm (Q), wq_b (Q x H*D), wkv (dim x D), norm (D), wo_a (H*D x r,
  block diagonal over o_groups), wo_b (g*r x dim), attn_sink (H);
  plus for CSA (rate m): compressor wkv + wgate (dim x 2D each), ape (m x 2D), norm (D), and the indexer: wq_b
  (Q x H_I*D_I), weights_proj (dim x H_I) and its own compressor at D_I (2 x dim x 2D_I, m x 2D_I, D_I);
  for HCA (rate m'): compressor wkv + wgate (dim x D each), ape (m' x D), norm (D).
* MoE, every layer: gate (E x dim), E routed + 1 shared SwiGLU experts of moe_intermediate_size; the router
  bias (top-k layers) and the hash table tid2eid (vocab x K, hash layers) are buffers, not parameters.
* hyper-connections: per layer two of fn ((2+N)N x N*dim), base ((2+N)N), scale (3); the head's fn (N x N*dim),
  base (N), scale (1).
* activated per token: total minus (E - K) experts in every MoE layer; the MTP module (`mtp.*` in the Hub
  checkpoint) is not counted, as in the published totals.

KV cache (V4 section 2.3; elements, what dsmoe's cache holds, which is what the method needs):
* sliding layer: the last `sliding_window` shared key/value vectors (D each), whatever the context;
* CSA layer: the window, plus one compressed entry (D) per m tokens, plus one indexer key (D_I) per m tokens;
* HCA layer: the window, plus one compressed entry (D) per m' tokens.
The small compressor state (an unfinished window, CSA's overlap half) is left out. Against it: DeepSeek-V3's
MLA latent (kv_lora_rank + rope = 576 per token per layer) and an MHA model of V4's heads (2 * H * D per token
per layer).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .config_v4 import v4_rope_dim  # noqa: F401  (documents where the rope width comes from)

BF16_BYTES = 2
V3_LATENT_PER_LAYER = 512 + 64  # DeepSeek-V3: kv_lora_rank + qk_rope_head_dim
CONTEXTS = (128 * 1024, 1024 * 1024)


def attention_params(config: ModelConfig, layer_type: str) -> int:
    """Parameters of one V4 attention layer of `layer_type`."""
    dim, Q, H, D = config.hidden_size, config.q_lora_rank, config.num_attention_heads, config.head_dim
    g, r = config.o_groups, config.o_lora_rank
    n = dim * Q + Q + Q * H * D + dim * D + D + H * D * r + g * r * dim + H
    if layer_type == "compressed_sparse_attention":
        m, Hi, Di = config.compress_rates[layer_type], config.index_n_heads, config.index_head_dim
        n += 2 * dim * 2 * D + m * 2 * D + D
        n += Q * Hi * Di + dim * Hi + 2 * dim * 2 * Di + m * 2 * Di + Di
    elif layer_type == "heavily_compressed_attention":
        m = config.compress_rates[layer_type]
        n += 2 * dim * D + m * D + D
    return n


def expert_params(config: ModelConfig) -> int:
    return 3 * config.hidden_size * config.moe_intermediate_size


def moe_params(config: ModelConfig) -> int:
    """Gate, routed experts and the shared expert of one layer."""
    return config.n_routed_experts * config.hidden_size + (config.n_routed_experts + config.n_shared_experts) * \
        expert_params(config)


def hyper_params(config: ModelConfig) -> int:
    """The two hyper-connections of one block."""
    n, dim = config.hc_mult, config.hidden_size
    return 2 * ((2 + n) * n * n * dim + (2 + n) * n + 3)


def layer_params(config: ModelConfig, index: int) -> int:
    return (attention_params(config, config.layer_types[index]) + moe_params(config) + hyper_params(config)
            + 2 * config.hidden_size)


def total_params(config: ModelConfig) -> int:
    dim, V, n = config.hidden_size, config.vocab_size, config.hc_mult
    head = 0 if config.tie_word_embeddings else V * dim
    return (V * dim + sum(layer_params(config, i) for i in range(config.num_hidden_layers)) + dim + head
            + n * n * dim + n + 1)


def activated_params(config: ModelConfig) -> int:
    unused = (config.n_routed_experts - config.num_experts_per_tok) * expert_params(config)
    return total_params(config) - config.num_hidden_layers * unused


@dataclass(frozen=True)
class KVCacheRow:
    """Cached elements of one sequence of `context` tokens, for one layer of a kind (or all layers)."""

    kind: str
    layers: int
    context: int
    elements_per_layer: int

    @property
    def elements(self) -> int:
        return self.elements_per_layer * self.layers

    @property
    def per_token(self) -> float:
        return self.elements / self.context


def layer_cache_elements(config: ModelConfig, layer_type: str, context: int) -> int:
    """Elements one V4 layer of `layer_type` caches for a sequence of `context` tokens."""
    D = config.head_dim
    n = min(context, config.sliding_window) * D
    if layer_type != "sliding_attention":
        entries = context // config.compress_rates[layer_type]
        n += entries * D
        if layer_type == "compressed_sparse_attention":
            n += entries * config.index_head_dim
    return n


def kv_cache_rows(config: ModelConfig, context: int) -> list[KVCacheRow]:
    """One row per V4 layer type present, then the model total, V3's latent cache with the same number of
    layers, and an MHA cache of V4's heads."""
    rows = []
    for kind in ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"):
        count = config.layer_types.count(kind)
        if count:
            rows.append(KVCacheRow(kind, count, context, layer_cache_elements(config, kind, context)))
    L = config.num_hidden_layers
    total = sum(r.elements for r in rows)
    rows.append(KVCacheRow("total", 1, context, total))
    rows.append(KVCacheRow("V3 MLA latent (576 / token / layer)", L, context, V3_LATENT_PER_LAYER * context))
    rows.append(KVCacheRow("MHA of the same heads", L, context,
                           2 * config.num_attention_heads * config.head_dim * context))
    return rows


def kv_cache_per_token(config: ModelConfig, context: int) -> float:
    """Average cached elements per token, all layers, for a `context`-token sequence."""
    return sum(layer_cache_elements(config, t, context) for t in config.layer_types) / context


def attention_flops_per_token(config: ModelConfig, context: int) -> int:
    """One query at `context`: q.k and p.v over its window and the compressed entries it reads (CSA: the
    top-k picked; HCA: all), plus CSA's index scores over every entry."""
    H, D = config.num_attention_heads, config.head_dim
    total = 0
    for kind in config.layer_types:
        keys = min(context, config.sliding_window)
        if kind != "sliding_attention":
            entries = context // config.compress_rates[kind]
            if kind == "compressed_sparse_attention":
                keys += min(entries, config.index_topk)
                total += 2 * config.index_n_heads * (config.index_head_dim + 1) * entries
            else:
                keys += entries
        total += 2 * H * D * 2 * keys
    return total


def arch_stats_v4(config: ModelConfig, context: int):
    """calc.ArchStats for a deepseek_v4 config (see the module docstring)."""
    from .calc import ArchStats, LayerStats

    dim = config.hidden_size
    unused = (config.n_routed_experts - config.num_experts_per_tok) * expert_params(config)
    layers = []
    for i, kind in enumerate(config.layer_types):
        attn, ffn = attention_params(config, kind), moe_params(config)
        norms = 2 * dim + hyper_params(config)
        total = attn + ffn + norms
        layers.append(LayerStats(i, "moe", attn, ffn, norms, total, total - unused))
    embedding = config.vocab_size * dim
    head = 0 if config.tie_word_embeddings else embedding
    total = total_params(config)
    activated = activated_params(config)
    biases = config.n_routed_experts * config.mlp_layer_types.count("moe")
    hashes = config.vocab_size * config.num_experts_per_tok * config.mlp_layer_types.count("hash_moe")
    kv = round(kv_cache_per_token(config, context))
    mha = 2 * config.num_attention_heads * config.head_dim * config.num_hidden_layers
    # matmul weights a token multiplies by: activated minus the embedding lookup (the head is a matmul)
    matmul = 2 * (activated - embedding)
    attn = attention_flops_per_token(config, context)
    dense = 2 * config.num_attention_heads * config.head_dim * 2 * context * config.num_hidden_layers
    return ArchStats(
        model_type=config.model_type, num_layers=config.num_hidden_layers, num_moe_layers=config.num_hidden_layers,
        embedding_params=embedding, head_params=head, total_params=total, activated_params=activated,
        activated_nonembedding_params=activated - embedding, mtp_params=0, router_bias_numel=biases,
        checkpoint_numel=total + biases + hashes,
        kv_cache_per_token=kv, kv_cache_bytes_per_token=kv * BF16_BYTES,
        mha_kv_cache_per_token=mha, mha_kv_cache_bytes_per_token=mha * BF16_BYTES,
        kv_cache_ratio=mha / max(kv, 1), context_length=context,
        matmul_flops_per_token=matmul, attention_flops_per_token=attn, flops_per_token=matmul + attn,
        dense_attention_flops_per_token=dense, indexer_flops_per_token=0, layers=tuple(layers))

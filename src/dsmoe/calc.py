"""Architecture calculator: closed-form parameter, KV-cache and FLOP counts from a ModelConfig.

Nothing here builds a model; every count is a formula over the config, checked in tests/test_calc.py
against the parameters of `dsmoe.Transformer` and of the transformers models built on the meta device.

What is counted (mirrors src/dsmoe/model):

* total_params      every nn.Parameter of the main model: embedding, per block two RMSNorms + attention
                    (projections, their biases when attention_bias, q_norm / kv_norm for MLA) + FFN (dense
                    SwiGLU, or router weight + routed experts + shared experts), final norm, output head
                    (not counted again when tie_word_embeddings). Excludes the MTP modules.
* router_bias_numel V3's e_score_correction_bias (noaux_tc) is a buffer, not a parameter: it is trained by
                    the balancer, not SGD, so it is not in total_params, but checkpoints store it.
* mtp_params        DeepSeek-V3's multi-token-prediction modules as its checkpoint lays them out, per
                    module: enorm + hnorm (hidden each), eh_proj (hidden x 2*hidden), one Transformer block
                    (MoE: it is layer num_hidden_layers + k), shared_head.norm (hidden). The embedding and output head are shared
                    with the main model (V3 section 2.2), so they count 0 here; the Hub checkpoint stores a
                    copy of both per module anyway, which `checkpoint_numel` includes.
* activated_params  per token: total_params minus, in each MoE layer, the routed experts it does not use,
                    (n_routed_experts - num_experts_per_tok) x one expert. The embedding row lookup is
                    counted in full, as DeepSeekMoE and Mixtral count it (16B: 2.8B, 8x7B: 12.9B);
                    DeepSeek-V2-Lite's "2.4B activated" leaves the embedding out, which
                    activated_nonembedding_params reproduces.
* flops_per_token   forward pass of one token that attends to `context` positions:
                    2 x activated matmul weights (every projection, router, experts used, output head; not
                    the embedding lookup, norms or biases) + attention scores and values: MLA in its naive
                    form 2 * heads * (qk_head_dim + v_head_dim) * context per layer; GQA
                    2 * heads * head_dim * 2 * context per layer. A causal prefill of L tokens averages
                    about half of the attention term at context = L.
* DSA (V3.2)        the lightning indexer is part of attention_params (wq_b, wk, k_norm weight and bias,
                    weights_proj) and of the matmul weights; its key (index_head_dim per layer) is in the KV
                    cache; attention FLOPs at `context` are the main attention over min(context, index_topk)
                    keys plus the indexer's scores over all of them, 2 * index_n_heads * (index_head_dim + 1)
                    * context per layer (q.k per head, then the weighted sum over heads):
                    O(k) + a small O(L) per token, O(L*k) per sequence, against dense MLA's O(L) / O(L^2)
                    (dense_attention_flops_per_token).
* KV cache          elements per token over all layers. MLA caches the latent and the shared rope key,
                    (kv_lora_rank + qk_rope_head_dim) per layer; GQA caches K and V, 2 * kv_heads * head_dim.
                    The MHA equivalent is V2's Table 1 baseline, 2 * heads * d_h per layer with d_h the
                    per-head width (qk_nope_head_dim; the decoupled rope key is MLA's own addition);
                    GQA with kv_heads = heads.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig

BF16_BYTES = 2
DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class LayerStats:
    index: int
    kind: str  # "dense" or "moe"
    attention_params: int
    ffn_params: int
    norm_params: int  # attn_norm + ffn_norm
    total_params: int
    activated_params: int


@dataclass(frozen=True)
class ArchStats:
    model_type: str
    num_layers: int
    num_moe_layers: int
    embedding_params: int
    head_params: int  # 0 when tied to the embedding
    total_params: int  # main model, excluding MTP
    activated_params: int
    activated_nonembedding_params: int  # activated minus the embedding table (the V2 paper's convention)
    mtp_params: int  # num_nextn_predict_layers modules, embedding and head shared (not counted)
    router_bias_numel: int  # e_score_correction_bias buffers (main model + MTP): stored, not parameters
    checkpoint_numel: int  # every tensor a Hub checkpoint holds, MTP copies of embed/head included
    kv_cache_per_token: int  # elements, all layers
    kv_cache_bytes_per_token: int  # at bf16
    mha_kv_cache_per_token: int
    mha_kv_cache_bytes_per_token: int
    kv_cache_ratio: float  # MHA equivalent / ours
    context_length: int
    matmul_flops_per_token: int
    attention_flops_per_token: int
    flops_per_token: int
    dense_attention_flops_per_token: int  # the same attention over every key (= attention_flops without DSA)
    indexer_flops_per_token: int  # DSA's index scores over `context` keys (part of attention_flops); 0 without
    layers: tuple[LayerStats, ...]


# ---------------------------------------------------------------------------------------------- parameters

def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def attention_params(config: ModelConfig) -> int:
    """One attention module: projections (+ biases where the model has them) and MLA's two norms."""
    dim, heads, bias = config.hidden_size, config.num_attention_heads, config.attention_bias
    if not config.uses_mla:
        head_dim, kv_heads = config.gqa_head_dim, config.kv_heads
        return (_linear(dim, heads * head_dim, bias) + 2 * _linear(dim, kv_heads * head_dim, bias)
                + _linear(heads * head_dim, dim, bias))
    qk, rank, rope = config.qk_head_dim, config.kv_lora_rank, config.qk_rope_head_dim
    if config.q_lora_rank is None:
        q = _linear(dim, heads * qk, False)  # plain q_proj never has a bias upstream
    else:
        q = _linear(dim, config.q_lora_rank, bias) + config.q_lora_rank + _linear(config.q_lora_rank, heads * qk, False)
    kv = (_linear(dim, rank + rope, bias) + rank  # wkv_a -> [c_kv | k_pe], kv_norm on c_kv
          + _linear(rank, heads * (config.qk_nope_head_dim + config.v_head_dim), False))  # wkv_b = [W_UK; W_UV]
    return q + kv + _linear(heads * config.v_head_dim, dim, bias) + indexer_params(config)


def indexer_params(config: ModelConfig) -> int:
    """V3.2's lightning indexer of one layer: wq_b (q latent -> heads x index_head_dim), wk (hidden ->
    index_head_dim), k_norm (a LayerNorm: weight and bias), weights_proj (hidden -> heads); 0 without DSA."""
    if not config.uses_dsa:
        return 0
    heads, width = config.index_n_heads, config.index_head_dim
    return config.q_lora_rank * heads * width + config.hidden_size * width + 2 * width + config.hidden_size * heads


def mlp_params(dim: int, inter_dim: int) -> int:
    """SwiGLU: gate, up (dim -> inter) and down (inter -> dim), no biases."""
    return 3 * dim * inter_dim


def expert_params(config: ModelConfig) -> int:
    """One routed expert."""
    return mlp_params(config.hidden_size, config.moe_intermediate_size)


def moe_params(config: ModelConfig) -> int:
    """Router weight + all routed experts + the shared experts (one MLP of n_shared x expert width)."""
    router = config.n_routed_experts * config.hidden_size
    shared = mlp_params(config.hidden_size, config.shared_intermediate_size) if config.n_shared_experts else 0
    return router + config.n_routed_experts * expert_params(config) + shared


def _unused_expert_params(config: ModelConfig) -> int:
    """Per MoE layer, the routed experts one token does not run."""
    return (config.n_routed_experts - config.num_experts_per_tok) * expert_params(config)


def layer_stats(config: ModelConfig, index: int, moe: bool | None = None) -> LayerStats:
    """Block `index`; `moe` overrides the layer kind (the MTP block is MoE whatever its index)."""
    moe = config.is_moe_layer(index) if moe is None else moe
    attn = attention_params(config)
    ffn = moe_params(config) if moe else mlp_params(config.hidden_size, config.intermediate_size)
    norms = 2 * config.hidden_size
    total = attn + ffn + norms
    activated = total - (_unused_expert_params(config) if moe else 0)
    return LayerStats(index, "moe" if moe else "dense", attn, ffn, norms, total, activated)


def mtp_module_params(config: ModelConfig, depth: int = 0) -> int:
    """MTP module `depth` (0-based), embedding and output head excluded (shared with the main model).

    Its block is layer num_hidden_layers + depth of the checkpoint (V3: model.layers.61), so it follows the
    same dense/MoE rule as the main layers: MoE for every published config.
    """
    dim = config.hidden_size
    block = layer_stats(config, config.num_hidden_layers + depth).total_params
    return 2 * dim + 2 * dim * dim + block + dim  # enorm + hnorm, eh_proj, block, shared_head.norm


# ---------------------------------------------------------------------------------------------- KV cache

def kv_cache_per_token(config: ModelConfig) -> int:
    """Cached elements per token over all layers (MLA: latent + rope key; GQA: K and V)."""
    if config.uses_mla:
        per_layer = config.kv_lora_rank + config.qk_rope_head_dim
        if config.uses_dsa:
            per_layer += config.index_head_dim  # the indexer's key, cached beside the latent
    else:
        per_layer = 2 * config.kv_heads * config.gqa_head_dim
    return per_layer * config.num_hidden_layers


def mha_kv_cache_per_token(config: ModelConfig) -> int:
    """What an MHA model with the same heads caches, as DeepSeek-V2's Table 1 counts it: 2 * n_h * d_h per
    layer, d_h = qk_nope_head_dim for MLA (128 in V2/V3: MLA's 576 per layer is then 2.25 groups of GQA and
    1/56.9 of MHA); for GQA, K and V for every query head."""
    heads = config.num_attention_heads
    if config.uses_mla:
        per_layer = 2 * heads * config.qk_nope_head_dim
    else:
        per_layer = 2 * heads * config.gqa_head_dim
    return per_layer * config.num_hidden_layers


# ---------------------------------------------------------------------------------------------- FLOPs

def _attention_matmul_params(config: ModelConfig) -> int:
    """attention_params without norms and biases: the weights a token multiplies by."""
    no_bias = config.replace(attention_bias=False) if config.attention_bias else config
    norms = (config.kv_lora_rank + (config.q_lora_rank or 0)) if config.uses_mla else 0
    if config.uses_dsa:
        norms += 2 * config.index_head_dim  # the indexer's k_norm
    return attention_params(no_bias) - norms


def indexer_flops_per_token(config: ModelConfig, context: int = DEFAULT_CONTEXT) -> int:
    """DSA: one query's index scores over `context` keys, all layers (0 without DSA)."""
    if not config.uses_dsa:
        return 0
    return 2 * config.index_n_heads * (config.index_head_dim + 1) * context * config.num_hidden_layers


def attention_flops_per_token(config: ModelConfig, context: int = DEFAULT_CONTEXT, sparse: bool = True) -> int:
    """q.k scores and the weighted sum of values for one query over `context` keys, all layers. With DSA
    (and sparse=True) the main attention reads min(context, index_topk) keys and the indexer scores all."""
    heads = config.num_attention_heads
    if config.uses_dsa and sparse:
        dense = attention_flops_per_token(config, min(context, config.index_topk), sparse=False)
        return dense + indexer_flops_per_token(config, context)
    if config.uses_mla:
        per_layer = 2 * heads * (config.qk_head_dim + config.v_head_dim) * context
    else:
        per_layer = 2 * heads * config.gqa_head_dim * 2 * context
    return per_layer * config.num_hidden_layers


def matmul_flops_per_token(config: ModelConfig) -> int:
    """2 x the weights one token multiplies by: attention, dense MLP or (router + K experts + shared),
    output head (counted even when tied: the product is computed either way)."""
    dim = config.hidden_size
    weights = config.vocab_size * dim
    for i in range(config.num_hidden_layers):
        weights += _attention_matmul_params(config)
        if config.is_moe_layer(i):
            weights += moe_params(config) - _unused_expert_params(config)
        else:
            weights += mlp_params(dim, config.intermediate_size)
    return 2 * weights


# ---------------------------------------------------------------------------------------------- summary

def arch_stats(config: ModelConfig, context: int = DEFAULT_CONTEXT) -> ArchStats:
    """Every figure of the calculator for `config`; attention FLOPs at `context` positions."""
    if context <= 0:
        raise ValueError(f"context must be a positive number of tokens, got {context}")
    if config.model_type == "deepseek_v4":  # its own shapes: see calc_v4.py (KV cache per token at `context`)
        from .calc_v4 import arch_stats_v4

        return arch_stats_v4(config, context)
    dim = config.hidden_size
    layers = tuple(layer_stats(config, i) for i in range(config.num_hidden_layers))
    embedding = config.vocab_size * dim
    head = 0 if config.tie_word_embeddings else config.vocab_size * dim
    total = embedding + sum(s.total_params for s in layers) + dim + head  # + final norm
    activated = total - sum(s.total_params - s.activated_params for s in layers)

    n_mtp = config.num_nextn_predict_layers
    mtp = sum(mtp_module_params(config, k) for k in range(n_mtp))
    num_moe = sum(s.kind == "moe" for s in layers)
    if config.is_moe and config.topk_method == "noaux_tc":  # one bias per MoE block, MTP blocks included
        mtp_moe = sum(config.is_moe_layer(config.num_hidden_layers + k) for k in range(n_mtp))
        router_bias = config.n_routed_experts * (num_moe + mtp_moe)
    else:
        router_bias = 0
    # The Hub's V3 checkpoint repeats embed_tokens and shared_head.head inside each MTP layer.
    checkpoint = total + mtp + router_bias + n_mtp * (embedding + head)

    kv, mha_kv = kv_cache_per_token(config), mha_kv_cache_per_token(config)
    matmul, attn = matmul_flops_per_token(config), attention_flops_per_token(config, context)
    return ArchStats(
        model_type=config.model_type, num_layers=config.num_hidden_layers, num_moe_layers=num_moe,
        embedding_params=embedding, head_params=head, total_params=total, activated_params=activated,
        activated_nonembedding_params=activated - embedding,
        mtp_params=mtp, router_bias_numel=router_bias, checkpoint_numel=checkpoint,
        kv_cache_per_token=kv, kv_cache_bytes_per_token=kv * BF16_BYTES,
        mha_kv_cache_per_token=mha_kv, mha_kv_cache_bytes_per_token=mha_kv * BF16_BYTES,
        kv_cache_ratio=mha_kv / kv, context_length=context,
        matmul_flops_per_token=matmul, attention_flops_per_token=attn, flops_per_token=matmul + attn,
        dense_attention_flops_per_token=attention_flops_per_token(config, context, sparse=False),
        indexer_flops_per_token=indexer_flops_per_token(config, context),
        layers=layers)


def format_count(n: float, unit: str = "") -> str:
    """1e9-style short form: 671026419200 -> '671.0B', 2.4e9 -> '2.4B', 35136 -> '35.1K'."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{suffix}{unit}"
    return f"{n:g}{unit}"


def format_bytes(n: float) -> str:
    """Binary units: 70272 -> '68.6 KiB'."""
    for scale, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {suffix}"
    return f"{n:g} B"

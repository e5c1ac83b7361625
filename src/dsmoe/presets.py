"""Named configurations: the published models (from their config.json on the Hub) and tiny CPU ones.

`get_preset(name)` returns a fresh ModelConfig; every command that takes a model takes one of these names.
"""

from __future__ import annotations

from typing import Any

from .config import ModelConfig

_YARN_40 = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "original_max_position_embeddings": 4096}

PUBLISHED: dict[str, dict[str, Any]] = {
    # deepseek-ai/deepseek-moe-16b-base (DeepSeekMoE, "V1")
    "deepseek-moe-16b": dict(
        model_type="deepseek", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=1408,
        first_k_dense_replace=1, scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
        aux_loss_alpha=0.001, seq_aux=True, bos_token_id=100000, eos_token_id=100001),
    # deepseek-ai/DeepSeek-V2
    "deepseek-v2": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=5120, intermediate_size=12288,
        num_hidden_layers=60, num_attention_heads=128, max_position_embeddings=163840,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=1536,
        first_k_dense_replace=1, scoring_func="softmax", topk_method="group_limited_greedy",
        n_group=8, topk_group=3, norm_topk_prob=False, routed_scaling_factor=16.0,
        rope_scaling={"type": "yarn", "mscale": 0.707, "mscale_all_dim": 0.707, **_YARN_40},
        aux_loss_alpha=0.001, seq_aux=True, bos_token_id=100000, eos_token_id=100001),
    # deepseek-ai/DeepSeek-V2-Lite (no query compression)
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        num_hidden_layers=27, num_attention_heads=16, max_position_embeddings=163840,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=1408,
        first_k_dense_replace=1, scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
        norm_topk_prob=False, routed_scaling_factor=1.0,
        rope_scaling={"type": "yarn", "mscale": 0.707, "mscale_all_dim": 0.707, **_YARN_40},
        aux_loss_alpha=0.001, seq_aux=True, bos_token_id=100000, eos_token_id=100001),
    # deepseek-ai/DeepSeek-V3
    "deepseek-v3": dict(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        num_hidden_layers=61, num_attention_heads=128, max_position_embeddings=163840,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, moe_intermediate_size=2048,
        first_k_dense_replace=3, scoring_func="sigmoid", topk_method="noaux_tc", n_group=8, topk_group=4,
        norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
        rope_scaling={"type": "yarn", "mscale": 1.0, "mscale_all_dim": 1.0, **_YARN_40},
        bos_token_id=0, eos_token_id=1),
    # deepseek-ai/DeepSeek-V3.2-Exp (and DeepSeek-V3.2): V3's dims plus the lightning indexer of DSA
    "deepseek-v3.2": dict(
        model_type="deepseek_v32", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        num_hidden_layers=61, num_attention_heads=128, max_position_embeddings=163840,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, moe_intermediate_size=2048,
        first_k_dense_replace=3, scoring_func="sigmoid", topk_method="noaux_tc", n_group=8, topk_group=4,
        norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
        index_n_heads=64, index_head_dim=128, index_topk=2048,
        rope_scaling={"type": "yarn", "mscale": 1.0, "mscale_all_dim": 1.0, **_YARN_40},
        bos_token_id=0, eos_token_id=1),
    # deepseek-ai/DeepSeek-V4-Flash (284B total, 13B activated): two sliding layers, then CSA / HCA alternating
    "deepseek-v4-flash": dict(
        model_type="deepseek_v4", vocab_size=129280, hidden_size=4096, num_hidden_layers=43,
        num_attention_heads=64, num_key_value_heads=1, head_dim=512, q_lora_rank=1024,
        max_position_embeddings=1048576, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=6,
        moe_intermediate_size=2048, scoring_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5,
        num_nextn_predict_layers=1, index_n_heads=64, index_head_dim=128, index_topk=512, hc_mult=4,
        hc_sinkhorn_iters=20, hc_eps=1e-6, sliding_window=128, o_groups=8, o_lora_rank=1024, swiglu_limit=10.0,
        partial_rotary_factor=64 / 512, compress_rope_theta=160000.0, router_aux_loss_coef=0.001,
        layer_types=["sliding_attention"] * 2 + [("compressed_sparse_attention", "heavily_compressed_attention")[i % 2]
                                                 for i in range(41)],
        mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 40,
        rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                      "beta_slow": 1},
        bos_token_id=0, eos_token_id=1),
    # deepseek-ai/DeepSeek-V4-Pro (1.6T total, 49B activated): two HCA layers, then CSA / HCA alternating
    "deepseek-v4-pro": dict(
        model_type="deepseek_v4", vocab_size=129280, hidden_size=7168, num_hidden_layers=61,
        num_attention_heads=128, num_key_value_heads=1, head_dim=512, q_lora_rank=1536,
        max_position_embeddings=1048576, n_routed_experts=384, n_shared_experts=1, num_experts_per_tok=6,
        moe_intermediate_size=3072, scoring_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=2.5,
        num_nextn_predict_layers=1, index_n_heads=64, index_head_dim=128, index_topk=1024, hc_mult=4,
        hc_sinkhorn_iters=20, hc_eps=1e-6, sliding_window=128, o_groups=16, o_lora_rank=1024, swiglu_limit=10.0,
        partial_rotary_factor=64 / 512, compress_rope_theta=160000.0, router_aux_loss_coef=0.001,
        layer_types=["heavily_compressed_attention"] * 2 + [
            ("compressed_sparse_attention", "heavily_compressed_attention")[i % 2] for i in range(59)],
        mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 58,
        rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                      "beta_slow": 1},
        bos_token_id=0, eos_token_id=1),
    # mistralai/Mixtral-8x7B-v0.1
    "mixtral-8x7b": dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=14336, norm_topk_prob=True, rope_theta=1e6,
        rms_norm_eps=1e-5, router_aux_loss_coef=0.02, bos_token_id=1, eos_token_id=2),
}

# A few million parameters each: big enough to route meaningfully, small enough for 2 CPU cores.
_TINY_COMMON = dict(vocab_size=4096, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                    max_position_embeddings=1024, intermediate_size=384, moe_intermediate_size=64)
_TINY_MLA = dict(kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)

TINY: dict[str, dict[str, Any]] = {
    "tiny-v1": dict(_TINY_COMMON, model_type="deepseek", n_routed_experts=16, n_shared_experts=2,
                    num_experts_per_tok=4, first_k_dense_replace=1, scoring_func="softmax",
                    topk_method="greedy", aux_loss_alpha=0.001, seq_aux=False),
    "tiny-v2": dict(_TINY_COMMON, **_TINY_MLA, model_type="deepseek_v2", q_lora_rank=64,
                    n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4, first_k_dense_replace=1,
                    scoring_func="softmax", topk_method="group_limited_greedy", n_group=4, topk_group=2,
                    routed_scaling_factor=1.0, aux_loss_alpha=0.003),
    "tiny-v3": dict(_TINY_COMMON, **_TINY_MLA, model_type="deepseek_v3", q_lora_rank=64,
                    n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1,
                    scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
                    norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=1),
    # index_topk 64 < the trainer's default --seq-len 128, so training and decoding exercise the sparse path
    "tiny-v3.2": dict(_TINY_COMMON, **_TINY_MLA, model_type="deepseek_v32", q_lora_rank=64,
                      n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1,
                      scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
                      norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
                      index_n_heads=4, index_head_dim=32, index_topk=64),
    # every V4 layer type and both MoE kinds; window 32 and index_topk 16 < the trainer's --seq-len 128
    "tiny-v4": dict(vocab_size=4096, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                    max_position_embeddings=1024, model_type="deepseek_v4", num_key_value_heads=1, head_dim=64,
                    q_lora_rank=64, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
                    moe_intermediate_size=64, scoring_func="sqrtsoftplus", norm_topk_prob=True,
                    routed_scaling_factor=1.5, index_n_heads=4, index_head_dim=32, index_topk=16, hc_mult=2,
                    hc_sinkhorn_iters=20, sliding_window=32, o_groups=2, o_lora_rank=64, swiglu_limit=10.0,
                    partial_rotary_factor=0.25, compress_rates={"compressed_sparse_attention": 4,
                                                                "heavily_compressed_attention": 16},
                    layer_types=["sliding_attention", "compressed_sparse_attention",
                                 "heavily_compressed_attention", "compressed_sparse_attention"],
                    mlp_layer_types=["hash_moe", "moe", "moe", "moe"], router_aux_loss_coef=0.001),
    "tiny-mixtral": dict(_TINY_COMMON, model_type="mixtral", num_key_value_heads=2, n_routed_experts=8,
                         num_experts_per_tok=2, intermediate_size=256, moe_intermediate_size=256,
                         norm_topk_prob=True, rope_theta=1e6, rms_norm_eps=1e-5, router_aux_loss_coef=0.02),
}

PRESETS: dict[str, dict[str, Any]] = {**PUBLISHED, **TINY}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**PRESETS[name])

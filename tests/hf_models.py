"""Tiny random transformers models (the oracle) for parity tests. Test-only; transformers is a test extra."""

from __future__ import annotations

import torch

from dsmoe.bench import spread_norms_and_router_biases

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}

_MLA = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=16,
            n_routed_experts=8, num_experts_per_tok=3, first_k_dense_replace=1, max_position_embeddings=128,
            initializer_range=0.1)

# name -> (transformers class name, config kwargs)
CASES = {
    "v2-qlora-greedy": ("DeepseekV2", dict(_MLA, q_lora_rank=24, n_shared_experts=2, topk_method="greedy",
                                           routed_scaling_factor=1.5)),
    "v2-lite-noqlora": ("DeepseekV2", dict(_MLA, q_lora_rank=None, n_shared_experts=1, topk_method="greedy")),
    "v2-group-limited": ("DeepseekV2", dict(_MLA, q_lora_rank=24, n_shared_experts=2,
                                            topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                            routed_scaling_factor=2.0, rope_parameters=YARN)),
    "v3-yarn-groups": ("DeepseekV3", dict(_MLA, q_lora_rank=24, n_shared_experts=1, n_group=4, topk_group=2,
                                          rope_parameters=YARN)),
    "v3-plain-nogroups": ("DeepseekV3", dict(_MLA, q_lora_rank=24, n_shared_experts=1, n_group=1, topk_group=1,
                                             norm_topk_prob=False)),
    "v3-no-shared": ("DeepseekV3", dict(_MLA, q_lora_rank=24, n_shared_experts=0, n_group=2, topk_group=1)),
    "v3-rotate-half": ("DeepseekV3", dict(_MLA, q_lora_rank=None, n_shared_experts=2, n_group=2, topk_group=1,
                                          rope_interleave=False)),
    "mixtral": ("Mixtral", dict(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, num_local_experts=6,
                                num_experts_per_tok=2, max_position_embeddings=128, initializer_range=0.1)),
}


def build_hf_model(case: str, seed: int = 0):
    """A random transformers model for `case`, with non-trivial norms and router biases so every
    parameter matters to the output."""
    import transformers

    family, kwargs = CASES[case]
    torch.manual_seed(seed)
    config = getattr(transformers, f"{family}Config")(**kwargs)
    if family == "DeepseekV3":
        config.num_nextn_predict_layers = 0
    return spread_norms_and_router_biases(getattr(transformers, f"{family}ForCausalLM")(config).eval())

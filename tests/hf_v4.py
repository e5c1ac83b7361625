"""Tiny random transformers DeepSeek-V4 models (the oracle) for parity tests. Test-only."""

from __future__ import annotations

import torch

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1}

BASE = dict(vocab_size=96, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
            head_dim=32, partial_rotary_factor=0.25, q_lora_rank=24, num_experts_per_tok=2, n_routed_experts=6,
            sliding_window=8, o_groups=2, o_lora_rank=8, index_n_heads=8, index_head_dim=16, index_topk=3,
            hc_mult=3, hc_sinkhorn_iters=5, max_position_embeddings=256, initializer_range=0.1,
            layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                         "compressed_sparse_attention"],
            compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
            mlp_layer_types=["hash_moe", "moe", "moe", "hash_moe"], swiglu_limit=0.5,
            routed_scaling_factor=1.5, rope_parameters=YARN, bos_token_id=0, eos_token_id=1)

CASES = {
    "all-types-yarn": BASE,
    "hc1-plain-rope": dict(BASE, hc_mult=1, rope_parameters=None, num_hidden_layers=3,
                           layer_types=BASE["layer_types"][1:], mlp_layer_types=["moe", "hash_moe", "moe"]),
}


def build_hf_v4(case: str = "all-types-yarn", seed: int = 0):
    """A random DeepseekV4ForCausalLM with every parameter and buffer random (sinks, ape, hc bases, router
    bias, hash tables), so each one matters to the logits."""
    import transformers

    torch.manual_seed(seed)
    kwargs = dict(CASES[case])
    if kwargs.get("rope_parameters") is None:
        kwargs.pop("rope_parameters")
    config = transformers.DeepseekV4Config(**kwargs)
    model = transformers.DeepseekV4ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.ndim < 2 or name.endswith("position_bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(config.n_routed_experts, generator=g)[:b.shape[1]]
                                     for _ in range(b.shape[0])]))
            elif name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
    return model

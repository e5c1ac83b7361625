"""DeepSeek-V4 config: the typed fields, transformers' legacy keys folded as it folds them, validation errors
naming the field, round trips (ours and transformers' config.json), and the original checkpoint layout."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dsmoe.config import ModelConfig
from dsmoe.presets import get_preset

transformers = pytest.importorskip("transformers")

# The Hub's original V4-Flash config.json keys (legacy spellings: compress_ratios with the MTP slot,
# num_hash_layers, qk_rope_head_dim, rope_scaling with "type", topk_method), shortened to 5 layers.
HUB_STYLE = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 128, "hidden_size": 64,
    "num_hidden_layers": 5, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32, "q_lora_rank": 32,
    "qk_rope_head_dim": 8, "moe_intermediate_size": 32, "n_routed_experts": 8, "n_shared_experts": 1,
    "num_experts_per_tok": 2, "num_hash_layers": 2, "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc",
    "norm_topk_prob": True, "routed_scaling_factor": 1.5, "compress_ratios": [0, 0, 4, 128, 4, 0],
    "compress_rope_theta": 160000, "rope_theta": 10000, "sliding_window": 16, "o_groups": 2, "o_lora_rank": 16,
    "index_n_heads": 4, "index_head_dim": 16, "index_topk": 8, "hc_mult": 2, "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6, "swiglu_limit": 10.0, "max_position_embeddings": 4096, "num_nextn_predict_layers": 1,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 256, "beta_fast": 32,
                     "beta_slow": 1},
    "expert_dtype": "fp4", "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1,
}


def _hf_config(raw):
    """transformers' reading of a config.json (on a copy: it edits nested rope dicts in place)."""
    raw = copy.deepcopy(raw)
    return transformers.DeepseekV4Config(**{k: v for k, v in raw.items() if k != "architectures"})


def test_legacy_keys_fold_as_transformers_does():
    ours, theirs = ModelConfig.from_hf(HUB_STYLE), _hf_config(HUB_STYLE)
    assert ours.layer_types == theirs.layer_types == ["sliding_attention"] * 2 + [
        "compressed_sparse_attention", "heavily_compressed_attention", "compressed_sparse_attention"]
    assert ours.mlp_layer_types == theirs.mlp_layer_types == ["hash_moe"] * 2 + ["moe"] * 3
    assert ours.partial_rotary_factor == theirs.partial_rotary_factor == 0.25
    assert ours.compress_rates == theirs.compress_rates
    assert ours.rope_scaling["factor"] == 16 and ours.rope_scaling["attention_factor"] == 1.0
    assert theirs.rope_parameters["compress"]["attention_factor"] == 1.0
    # written back as read (legacy keys included), and transformers reads our v5 form the same way
    assert ours.to_hf() == HUB_STYLE
    v5 = ours.to_hf("v5")
    again = _hf_config(v5)
    for key in ("layer_types", "mlp_layer_types", "partial_rotary_factor", "compress_rates"):
        assert getattr(again, key) == getattr(theirs, key), key
    for kind in ("main", "compress"):  # transformers keeps the Hub's leftover "type" beside "rope_type"
        theirs_rope = {k: v for k, v in theirs.rope_parameters[kind].items() if k != "type"}
        assert again.rope_parameters[kind] == theirs_rope
    assert ModelConfig.from_hf(v5) == ours


def test_transformers_config_json_round_trips(tmp_path):
    theirs = _hf_config(get_preset("tiny-v4").to_hf("v5"))
    theirs.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    ours = ModelConfig.from_hf(raw)
    assert ours == get_preset("tiny-v4")
    assert ours.to_hf() == raw


@pytest.mark.parametrize("changes,message", [
    (dict(layer_types=["sliding_attention"] * 3), "ModelConfig.layer_types: has 3 entries, num_hidden_layers is 4"),
    (dict(layer_types=["full_attention"] * 4), "ModelConfig.layer_types: entries must be one of"),
    (dict(mlp_layer_types=["dense"] * 4), "ModelConfig.mlp_layer_types: entries must be one of"),
    (dict(num_key_value_heads=2), "ModelConfig.num_key_value_heads: DeepSeek-V4 attention has one shared"),
    (dict(o_groups=3), "ModelConfig.o_groups: 3 does not divide"),
    (dict(partial_rotary_factor=0.3), "ModelConfig.partial_rotary_factor: head_dim * partial_rotary_factor"),
    (dict(norm_topk_prob=False), "ModelConfig.norm_topk_prob: DeepSeek-V4's routers always renormalise"),
    (dict(compress_rates={"compressed_sparse_attention": 4}), "ModelConfig.compress_rates: has no rate for heavily"),
    (dict(hc_mult=0), "ModelConfig.hc_mult: must be a positive integer"),
    (dict(scoring_func="tanh"), "ModelConfig.scoring_func: must be one of"),
])
def test_invalid_v4_configs_name_the_field(changes, message):
    with pytest.raises(ValueError) as err:
        get_preset("tiny-v4").replace(**changes)
    assert str(err.value).startswith(message), str(err.value)


def test_bad_legacy_compress_ratio_is_named():
    with pytest.raises(ValueError, match="ModelConfig.compress_ratios: must be a list of 0, 4 or 128"):
        ModelConfig.from_hf({**HUB_STYLE, "compress_ratios": [0, 0, 8, 128, 4, 0]})


def test_original_checkpoint_layout_loads(tmp_path):
    """The Hub's own names (no `model.` prefix, hc_head_fn, embed.weight, an mtp.* module we skip)."""
    from safetensors.torch import load_file, save_file

    from dsmoe.checkpoint import load_pretrained, save_pretrained
    from dsmoe.model.v4 import V4Transformer

    torch.manual_seed(0)
    config = ModelConfig.from_hf(HUB_STYLE)
    model = V4Transformer(config)
    save_pretrained(model, tmp_path / "ours")
    renamed = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
               "model.hc_head.hc_fn": "hc_head_fn", "model.hc_head.hc_base": "hc_head_base",
               "model.hc_head.hc_scale": "hc_head_scale"}
    state = load_file(tmp_path / "ours" / "model.safetensors")
    state = {renamed.get(k, k.removeprefix("model.")): v for k, v in state.items()}
    state["mtp.0.eh_proj.weight"] = torch.zeros(64, 128)
    (tmp_path / "hub").mkdir()
    save_file(state, tmp_path / "hub" / "model.safetensors")
    (tmp_path / "hub" / "config.json").write_text(json.dumps(HUB_STYLE))
    loaded = load_pretrained(tmp_path / "hub", dtype=torch.float32)
    ids = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))

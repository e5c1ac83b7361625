"""config.json as published: architecture aliases (Kimi-K2), keys of another model type refused by name, and a
lossless round trip (same keys and values, nothing foreign) for every supported family, through ModelConfig and
through load_pretrained / save_pretrained."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import dsmoe
from dsmoe.config import ModelConfig

_AUTO_MAP_V1 = {"AutoConfig": "configuration_deepseek.DeepseekConfig",
                "AutoModel": "modeling_deepseek.DeepseekModel",
                "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"}
_AUTO_MAP_V3 = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                "AutoModel": "modeling_deepseek.DeepseekV3Model",
                "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}

# Shrunk copies of published config.json files (deepseek-moe-16b-base, DeepSeek-V2-Lite, DeepSeek-V3 as
# transformers 5 writes it, Kimi-K2, Mixtral-8x7B-Instruct-v0.1's first upload), each with its own extra keys.
SOURCES = {
    "deepseek": {
        "architectures": ["DeepseekForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": _AUTO_MAP_V1, "aux_loss_alpha": 0.001, "bos_token_id": 1, "eos_token_id": 2,
        "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
        "intermediate_size": 96, "max_position_embeddings": 4096, "model_type": "deepseek",
        "moe_intermediate_size": 32, "moe_layer_freq": 1, "n_routed_experts": 8, "n_shared_experts": 2,
        "norm_topk_prob": False, "num_attention_heads": 4, "num_experts_per_tok": 2, "num_hidden_layers": 2,
        "num_key_value_heads": 4, "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 10000, "scoring_func": "softmax", "seq_aux": True, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.36.0", "use_cache": True, "vocab_size": 120,
        "finetune_recipe": {"lr": 2e-5, "epochs": 3}},
    "deepseek_v2": {
        "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config"}, "aux_loss_alpha": 0.001,
        "bos_token_id": 1, "eos_token_id": 2, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 64,
        "initializer_range": 0.02, "intermediate_size": 96, "kv_lora_rank": 16, "max_position_embeddings": 256,
        "model_type": "deepseek_v2", "moe_intermediate_size": 32, "moe_layer_freq": 1, "n_group": 1,
        "n_routed_experts": 8, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 4,
        "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_key_value_heads": 4, "pretraining_tp": 1,
        "q_lora_rank": None, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
        "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 4, "mscale": 0.707,
                                                "mscale_all_dim": 0.707, "original_max_position_embeddings": 64,
                                                "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
        "transformers_version": "4.39.3", "use_cache": True, "v_head_dim": 16, "vocab_size": 120},
    "deepseek_v3": {  # as transformers 5 saves it: rope_parameters, head_dim, qk_head_dim, no aux_loss_alpha
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 0, "dtype": "bfloat16", "eos_token_id": 1, "first_k_dense_replace": 1, "head_dim": 8,
        "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 96,
        "kv_lora_rank": 16, "max_position_embeddings": 256, "model_type": "deepseek_v3",
        "moe_intermediate_size": 32, "n_group": 2, "n_routed_experts": 8, "n_shared_experts": 1,
        "norm_topk_prob": True, "num_attention_heads": 4, "num_experts_per_tok": 2, "num_hidden_layers": 2,
        "num_key_value_heads": 4, "num_nextn_predict_layers": 0, "output_router_logits": False,
        "pad_token_id": None, "pretraining_tp": 1, "q_lora_rank": 24, "qk_head_dim": 24, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "rms_norm_eps": 1e-06, "rope_interleave": True,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0,
                            "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 1.0,
                            "beta_fast": 32, "beta_slow": 1},
        "routed_scaling_factor": 2.5, "tie_word_embeddings": False, "topk_group": 1,
        "transformers_version": "5.23.0", "use_cache": True, "v_head_dim": 16, "vocab_size": 120},
    "kimi_k2": {  # DeepSeek-V3's architecture under another model_type, with keys of its own
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": _AUTO_MAP_V3, "aux_loss_alpha": 0.001, "bos_token_id": 3, "eos_token_id": 4,
        "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
        "intermediate_size": 96, "kv_lora_rank": 16, "max_position_embeddings": 256, "model_type": "kimi_k2",
        "moe_intermediate_size": 32, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 8,
        "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 4, "num_experts_per_tok": 2,
        "num_hidden_layers": 2, "num_key_value_heads": 4, "num_nextn_predict_layers": 0, "pretraining_tp": 1,
        "q_lora_rank": 24, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 64, "type": "yarn"},
        "rope_theta": 50000.0, "routed_scaling_factor": 2.827, "scoring_func": "sigmoid", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
        "transformers_version": "4.48.3", "use_cache": True, "v_head_dim": 16, "vocab_size": 120,
        "moonshot_extra": {"tokenizer": "tiktoken"}},
    "mixtral": {
        "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 48,
        "max_position_embeddings": 256, "model_type": "mixtral", "num_attention_heads": 4,
        "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_key_value_heads": 2, "num_local_experts": 4,
        "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02, "sliding_window": 16, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 120},
}


@pytest.mark.parametrize("name", list(SOURCES))
def test_to_hf_gives_back_the_source_exactly(name):
    raw = copy.deepcopy(SOURCES[name])
    config = ModelConfig.from_hf(raw)
    out = config.to_hf()
    assert out == SOURCES[name]
    assert list(out) == list(SOURCES[name])  # in the file's order
    assert json.dumps(out) == json.dumps(SOURCES[name])  # 10000 stays 10000, n_group null stays null
    # a changed field is written with its new value, everything else stays as it was
    changed = config.replace(num_hidden_layers=3).to_hf()
    key = "num_hidden_layers"
    assert changed[key] == 3 and {k: v for k, v in changed.items() if k != key} == {
        k: v for k, v in SOURCES[name].items() if k != key}


@pytest.mark.parametrize("name", list(SOURCES))
def test_load_then_save_writes_back_the_same_config_json(name, tmp_path):
    raw = SOURCES[name]
    config = ModelConfig.from_hf(raw)
    torch.manual_seed(0)
    dsmoe.save_pretrained(dsmoe.Transformer(config, with_mtp=False), tmp_path / "src", dtype=torch.bfloat16)
    (tmp_path / "src" / "config.json").write_text(json.dumps(raw, indent=2))
    model = dsmoe.load_pretrained(tmp_path / "src")
    dsmoe.save_pretrained(model, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved == raw


def test_kimi_k2_loads_as_deepseek_v3_with_transformers_parity(tmp_path):
    transformers = pytest.importorskip("transformers")
    from hf_models import build_hf_model

    ref = build_hf_model("v3-yarn-groups")
    ref.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.update(model_type="kimi_k2", auto_map=_AUTO_MAP_V3, moonshot_extra={"tokenizer": "tiktoken"})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    model = dsmoe.load_pretrained(tmp_path, dtype=torch.float32)
    assert model.config.model_type == "deepseek_v3" and model.config.to_hf()["model_type"] == "kimi_k2"
    ids = torch.randint(0, ref.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-4, rtol=0)
    assert transformers  # the oracle ran


@pytest.mark.parametrize("raw,message", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
     "ModelConfig.model_type: 'llama' is not a model type dsmoe implements (deepseek, deepseek_v2, deepseek_v3, "
     "deepseek_v32, deepseek_v4, mixtral), and architectures ['LlamaForCausalLM'] names none of its classes "
     "(DeepseekForCausalLM, DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, DeepseekV32ForCausalLM, "
     "DeepseekV4ForCausalLM, MixtralForCausalLM)"),
    ({"model_type": "kimi_k2"}, "ModelConfig.model_type: 'kimi_k2' is not a model type dsmoe implements"),
    ({"model_type": "deepseek_v3", "architectures": ["MixtralForCausalLM"]},
     "ModelConfig.model_type: 'deepseek_v3' contradicts architectures ['MixtralForCausalLM'] (the class of a "
     "mixtral model); fix one of them"),
    ({"model_type": "x", "architectures": "DeepseekV3ForCausalLM"},
     "ModelConfig.architectures: must be a list of class names, got 'DeepseekV3ForCausalLM'"),
])
def test_unknown_or_contradictory_architecture_names_both_fields(raw, message):
    with pytest.raises(ValueError) as err:
        ModelConfig.from_hf(raw)
    assert str(err.value).startswith(message)


# ---------------------------------------------------------------------------------------------- other model types


def test_v1_file_with_mla_keys_is_refused_naming_them():
    raw = {**SOURCES["deepseek"], "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8}
    with pytest.raises(ValueError) as err:
        ModelConfig.from_hf(raw)
    assert str(err.value) == (
        "ModelConfig.model_type: 'deepseek' (deepseek) contradicts kv_lora_rank=16, q_lora_rank=24, "
        "qk_rope_head_dim=8: these keys belong to deepseek_v2, deepseek_v3, deepseek_v32, deepseek_v4 models; fix "
        "model_type or remove "
        "the key(s)")


@pytest.mark.parametrize("family,key,value", [
    ("mixtral", "n_shared_experts", 2), ("mixtral", "n_routed_experts", 4), ("mixtral", "norm_topk_prob", False),
    ("mixtral", "kv_lora_rank", 16), ("deepseek_v3", "num_local_experts", 8), ("deepseek_v3", "sliding_window", 8),
    ("deepseek", "topk_method", "noaux_tc"), ("deepseek", "routed_scaling_factor", 2.5),
    ("deepseek_v2", "rope_interleave", False), ("deepseek_v2", "num_nextn_predict_layers", 1),
])
def test_keys_of_another_model_type_that_would_change_the_model_are_refused(family, key, value):
    with pytest.raises(ValueError, match=rf"contradicts {key}={value!r}: this key belongs to"):
        ModelConfig.from_hf({**SOURCES[family], key: value})


@pytest.mark.parametrize("preset,field,value", [("tiny-mixtral", "n_shared_experts", 2),
                                                ("tiny-v1", "topk_method", "noaux_tc"),
                                                ("tiny-v3", "sliding_window", 8), ("tiny-v1", "sliding_window", 8)])
def test_configs_built_in_python_refuse_settings_of_another_model_type(preset, field, value):
    from dsmoe.presets import PRESETS

    with pytest.raises(ValueError, match=rf"^ModelConfig\.{field}: is a setting of .* models, not "):
        ModelConfig(**{**PRESETS[preset], field: value})


@pytest.mark.parametrize("family,key,value", [
    ("mixtral", "n_shared_experts", 0), ("mixtral", "norm_topk_prob", True), ("mixtral", "attention_bias", False),
    ("deepseek", "topk_method", "greedy"), ("deepseek", "q_lora_rank", None), ("deepseek_v3", "sliding_window", None),
    ("deepseek_v2", "rope_interleave", True),
])
def test_keys_of_another_model_type_at_a_harmless_value_load_and_round_trip(family, key, value):
    raw = {**SOURCES[family], key: value}
    config = ModelConfig.from_hf(raw)
    assert config == ModelConfig.from_hf(SOURCES[family])
    assert config.to_hf() == raw


@pytest.mark.parametrize("family", ["deepseek", "deepseek_v2", "deepseek_v3", "mixtral"])
def test_configs_built_in_python_write_only_their_model_types_keys(family):
    foreign = {
        "deepseek": {"kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "topk_method", "n_group", "topk_group",
                     "routed_scaling_factor", "rope_interleave", "num_nextn_predict_layers", "num_local_experts",
                     "router_aux_loss_coef", "sliding_window"},
        "deepseek_v2": {"rope_interleave", "num_nextn_predict_layers", "num_local_experts", "sliding_window",
                        "router_aux_loss_coef", "head_dim"},
        "deepseek_v3": {"num_local_experts", "sliding_window", "router_aux_loss_coef", "head_dim"},
        "mixtral": {"n_routed_experts", "n_shared_experts", "moe_intermediate_size", "scoring_func", "topk_method",
                    "kv_lora_rank", "aux_loss_alpha", "seq_aux", "attention_bias", "norm_topk_prob"},
    }[family]
    config = ModelConfig.from_hf(SOURCES[family]).replace()
    config._hf_source = None  # as if built in Python
    out = config.to_hf()
    assert not foreign & set(out), foreign & set(out)
    assert ModelConfig.from_hf(out) == config

"""ModelConfig: validation errors, config.json in both rope styles, and agreement with transformers."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from dsmoe.config import ModelConfig
from dsmoe.presets import PRESETS, get_preset

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, DeepseekV2Config, DeepseekV3Config, MixtralConfig  # noqa: E402

HF_CLASSES = {"deepseek_v2": DeepseekV2Config, "deepseek_v3": DeepseekV3Config, "mixtral": MixtralConfig}


def _diff(a: ModelConfig, b: ModelConfig) -> dict:
    return {f.name: (getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
            if f.compare and getattr(a, f.name) != getattr(b, f.name)}


# ---------------------------------------------------------------------------------------------- validation

_YARN_NO_ORIGINAL = {"type": "yarn", "factor": 4.0, "beta_fast": 32, "beta_slow": 1}

# (id, preset the case starts from, overrides, field the message must name)
INVALID = [
    ("topk>experts", "tiny-v1", dict(num_experts_per_tok=17), "num_experts_per_tok"),
    ("topk>experts-v3", "tiny-v3", dict(num_experts_per_tok=33), "num_experts_per_tok"),
    ("n_group-not-dividing", "tiny-v2", dict(n_group=3), "n_group"),
    ("n_group-not-dividing-v3", "tiny-v3", dict(n_group=5), "n_group"),
    ("topk_group>n_group", "tiny-v2", dict(topk_group=5), "topk_group"),
    ("topk_group>n_group-v3", "tiny-v3", dict(n_group=2, topk_group=3), "topk_group"),
    *[(f"{name}={v}", preset, {name: v}, name)
      for name, preset in [("hidden_size", "tiny-v1"), ("hidden_size", "tiny-v3"),
                           ("num_hidden_layers", "tiny-v1"), ("vocab_size", "tiny-v1"),
                           ("num_attention_heads", "tiny-v1"), ("num_attention_heads", "tiny-v2"),
                           ("kv_lora_rank", "tiny-v2"), ("q_lora_rank", "tiny-v2"), ("q_lora_rank", "tiny-v3"),
                           ("moe_intermediate_size", "tiny-v1"), ("moe_intermediate_size", "tiny-mixtral"),
                           ("intermediate_size", "tiny-v1"), ("max_position_embeddings", "tiny-v1"),
                           ("moe_layer_freq", "tiny-v1"), ("num_experts_per_tok", "tiny-v1")]
      for v in (0, -4)],
    ("model_type", "tiny-v1", dict(model_type="llama"), "model_type"),
    ("scoring_func", "tiny-v1", dict(scoring_func="relu"), "scoring_func"),
    ("topk_method", "tiny-v1", dict(topk_method="random"), "topk_method"),
    ("noaux_tc+softmax", "tiny-v3", dict(scoring_func="softmax"), "scoring_func"),
    ("kv_heads-not-dividing", "tiny-mixtral", dict(num_key_value_heads=3), "num_key_value_heads"),
    ("kv_heads-not-dividing-v1", "tiny-v1", dict(num_key_value_heads=3), "num_key_value_heads"),
    ("odd-qk_rope_head_dim", "tiny-v2", dict(qk_rope_head_dim=15), "qk_rope_head_dim"),
    ("odd-qk_rope_head_dim-v3", "tiny-v3", dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    ("yarn-no-original", "tiny-v3", dict(rope_scaling=_YARN_NO_ORIGINAL), "original_max_position_embeddings"),
    ("yarn-no-original-v5", "tiny-v1", dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}),
     "original_max_position_embeddings"),
    ("rope-type", "tiny-v2", dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    ("rope-type-v5", "tiny-mixtral", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling"),
    ("n_shared_experts<0", "tiny-v1", dict(n_shared_experts=-1), "n_shared_experts"),
    ("routed_scaling_factor=0", "tiny-v3", dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    ("rms_norm_eps=0", "tiny-v1", dict(rms_norm_eps=0.0), "rms_norm_eps"),
    ("first_k_dense_replace<0", "tiny-v1", dict(first_k_dense_replace=-1), "first_k_dense_replace"),
    # null where a number belongs (a hand-edited config.json): the field is named, not a bare TypeError
    ("rms_norm_eps=None", "tiny-v1", dict(rms_norm_eps=None), "rms_norm_eps"),
    ("rope_theta=None", "tiny-v2", dict(rope_theta=None), "rope_theta"),
    ("first_k_dense_replace=None", "tiny-v3", dict(first_k_dense_replace=None), "first_k_dense_replace"),
    ("num_nextn_predict_layers=None", "tiny-v3", dict(num_nextn_predict_layers=None), "num_nextn_predict_layers"),
    ("routed_scaling_factor=None", "tiny-v3", dict(routed_scaling_factor=None), "routed_scaling_factor"),
    ("n_shared_experts=None", "tiny-v2", dict(n_shared_experts=None), "n_shared_experts"),
    # transformers' Mixtral has bias-free attention projections; a sliding window is a GQA feature
    ("mixtral-attention-bias", "tiny-mixtral", dict(attention_bias=True), "attention_bias"),
    ("sliding-window-0", "tiny-mixtral", dict(sliding_window=0), "sliding_window"),
    ("sliding-window-mla", "tiny-v3", dict(sliding_window=4), "sliding_window"),
    # a string where a boolean belongs would be truthy ("false")
    ("tie-string", "tiny-mixtral", dict(tie_word_embeddings="no"), "tie_word_embeddings"),
    ("norm_topk_prob-string", "tiny-v2", dict(norm_topk_prob="false"), "norm_topk_prob"),
    ("attention_bias-null", "tiny-v3", dict(attention_bias=None), "attention_bias"),
]


@pytest.mark.parametrize("preset,overrides,field_name", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_config_raises_naming_field(preset, overrides, field_name):
    with pytest.raises(ValueError, match=rf"\b{re.escape(field_name)}\b"):
        ModelConfig(**{**PRESETS[preset], **overrides})


def test_noaux_tc_with_softmax_names_both_switches():
    with pytest.raises(ValueError) as err:
        ModelConfig(**{**PRESETS["tiny-v3"], "scoring_func": "softmax"})
    assert "noaux_tc" in str(err.value) and "scoring_func" in str(err.value)


def test_invalid_values_are_quoted_in_message():
    with pytest.raises(ValueError, match="llama"):
        ModelConfig(**{**PRESETS["tiny-v1"], "model_type": "llama"})
    with pytest.raises(ValueError, match="-4"):
        ModelConfig(**{**PRESETS["tiny-v1"], "hidden_size": -4})


@pytest.mark.parametrize("raw", [
    {"model_type": "llama"},
    {"model_type": "llama", "hidden_size": 64},
    {},
])
def test_from_hf_unknown_model_type(raw):
    with pytest.raises(ValueError, match=r"\bmodel_type\b"):
        ModelConfig.from_hf(raw)


def test_from_hf_bad_rope_scaling():
    raw = {**get_preset("tiny-v2").to_hf("hub"), "rope_scaling": {"type": "linear", "factor": 2.0}}
    with pytest.raises(ValueError, match=r"\brope_scaling\b"):
        ModelConfig.from_hf(raw)
    raw["rope_scaling"] = "yarn"
    with pytest.raises(ValueError, match=r"\brope_scaling\b"):
        ModelConfig.from_hf(raw)


def test_from_hf_null_rope_theta_names_the_field():
    raw = get_preset("tiny-v3").to_hf(style="hub")
    raw["rope_theta"] = None
    with pytest.raises(ValueError, match=r"ModelConfig.rope_theta: must be a number > 0, got None"):
        ModelConfig.from_hf(raw)


def test_from_hf_reads_a_sliding_window_shorter_than_the_context():
    raw = get_preset("tiny-mixtral").to_hf()
    raw["sliding_window"] = 4  # Mixtral-8x7B-Instruct's first config.json carried 4096
    assert ModelConfig.from_hf(raw).sliding_window == 4
    raw["sliding_window"] = "4"
    with pytest.raises(ValueError, match=r"ModelConfig.sliding_window: must be a positive integer or null, got '4'"):
        ModelConfig.from_hf(raw)


def test_from_hf_invalid_values_still_validated():
    raw = get_preset("tiny-v3").to_hf()
    raw["num_experts_per_tok"] = 64
    with pytest.raises(ValueError, match=r"\bnum_experts_per_tok\b"):
        ModelConfig.from_hf(raw)


# ---------------------------------------------------------------------------------------------- rope styles

_YARN = {"factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
         "mscale": 0.707, "mscale_all_dim": 0.707}

_BASE = {
    "deepseek_v2": dict(model_type="deepseek_v2", vocab_size=1000, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=163840,
                        q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                        n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, moe_intermediate_size=32,
                        first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1),
    "deepseek_v3": dict(model_type="deepseek_v3", vocab_size=1000, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=163840,
                        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
                        first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5),
    "mixtral": dict(model_type="mixtral", vocab_size=1000, hidden_size=64, intermediate_size=96,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=163840,
                    num_local_experts=4, num_experts_per_tok=2),
}


@pytest.mark.parametrize("model_type", list(_BASE))
@pytest.mark.parametrize("scaled", [True, False], ids=["yarn", "default"])
def test_from_hf_reads_both_rope_styles(model_type, scaled):
    theta = 12345.0
    hub = {**_BASE[model_type], "rope_theta": theta,
           "rope_scaling": {"type": "yarn", **_YARN} if scaled else None}
    v5 = {**_BASE[model_type],
          "rope_parameters": {"rope_type": "yarn" if scaled else "default", "rope_theta": theta,
                              **(_YARN if scaled else {})}}
    a, b = ModelConfig.from_hf(hub), ModelConfig.from_hf(v5)
    assert a == b, _diff(a, b)
    assert a.rope_theta == theta
    if scaled:
        assert a.rope_scaling == {"rope_type": "yarn", **_YARN}
        assert a.yarn_factor == 40.0
    else:
        assert a.rope_scaling is None
    # Hub style "rope_type" key spelled the v5 way inside rope_scaling also reads the same.
    hub2 = {**hub, "rope_scaling": None if not scaled else {"rope_type": "yarn", **_YARN}}
    assert ModelConfig.from_hf(hub2) == a


def test_from_hf_mixtral_family_defaults():
    c = ModelConfig.from_hf(_BASE["mixtral"])
    assert c.n_routed_experts == 4
    assert c.moe_intermediate_size == 96
    assert c.n_shared_experts == 0 and c.first_k_dense_replace == 0
    assert c.scoring_func == "softmax" and c.norm_topk_prob
    assert c.rope_theta == 1e6  # Mixtral's default when config.json leaves it out
    assert c.num_key_value_heads == 2 and c.kv_heads == 2


# ---------------------------------------------------------------------------------------------- to_hf -> transformers

HF_PRESETS = [n for n in PRESETS if PRESETS[n]["model_type"] in HF_CLASSES]


@pytest.mark.parametrize("style", ["v5", "hub"])
@pytest.mark.parametrize("name", HF_PRESETS)
def test_to_hf_accepted_by_transformers(name, style):
    c = get_preset(name)
    d = c.to_hf(style)
    json.dumps(d)  # must be writable as config.json
    cls = HF_CLASSES[c.model_type]
    hf = cls(**d)
    auto = AutoConfig.for_model(c.model_type, **{k: v for k, v in d.items() if k != "model_type"})
    assert type(auto) is cls
    for h in (hf, auto):
        assert h.hidden_size == c.hidden_size
        assert h.num_hidden_layers == c.num_hidden_layers
        assert h.num_attention_heads == c.num_attention_heads
        assert h.vocab_size == c.vocab_size
        assert h.num_experts_per_tok == c.num_experts_per_tok
        assert h.max_position_embeddings == c.max_position_embeddings
        assert h.rms_norm_eps == c.rms_norm_eps
        rp = h.rope_parameters
        assert rp["rope_theta"] == c.rope_theta
        if c.rope_scaling is None:
            assert rp["rope_type"] == "default"
        else:
            assert rp["rope_type"] == c.rope_scaling["rope_type"]
            for key in ("factor", "original_max_position_embeddings", "mscale", "mscale_all_dim",
                        "beta_fast", "beta_slow"):
                if key in c.rope_scaling:
                    assert rp[key] == c.rope_scaling[key], key
        if c.model_type == "mixtral":
            assert h.num_local_experts == c.n_routed_experts
            assert h.intermediate_size == c.moe_intermediate_size
            assert h.num_key_value_heads == c.kv_heads
            assert (h.head_dim or h.hidden_size // h.num_attention_heads) == c.gqa_head_dim  # modeling_mixtral rule
            assert h.router_aux_loss_coef == c.router_aux_loss_coef
        else:
            assert h.n_routed_experts == c.n_routed_experts
            assert h.n_shared_experts == c.n_shared_experts
            assert h.moe_intermediate_size == c.moe_intermediate_size
            assert h.intermediate_size == c.intermediate_size
            assert h.first_k_dense_replace == c.first_k_dense_replace
            assert h.q_lora_rank == c.q_lora_rank
            assert h.kv_lora_rank == c.kv_lora_rank
            assert h.qk_nope_head_dim == c.qk_nope_head_dim
            assert h.qk_rope_head_dim == c.qk_rope_head_dim
            assert h.v_head_dim == c.v_head_dim
            assert h.routed_scaling_factor == c.routed_scaling_factor
            assert h.n_group == c.n_group and h.topk_group == c.topk_group
            assert h.num_key_value_heads == c.num_attention_heads
            assert h.norm_topk_prob == c.norm_topk_prob
            if c.model_type == "deepseek_v2":
                assert h.topk_method == c.topk_method
    if name == "deepseek-v2-lite":
        assert hf.q_lora_rank is None and auto.q_lora_rank is None


def test_to_hf_rejects_unknown_style():
    with pytest.raises(ValueError, match="style"):
        get_preset("tiny-v1").to_hf("v4")


@pytest.mark.parametrize("style", ["v5", "hub"])
@pytest.mark.parametrize("name", list(PRESETS))
def test_round_trip_every_preset(name, style):
    c = get_preset(name)
    d = c.to_hf(style)
    if style == "v5":
        assert "rope_parameters" in d and "rope_scaling" not in d and "rope_theta" not in d
    else:
        assert "rope_parameters" not in d and "rope_theta" in d and "rope_scaling" in d
    back = ModelConfig.from_hf(d)
    assert back == c, _diff(back, c)
    # and through JSON, as it goes through a file
    back = ModelConfig.from_hf(json.loads(json.dumps(d)))
    assert back == c, _diff(back, c)


def test_round_trip_keeps_unknown_keys():
    raw = {**get_preset("tiny-v3").to_hf(), "some_future_key": [1, 2], "use_cache": True}
    c = ModelConfig.from_hf(raw)
    out = c.to_hf()
    assert out["some_future_key"] == [1, 2] and out["use_cache"] is True


# ---------------------------------------------------------------------------------------------- files


def test_from_hf_directory_and_file(tmp_path):
    c = get_preset("tiny-v2")
    c.save(tmp_path)
    assert (tmp_path / "config.json").is_file()
    assert ModelConfig.from_hf(tmp_path) == c
    assert ModelConfig.from_hf(str(tmp_path)) == c
    assert ModelConfig.from_hf(tmp_path / "config.json") == c
    c.save(tmp_path, style="hub")
    assert ModelConfig.from_hf(tmp_path) == c


def test_from_hf_missing_paths(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        ModelConfig.from_hf(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_hf(empty)


def test_from_hf_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        ModelConfig.from_hf(tmp_path)


def test_from_hf_transformers_saved_v3(tmp_path):
    rope = {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0, "original_max_position_embeddings": 64,
            "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}
    hf = DeepseekV3Config(vocab_size=1000, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                          num_hidden_layers=3, num_attention_heads=4, n_routed_experts=8, n_shared_experts=1,
                          num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                          q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                          max_position_embeddings=256, routed_scaling_factor=2.5, rope_parameters=rope)
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written.get("head_dim") == 8  # transformers' MLA head_dim = qk_rope_head_dim ...

    c = ModelConfig.from_hf(tmp_path)
    assert c.head_dim is None and c.num_key_value_heads is None  # ... which must not become a GQA size
    assert c.model_type == "deepseek_v3" and c.uses_mla
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.moe_intermediate_size) == (1000, 64, 128, 32)
    assert (c.num_hidden_layers, c.num_attention_heads) == (3, 4)
    assert (c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok) == (8, 1, 2)
    assert (c.n_group, c.topk_group, c.first_k_dense_replace) == (2, 1, 1)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (32, 16, 16, 8, 16)
    assert c.qk_head_dim == 24
    assert c.scoring_func == "sigmoid" and c.topk_method == "noaux_tc" and c.norm_topk_prob
    assert c.routed_scaling_factor == 2.5
    assert c.rope_theta == 5000.0
    assert c.rope_scaling == {"rope_type": "yarn", **{k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}}
    assert c.rope_interleave is True
    assert c.max_position_embeddings == 256

    # and back into transformers: the same config
    again = DeepseekV3Config(**c.to_hf())
    for key in ("hidden_size", "n_routed_experts", "n_group", "topk_group", "q_lora_rank", "kv_lora_rank",
                "qk_rope_head_dim", "head_dim", "rope_parameters", "norm_topk_prob", "routed_scaling_factor"):
        assert getattr(again, key) == getattr(hf, key), key


def test_to_hf_gqa_default_kv_heads_accepted_by_transformers():
    """num_key_value_heads=None means "as many as query heads"; config.json must say so with a number,
    since transformers' MixtralConfig rejects null."""
    c = ModelConfig(**{**PRESETS["tiny-mixtral"], "num_key_value_heads": None})
    d = c.to_hf()
    h = MixtralConfig(**d)
    assert h.num_key_value_heads == c.num_attention_heads
    assert ModelConfig.from_hf(d).kv_heads == c.kv_heads

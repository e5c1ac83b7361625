"""config.json values are type-checked once, with one ValueError naming the field (nested keys included),
and unknown keys that look like misspellings are reported (warning, or an error with strict=True)."""

from __future__ import annotations

import dataclasses
import re
import warnings

import pytest

from dsmoe.config import ModelConfig
from dsmoe.config_json import ConfigKeyWarning
from dsmoe.presets import get_preset

_YARN_HUB = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 1.0,
             "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}


def _v3_hub() -> dict:
    return {**get_preset("tiny-v3").to_hf("hub"), "rope_scaling": dict(_YARN_HUB)}


# The reported cases: each used to raise a TypeError deep in config.py / layers.py / moe.py, or to pass and
# crash at the first forward.
REPORTED = [
    ("n_group", "4", "ModelConfig.n_group: must be a positive integer or null, got '4'"),
    ("n_group", 4.0, "ModelConfig.n_group: must be a positive integer or null, got 4.0"),
    ("n_group", True, "ModelConfig.n_group: must be a positive integer or null, got True"),
    ("topk_group", 2.0, "ModelConfig.topk_group: must be a positive integer or null, got 2.0"),
    ("rope_scaling.factor", "4", "ModelConfig.rope_scaling.factor: must be a number > 0 or null, got '4'"),
    ("rope_scaling.original_max_position_embeddings", "32",
     "ModelConfig.rope_scaling.original_max_position_embeddings: must be a positive integer, got '32'"),
    ("rope_scaling.mscale_all_dim", "1.0", "ModelConfig.rope_scaling.mscale_all_dim: must be a number or null, "
     "got '1.0'"),
    ("rope_scaling.beta_fast", "32", "ModelConfig.rope_scaling.beta_fast: must be a number > 0 or null, got '32'"),
    ("quantization_config.weight_block_size", ["128", 128], "ModelConfig.quantization_config.weight_block_size: "
     "must be a list of two positive integers, got ['128', 128]"),
]


@pytest.mark.parametrize("path,value,message", REPORTED, ids=[f"{c[0]}={c[1]!r}" for c in REPORTED])
def test_reported_wrong_types_name_the_field(path, value, message):
    raw = _v3_hub()
    raw["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    *parents, key = path.split(".")
    target = raw[parents[0]] if parents else raw
    target[key] = value
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ModelConfig.from_hf(raw)


def test_rope_parameters_errors_name_the_v5_key():
    raw = get_preset("tiny-v3").to_hf("v5")
    raw["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": "4",
                              "original_max_position_embeddings": 32}
    with pytest.raises(ValueError, match=r"^ModelConfig\.rope_parameters\.factor: must be a number > 0"):
        ModelConfig.from_hf(raw)


_FAMILY_PRESET = {"deepseek": "tiny-v1", "deepseek_v2": "tiny-v2", "deepseek_v3": "tiny-v3", "deepseek_v32": "tiny-v3.2",
                  "deepseek_v4": "tiny-v4", "mixtral": "tiny-mixtral"}
_CHECKED = [f for f in dataclasses.fields(ModelConfig) if "kind" in f.metadata]


def test_every_field_declares_its_kind():
    """A field added without _f(default, kind, families) would be read from config.json unchecked."""
    plain = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "extra" and "kind" not in f.metadata]
    assert not plain, f"declare these fields with _f(...): {plain}"


def _carrying_preset(f: dataclasses.Field) -> str:
    families = f.metadata["families"] or ("deepseek_v3",)
    return _FAMILY_PRESET[families[-1]]


@pytest.mark.parametrize("name", [f.name for f in _CHECKED if f.name != "model_type"])  # an alias: see roundtrip
def test_every_field_refuses_a_string_in_config_json_naming_it(name):
    """Whatever the field (a new one included), a string where it does not belong is one ValueError naming it."""
    f = next(f for f in _CHECKED if f.name == name)
    raw = get_preset(_carrying_preset(f)).to_hf("hub")
    key = {"n_routed_experts": "num_local_experts"}.get(name, name) if raw["model_type"] == "mixtral" else name
    raw[key] = "7x"
    with pytest.raises(ValueError, match=rf"^ModelConfig\.{name}: must be .*, got '7x'$"):
        ModelConfig.from_hf(raw)


@pytest.mark.parametrize("name", [f.name for f in _CHECKED if f.metadata["kind"].desc.startswith(
    ("a positive integer", "an integer"))])
@pytest.mark.parametrize("bad", [3.0, True])
def test_integer_fields_refuse_floats_and_booleans(name, bad):
    f = next(f for f in _CHECKED if f.name == name)
    values = {**dataclasses.asdict(get_preset(_carrying_preset(f))), name: bad}
    values.pop("extra")
    with pytest.raises(ValueError, match=rf"^ModelConfig\.{name}: must be .*, got {bad!r}$"):
        ModelConfig(**values)


# ---------------------------------------------------------------------------------------------- misspelled keys

@pytest.mark.parametrize("key,meant", [("num_hiden_layers", "num_hidden_layers"),
                                       ("rms_norm_epsilon", "rms_norm_eps"),
                                       ("num_expert_per_tok", "num_experts_per_tok")])
def test_misspelled_key_warns_naming_the_intended_key(key, meant):
    raw = get_preset("tiny-v1").to_hf()
    value = raw.pop(meant)
    raw[key] = value
    with pytest.warns(ConfigKeyWarning, match=rf"unknown key '{key}'; did you mean '{meant}'\?"):
        config = ModelConfig.from_hf(raw)
    assert config.extra[key] == value  # kept, and written back
    assert config.to_hf()[key] == value
    with pytest.raises(ValueError, match=rf"^ModelConfig\.{key}: unknown key; did you mean '{meant}'\?"):
        ModelConfig.from_hf(raw, strict=True)


def test_misspelled_rope_key_warns():
    raw = _v3_hub()
    raw["rope_scaling"]["orignal_max_position_embeddings"] = raw["rope_scaling"].pop(
        "original_max_position_embeddings")
    with pytest.warns(ConfigKeyWarning, match="did you mean 'original_max_position_embeddings'"):
        with pytest.raises(ValueError, match="yarn needs original_max_position_embeddings"):
            ModelConfig.from_hf(raw)


def test_real_extra_keys_do_not_warn():
    raw = {**get_preset("tiny-v3").to_hf("hub"), "use_cache": True, "pretraining_tp": 1, "attention_dropout": 0.0,
           "ep_size": 1, "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
           "torch_dtype": "bfloat16", "transformers_version": "4.46.3", "qk_head_dim": 48, "my_note": "x"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelConfig.from_hf(raw, strict=True)


def test_misspelled_layer_count_is_named_when_the_load_then_fails(tmp_path):
    import json

    import dsmoe
    from dsmoe.checkpoint import CheckpointError

    config = get_preset("tiny-v1").replace(num_hidden_layers=3, vocab_size=64, hidden_size=32, intermediate_size=48,
                                           moe_intermediate_size=16)
    dsmoe.save_pretrained(dsmoe.Transformer(config), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["num_hiden_layers"] = raw.pop("num_hidden_layers")  # the default (2) layers then leave layer 2 unexpected
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.warns(ConfigKeyWarning), pytest.raises(CheckpointError) as err:
        dsmoe.load_pretrained(tmp_path)
    assert "unexpected tensor 'model.layers.2." in str(err.value)
    assert str(err.value).endswith("config.json has unknown key(s) 'num_hiden_layers' (did you mean "
                                   "'num_hidden_layers'?)")
    with pytest.raises(ValueError, match=r"^ModelConfig\.num_hiden_layers: unknown key; did you mean"):
        dsmoe.load_pretrained(tmp_path, strict=True)

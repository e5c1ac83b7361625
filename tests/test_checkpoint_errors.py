"""Damaged or mismatched checkpoints: each gets an error naming the tensor and/or file."""

from __future__ import annotations

import json

import pytest
import torch
from hf_models import build_hf_model
from safetensors.torch import load_file, save_file

import dsmoe
from dsmoe.checkpoint import CheckpointError

pytest.importorskip("transformers")

ATTN = "model.layers.1.self_attn.kv_b_proj.weight"
EXPERT = "model.layers.2.mlp.experts.5.up_proj.weight"


@pytest.fixture(scope="module")
def hf_state(tmp_path_factory):
    """One saved tiny DeepSeek-V3 checkpoint: (config.json text, state dict)."""
    path = tmp_path_factory.mktemp("v3")
    build_hf_model("v3-yarn-groups").save_pretrained(path)
    return (path / "config.json").read_text(), load_file(path / "model.safetensors")


def _write(path, config_text, state, name="model.safetensors"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(config_text)
    save_file(state, str(path / name), metadata={"format": "pt"})
    return path


def test_intact_checkpoint_loads(hf_state, tmp_path):
    dsmoe.load_pretrained(_write(tmp_path, *hf_state))


@pytest.mark.parametrize("name", [ATTN, EXPERT, "lm_head.weight"])
def test_missing_tensor(hf_state, tmp_path, name):
    config, state = hf_state
    state = {k: v for k, v in state.items() if k != name}
    with pytest.raises(CheckpointError, match=f"missing tensor.*{name}"):
        dsmoe.load_pretrained(_write(tmp_path, config, state))


def test_unexpected_tensor_names_tensor_and_file(hf_state, tmp_path):
    config, state = hf_state
    state = dict(state, **{"model.layers.0.mlp.experts.0.up_proj.weight": torch.zeros(4, 4)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.0.mlp.experts.0.up_proj.weight'"
                                              r" in .*model.safetensors"):
        dsmoe.load_pretrained(_write(tmp_path, config, state))


@pytest.mark.parametrize("name", [ATTN, EXPERT])
def test_wrong_shape(hf_state, tmp_path, name):
    config, state = hf_state
    state = dict(state)
    state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])
    with pytest.raises(CheckpointError, match=f"tensor '{name}' in .*model.safetensors has shape"):
        dsmoe.load_pretrained(_write(tmp_path, config, state))


def test_truncated_file(hf_state, tmp_path):
    path = _write(tmp_path, *hf_state)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        dsmoe.load_pretrained(path)


def test_garbage_file(hf_state, tmp_path):
    path = _write(tmp_path, *hf_state)
    (path / "model.safetensors").write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(CheckpointError, match="damaged or not a safetensors file"):
        dsmoe.load_pretrained(path)


def test_non_finite_values(hf_state, tmp_path):
    config, state = hf_state
    state = dict(state)
    state[ATTN] = state[ATTN].clone()
    state[ATTN][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=f"{ATTN}.*NaN"):
        dsmoe.load_pretrained(_write(tmp_path, config, state))


def test_index_pointing_at_missing_shard(hf_state, tmp_path):
    path = _write(tmp_path, *hf_state)
    weight_map = {k: "model.safetensors" for k in hf_state[1]}
    weight_map[ATTN] = "model-00002-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*does not exist"):
        dsmoe.load_pretrained(path)


def test_broken_index_and_config(hf_state, tmp_path):
    path = _write(tmp_path, *hf_state)
    (path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="index"):
        dsmoe.load_pretrained(path)
    (path / "model.safetensors.index.json").unlink()
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        dsmoe.load_pretrained(path)


def test_missing_directory_and_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        dsmoe.load_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(dsmoe.get_preset("tiny-v3").to_hf()))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        dsmoe.load_pretrained(tmp_path)


def test_fp8_weight_without_scale(hf_state, tmp_path):
    config, state = hf_state
    state = dict(state)
    state[ATTN] = state[ATTN].to(torch.float8_e4m3fn)
    with pytest.raises(CheckpointError, match=f"FP8 tensor '{ATTN}'.*weight_scale_inv"):
        dsmoe.load_pretrained(_write(tmp_path, config, state))


def test_mtp_layer_and_rotary_tables_are_ignored(hf_state, tmp_path):
    config, state = hf_state
    layers = json.loads(config)["num_hidden_layers"]
    state = dict(state, **{f"model.layers.{layers}.eh_proj.weight": torch.zeros(4, 8),
                           "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)})
    dsmoe.load_pretrained(_write(tmp_path, config, state))


def test_layers_beyond_the_config_fail_instead_of_loading_a_truncated_model(hf_state, tmp_path):
    config, state = hf_state
    raw = json.loads(config)
    raw["num_hidden_layers"] -= 1
    last = raw["num_hidden_layers"]
    with pytest.raises(CheckpointError, match=rf"unexpected tensor 'model.layers.{last}\."):
        dsmoe.load_pretrained(_write(tmp_path, json.dumps(raw), state))


def test_tied_model_may_carry_lm_head(hf_state, tmp_path):
    config, state = hf_state
    raw = json.loads(config)
    raw["tie_word_embeddings"] = True
    state = dict(state, **{"lm_head.weight": state["model.embed_tokens.weight"].clone()})
    model = dsmoe.load_pretrained(_write(tmp_path, json.dumps(raw), state))
    assert model.head.weight is model.embed.weight


def test_fp8_weight_with_non_finite_scale(hf_state, tmp_path):
    from dsmoe.checkpoint.fp8 import DEFAULT_BLOCK, scale_shape

    config, state = hf_state
    state = dict(state)
    q = state[ATTN].to(torch.float8_e4m3fn)
    scale = torch.ones(scale_shape(tuple(q.shape), DEFAULT_BLOCK))
    scale[0, 0] = float("inf")
    state[ATTN], state[ATTN + "_scale_inv"] = q, scale
    with pytest.raises(CheckpointError, match=f"FP8 tensor '{ATTN}'.*dequantises to NaN or inf"):
        dsmoe.load_pretrained(_write(tmp_path, config, state))

"""Fine-tuning (`--init`), any architecture (`--config` / `--set`), `--train-only` / `--freeze`, and the
memory check that refuses a model before allocating it."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from train_assets import hf_checkpoint as _hf_checkpoint
from train_assets import tokenizer_for as _tokenizer
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

import dsmoe
from dsmoe.calc import arch_stats
from dsmoe.checkpoint.fp8 import quantize_blockwise
from dsmoe.presets import get_preset
from dsmoe.train import model_source
from dsmoe.train.loop import TrainConfig, train
from dsmoe.train.metrics import read_metrics

SMALL = dict(batch_size=4, seq_len=32, eval_every=4, eval_batches=1, save_every=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for module in (json, os, subprocess):
        (folder / f"{module.__name__}.py").write_text(inspect.getsource(module))
    return folder


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.mark.parametrize("case", ["v2-lite-noqlora", "mixtral"])
def test_fine_tune_a_transformers_checkpoint(case, corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    source = _hf_checkpoint(tmp_path / "source", case, corpus)
    out = tmp_path / "run"
    train(TrainConfig(init=source, data=corpus, out=out, steps=8, lr=1e-2, warmup=0, **SMALL))
    losses = [r["lm_loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert sum(losses[-2:]) / 2 < losses[0] - 0.3, losses  # it learned
    # The checkpoint's own tokenizer, byte for byte (no tokenizer was trained), and its EOS id.
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 1
    # The result loads in transformers and computes what dsmoe computes.
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = dsmoe.load_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)
        # and it is not the source model any more
        before = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
        assert not torch.allclose(before(ids).logits, ref(ids).logits, atol=1e-3)
    # and `dsmoe generate` writes text with the checkpoint's tokenizer
    from dsmoe.cli import main

    assert main(["generate", "--model", str(out), "--prompt", "def ", "--max-new-tokens", "4"]) == 0


@pytest.mark.parametrize("case,flags,pattern", [
    ("v2-lite-noqlora", dict(train_only=("*.gate.weight",)), "model.layers.*.mlp.gate.weight"),  # routers only
    ("mixtral", dict(freeze=("*experts*",)), "!model.layers.*.block_sparse_moe.experts.*"),  # all but experts
])
def test_train_only_and_freeze_leave_every_other_tensor_bit_identical(case, flags, pattern, corpus, tmp_path,
                                                                      capsys):
    pytest.importorskip("transformers")
    from fnmatch import fnmatchcase

    from dsmoe.cli import main

    source = _hf_checkpoint(tmp_path / "source", case, corpus)
    out = tmp_path / "run"
    (flag, patterns), = flags.items()
    capsys.readouterr()
    assert main(["train", "--init", str(source), "--data", str(corpus), "--out", str(out), "--steps", "3",
                 "--batch-size", "4", "--seq-len", "32", f"--{flag.replace('_', '-')}", ",".join(patterns)]) == 0
    stderr = capsys.readouterr().err
    trainable = sum(p.numel() for n, p in dsmoe.load_pretrained(source).named_parameters()
                    if any(fnmatchcase(n, q) for q in patterns) != (flag == "freeze"))
    assert f"{trainable / 1e6:.2f}M trainable" in stderr, stderr
    before, after = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(before) == set(after)
    negate, pattern = pattern.startswith("!"), pattern.lstrip("!")
    trained = {n for n in before if fnmatchcase(n, pattern) != negate}
    assert trained and len(trained) < len(before)
    for name in before:
        if name in trained:
            assert not torch.equal(before[name], after[name]), f"{name} should have trained"
        else:
            assert torch.equal(before[name], after[name]), f"{name} changed"


def test_fine_tune_fp8_v3_keeps_routing_bias_and_trains_the_mtp_module(corpus, tmp_path):
    """An FP8 DeepSeek-V3-layout checkpoint with an MTP module: `--train-only 'mtp.*'` trains the MTP module
    alone; the main model (routing biases included) stays as dequantised, and the MTP module is saved."""
    source = tmp_path / "fp8"
    torch.manual_seed(0)
    config = get_preset("tiny-v3").replace(vocab_size=300, num_hidden_layers=2, bos_token_id=0, eos_token_id=1)
    model = dsmoe.Transformer(config)
    for moe in model.moe_layers(include_mtp=True):
        moe.gate.bias.uniform_(-0.1, 0.1)
    dsmoe.save_pretrained(model, tmp_path / "plain")
    state = {}
    for name, t in load_file(tmp_path / "plain" / "model.safetensors").items():
        if t.ndim == 2 and "embed" not in name and "head" not in name and not name.endswith("mlp.gate.weight"):
            state[name], state[name + "_scale_inv"] = quantize_blockwise(t, (16, 16))
        else:
            state[name] = t
    source.mkdir()
    save_file(state, str(source / "model.safetensors"), metadata={"format": "pt"})
    hf = json.loads((tmp_path / "plain" / "config.json").read_text())
    hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]}
    (source / "config.json").write_text(json.dumps(hf))
    _tokenizer(source, corpus)  # no generation_config.json: the ids come from config.json

    out = tmp_path / "run"
    train(TrainConfig(init=source, data=corpus, out=out, steps=3, train_only=("mtp.*",), **SMALL))
    assert "mtp_loss" in read_metrics(out / "metrics.jsonl")[0]
    dequantised = dsmoe.load_pretrained(source, dtype=torch.float32).state_dict()
    tuned = dsmoe.load_pretrained(out, dtype=torch.float32)
    assert len(tuned.mtp) == 1
    for name, t in tuned.state_dict().items():
        same = torch.equal(t, dequantised[name])
        assert same != name.startswith("mtp."), name  # the MTP router's bias too: it matches mtp.*
    assert any(m.gate.bias.abs().sum() > 0 for m in tuned.moe_layers())  # carried, not reset
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 1
    # the run carries what it needs from --init: it resumes after the source is gone
    import shutil

    shutil.rmtree(source)
    train(TrainConfig(init=source, data=corpus, out=out, steps=4, train_only="mtp.*", resume=True, **SMALL))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_config_file_with_set_overrides(corpus, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(get_preset("tiny-mixtral").to_hf("hub")))
    out = tmp_path / "run"
    train(TrainConfig(config=str(config), overrides={"num_hidden_layers": 1, "num_local_experts": 4},
                      data=corpus, out=out, steps=2, vocab_size=300, **SMALL))
    saved = dsmoe.ModelConfig.from_hf(out)
    assert (saved.num_hidden_layers, saved.n_routed_experts, saved.model_type) == (1, 4, "mixtral")
    # config.json and generation_config.json name the end-of-text id the run separated documents with
    eot = Tokenizer.from_file(str(out / "tokenizer.json")).token_to_id("<|endoftext|>")
    assert saved.eos_token_id == eot
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eot


@pytest.mark.parametrize("overrides,message", [
    ({"num_hidden_layer": 6}, r"--set num_hidden_layer: not a model config field"),
    ({"num_experts_per_tok": 99}, r"num_experts_per_tok"),
])
def test_bad_set_is_refused_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        model_source.resolve_config("tiny-v1", overrides)


def test_patterns_match_dsmoe_and_hub_names():
    config = get_preset("tiny-v3")
    names = list(model_source.meta_parameters(config))
    by_hub = model_source.select_trainable(names, config, train_only=("model.layers.*.mlp.experts.*.up_proj.weight",))
    assert by_hub == {n for n in names if n.endswith("ffn.experts.w3")}
    ours = model_source.select_trainable(names, config, freeze=("*experts*",))
    assert ours == {n for n in names if "experts" not in n}
    with pytest.raises(ValueError, match=r"--train-only 'nothing\*' matches no parameter"):
        model_source.select_trainable(names, config, train_only=("nothing*",))


def test_a_model_too_big_for_memory_is_refused_before_allocating(tmp_path, capsys):
    sizes = model_source.meta_parameters(get_preset("deepseek-v3"))  # the meta device: no memory
    stats = arch_stats(get_preset("deepseek-v3"))  # the closed-form count: 671B + the MTP module
    assert sum(sizes.values()) == stats.total_params + stats.mtp_params
    with pytest.raises(ValueError, match=r"682\.6B parameters need about 9\.9 TiB .* more than the 64\.0 GiB"):
        model_source.check_fits("deepseek-v3", sizes, set(sizes), available=64 * 2**30)
    from dsmoe.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # the command as a user types it, in this process
        main(["train", "--preset", "deepseek-v3", "--out", str(tmp_path / "run")])
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("dsmoe: error: deepseek-v3:") and "AdamW" in stderr
    assert not (tmp_path / "run").exists()


def test_set_rope_keys_keep_what_they_leave_out():
    from dsmoe.presets import get_preset as preset

    assert model_source.resolve_config("deepseek-v3", {}) == preset("deepseek-v3")  # a preset round-trips
    theta = model_source.resolve_config("deepseek-v3", {"rope_theta": 5e5})
    assert theta.rope_theta == 5e5 and theta.rope_scaling == preset("deepseek-v3").rope_scaling
    yarn = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 256}
    scaled = model_source.resolve_config("tiny-mixtral", {"rope_scaling": yarn})
    assert scaled.rope_theta == 1e6 and scaled.rope_scaling["factor"] == 4
    with pytest.raises(ValueError, match="rope_scaling: yarn needs original_max_position_embeddings"):
        model_source.resolve_config("tiny-v3", {"rope_scaling": {"type": "yarn", "factor": 4}})

"""generation_config.json is read by load_pretrained and `dsmoe generate`, written by save_pretrained; every
checkpoint file is written with the process umask."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from tiny_assets import build_tokenizer
from tokenizers import Tokenizer

import dsmoe
from dsmoe.checkpoint import GenerationConfig
from dsmoe.generate import generate
from dsmoe.presets import get_preset

SOURCE = {"bos_token_id": 1, "eos_token_id": [2, 5], "pad_token_id": None, "do_sample": True, "temperature": 0.6,
          "top_p": 0.95, "transformers_version": "4.46.3", "repetition_penalty": 1.05}


def _tiny(vocab: int = 64, **changes) -> dsmoe.Transformer:
    torch.manual_seed(0)
    config = get_preset("tiny-v1").replace(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                           intermediate_size=48, moe_intermediate_size=16, **changes)
    return dsmoe.Transformer(config)


def test_load_reads_and_save_writes_back_the_source_keys(tmp_path):
    dsmoe.save_pretrained(_tiny(), tmp_path / "a")
    assert not (tmp_path / "a" / "generation_config.json").exists()  # no ids anywhere: nothing to write
    assert dsmoe.load_pretrained(tmp_path / "a").generation_config is None
    (tmp_path / "a" / "generation_config.json").write_text(json.dumps(SOURCE))
    model = dsmoe.load_pretrained(tmp_path / "a")
    gen = model.generation_config
    assert gen.eos_token_id == [2, 5] and gen.bos_token_id == 1
    assert gen.sampling_defaults() == {"temperature": 0.6, "top_p": 0.95, "top_k": None}
    dsmoe.save_pretrained(model, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "generation_config.json").read_text()) == SOURCE


def test_generation_config_keeps_the_files_spelling():
    raw = {"eos_token_id": [2], "pad_token_id": None, "top_k": 0}
    gen = GenerationConfig.from_dict(raw)
    assert gen.to_dict() == raw  # a one-id list stays a list, null stays null
    gen.eos_token_id = [4]
    assert gen.to_dict() == {"eos_token_id": 4, "pad_token_id": None, "top_k": 0}


def test_save_writes_config_json_ids_or_the_given_generation_config(tmp_path):
    model = _tiny(bos_token_id=0, eos_token_id=3)
    dsmoe.save_pretrained(model, tmp_path / "ids")
    assert json.loads((tmp_path / "ids" / "generation_config.json").read_text()) == {"bos_token_id": 0,
                                                                                      "eos_token_id": 3}
    # a training run passes its tokenizer's real end-of-text id this way
    dsmoe.save_pretrained(model, tmp_path / "given", generation_config=GenerationConfig(eos_token_id=7))
    assert json.loads((tmp_path / "given" / "generation_config.json").read_text()) == {"eos_token_id": 7}
    assert dsmoe.load_pretrained(tmp_path / "given").generation_config.eos_token_id == [7]


def test_broken_generation_config_fails_the_load_naming_the_file(tmp_path):
    dsmoe.save_pretrained(_tiny(), tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "2"}))
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id must be"):
        dsmoe.load_pretrained(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_every_checkpoint_file_honours_the_umask(tmp_path, umask):
    model = _tiny(eos_token_id=3)
    old = os.umask(umask)
    try:
        dsmoe.save_pretrained(model, tmp_path, max_shard_size="20KB")
    finally:
        os.umask(old)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors.index.json" in files and "generation_config.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    modes = {name: stat.S_IMODE((tmp_path / name).stat().st_mode) for name in files}
    assert modes == dict.fromkeys(files, 0o666 & ~umask)


# ---------------------------------------------------------------------------------------------- dsmoe generate

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen")
    tok = build_tokenizer(path)
    torch.manual_seed(0)
    config = get_preset("tiny-v1").replace(vocab_size=tok.get_vocab_size(), num_hidden_layers=2,
                                           initializer_range=0.08)
    dsmoe.save_pretrained(dsmoe.Transformer(config), path)
    return path, tok


def _cli(model_dir, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dsmoe", "generate", "--model", str(model_dir), "--prompt",
                             "def ", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_cli_stops_at_generation_config_eos_and_samples_with_its_defaults(model_dir):
    path, tok = model_dir
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    model = dsmoe.load_pretrained(path)
    ids = tok.encode("def ").ids
    free = generate(model, torch.tensor([ids]), 12)[0, len(ids):].tolist()
    # an EOS id that first appears a few tokens in: the CLI must stop right after it
    stop_at = next(i for i, t in enumerate(free) if i >= 2 and t not in free[:i])
    gen = {"eos_token_id": [free[stop_at]], "do_sample": True, "temperature": 0.7}
    (path / "generation_config.json").write_text(json.dumps(gen))
    try:
        greedy = _cli(path, "--max-new-tokens", "12", "--temperature", "0")
        assert greedy == tok.decode(free[:stop_at + 1], skip_special_tokens=True) + "\n"
        # no sampling flag given: the file's do_sample / temperature apply
        (path / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": []}))
        sampled = generate(model, torch.tensor([ids]), 12, temperature=0.7, seed=3)[0, len(ids):].tolist()
        assert sampled != free
        assert _cli(path, "--max-new-tokens", "12", "--seed", "3") == tok.decode(
            sampled, skip_special_tokens=True) + "\n"
    finally:
        (path / "generation_config.json").unlink()

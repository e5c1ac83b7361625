"""`dsmoe generate`: streams the same text the library produces; bad input is one line on stderr."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from tiny_assets import build_tokenizer
from tokenizers import Tokenizer

import dsmoe
from dsmoe.generate import generate
from dsmoe.presets import get_preset


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tok = build_tokenizer(path)
    torch.manual_seed(0)
    config = get_preset("tiny-v3").replace(vocab_size=tok.get_vocab_size(), num_hidden_layers=2,
                                           initializer_range=0.08)
    dsmoe.save_pretrained(dsmoe.Transformer(config), path)
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsmoe", *args], capture_output=True, text=True, timeout=120)


def test_generate_streams_the_library_output(model_dir):
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    model = dsmoe.load_pretrained(model_dir)
    prompt = "def "
    ids = tok.encode(prompt).ids
    expected = generate(model, torch.tensor([ids]), 12, eos_token_id=tok.token_to_id("<|endoftext|>"))
    text = tok.decode(expected[0, len(ids):].tolist(), skip_special_tokens=True)

    for extra in ([], ["--prefill-chunk", "2"], ["--speculative"]):
        result = _run("generate", "--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", "12", *extra)
        assert result.returncode == 0, result.stderr
        assert result.stdout == text + "\n"
        assert "tokens/s" in result.stderr
    assert "acceptance" in result.stderr


@pytest.mark.parametrize("setup,args,message", [
    ("none", ["--model", "{dir}/nope"], "no such model directory"),
    ("no_tokenizer", ["--model", "{dir}"], "tokenizer file not found"),
    ("broken_tokenizer", ["--model", "{dir}"], "not a valid tokenizer.json"),
    ("broken_weights", ["--model", "{dir}"], "damaged or not a safetensors file"),
    ("copy", ["--model", "{dir}", "--temperature", "-1"], "temperature"),
    ("copy", ["--model", "{dir}", "--temperature", "nan"], "temperature"),
])
def test_generate_errors_are_one_line(model_dir, tmp_path, setup, args, message):
    import shutil

    if setup != "none":
        shutil.copytree(model_dir, tmp_path, dirs_exist_ok=True)
    if setup == "no_tokenizer":
        (tmp_path / "tokenizer.json").unlink()
    elif setup == "broken_tokenizer":
        (tmp_path / "tokenizer.json").write_text("{broken")
    elif setup == "broken_weights":
        (tmp_path / "model.safetensors").write_bytes(b"junk" * 10)
    result = _run("generate", *[a.format(dir=tmp_path) for a in args], "--prompt", "x")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsmoe: error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr

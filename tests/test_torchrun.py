"""`torchrun -m dsmoe train --ep 2` end to end: same losses as one process, checkpoints interchangeable."""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys

import pytest

from dsmoe.train.metrics import read_metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out, steps: int, procs: int = 1, *extra: str, corpus) -> subprocess.CompletedProcess:
    args = ["--data", str(corpus), "--out", str(out), "--steps", str(steps), "--batch-size", "4", "--seq-len", "32",
            "--eval-every", "2", "--save-every", "4", *extra]
    if procs == 1:
        command = [sys.executable, "-m", "dsmoe", "train", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "dsmoe", "train", *args,
                   "--ep", str(procs)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for module in (json, os, socket, subprocess):
        (folder / f"{module.__name__}.py").write_text(inspect.getsource(module))
    return folder


def test_two_process_expert_parallel_run_equals_one_process(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
    _train(tmp_path / "one", 4, corpus=corpus)
    _train(tmp_path / "two", 4, 2, corpus=corpus)
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-4)
        assert b["expert_load"] == a["expert_load"]  # global loads, all-reduced over the ranks
    # Saved from 2 processes, resumed in 1: continues exactly like the 1-process run does.
    _train(tmp_path / "two", 6, 1, "--resume", corpus=corpus)
    _train(tmp_path / "one", 6, 1, "--resume", corpus=corpus)
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == list(range(1, 7))
    assert [r["lm_loss"] for r in two[4:]] == pytest.approx([r["lm_loss"] for r in one[4:]], rel=1e-4)


def test_generate_with_sharded_experts_equals_one_process(tmp_path, monkeypatch):
    import torch

    import dsmoe
    from dsmoe.presets import get_preset

    from tiny_assets import build_tokenizer

    tok = build_tokenizer(tmp_path)
    torch.manual_seed(0)
    config = get_preset("tiny-v3").replace(vocab_size=tok.get_vocab_size(), num_hidden_layers=2, initializer_range=0.08)
    dsmoe.save_pretrained(dsmoe.Transformer(config), tmp_path)
    args = ["-m", "dsmoe", "generate", "--model", str(tmp_path), "--prompt", "def ", "--max-new-tokens", "16",
            "--temperature", "0.9", "--seed", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(_free_port()), *args, "--ep", "2"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout == one.stdout and one.stdout.strip()
    # Without --ep the ranks are plain replicas: nothing is sharded, so even --speculative works
    greedy = ["-m", "dsmoe", "generate", "--model", str(tmp_path), "--prompt", "def ", "--max-new-tokens", "8",
              "--speculative"]
    one = subprocess.run([sys.executable, *greedy], capture_output=True, text=True, env=env, timeout=120)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(_free_port()), *greedy],
                         capture_output=True, text=True, env=env, timeout=120)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout == one.stdout and one.stdout.strip()

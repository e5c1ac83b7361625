"""Training on a chosen device (--device) and with activation checkpointing (--checkpoint-activations).

Runs on the CPU here; under DSMOE_TEST_DEVICE=cuda the `device`-parametrized test trains on the GPU."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsmoe
from dsmoe.cli import build_parser
from dsmoe.presets import get_preset
from dsmoe.train.loop import TrainConfig, train
from dsmoe.train.metrics import read_metrics
from dsmoe.train.objective import BalanceSettings, compute_losses
from dsmoe.train.placement import checkpoint_activations

SMALL = dict(batch_size=4, seq_len=32, eval_every=3, eval_batches=1, vocab_size=300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for module in (json, os, subprocess):
        (folder / f"{module.__name__}.py").write_text(inspect.getsource(module))
    return folder


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _losses(out: Path) -> list[float]:
    return [r["lm_loss"] for r in read_metrics(out / "metrics.jsonl")]


def _back_to_step_2(out: Path) -> None:
    """Make the run's step-2 checkpoint current again (as after a crash there), so a resume retrains 3-4."""
    (out / "current").unlink()
    (out / "current").symlink_to("step-000002")


@pytest.fixture(scope="module")
def default_run(corpus, tmp_path_factory) -> list[float]:
    """lm_loss per step of a 4-step run with the default settings (device auto: the CPU without a GPU)."""
    out = tmp_path_factory.mktemp("default") / "run"
    os.environ["DSMOE_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    try:
        train(TrainConfig(preset="tiny-v3", steps=4, save_every=2, data=corpus, out=out, **SMALL),
              device=torch.device("cpu"))
    finally:
        del os.environ["DSMOE_CACHE"]
    return _losses(out)


def test_argparse_tells_device_from_devices():
    args = build_parser().parse_args(["train", "--device", "cuda:1", "--devices", "2"])
    assert (args.device, args.devices) == ("cuda:1", 2)
    args = build_parser().parse_args(["train", "--devices", "4"])
    assert (args.device, args.devices) == (None, 4)


def test_device_cpu_equals_the_default_run_loss_for_loss(corpus, tmp_path, default_run):
    out = tmp_path / "run"
    train(TrainConfig(preset="tiny-v3", steps=4, save_every=2, data=corpus, out=out, device="cpu", **SMALL))
    assert _losses(out) == default_run  # bitwise: --device cpu is the CPU path


def test_training_runs_on_the_test_device(corpus, tmp_path, device, default_run):
    """4 steps on `device` (the CPU, or the GPU under DSMOE_TEST_DEVICE=cuda), then steps 3-4 again resumed on the
    CPU from its step-2 checkpoint: the checkpoint loads anywhere, and the losses follow the CPU run (bitwise on
    the CPU; to kernel rounding on a GPU, where reductions run in another order)."""
    out = tmp_path / "run"
    train(TrainConfig(preset="tiny-v3", steps=4, save_every=2, data=corpus, out=out, device=str(device), **SMALL))
    same = (lambda a, b: a == b) if device.type == "cpu" else (lambda a, b: a == pytest.approx(b, rel=2e-3))
    assert same(_losses(out), default_run)
    _back_to_step_2(out)
    state = torch.load(out / "current" / "trainer_state.pt", weights_only=False)
    tensors = [t for s in state["optimizer"]["state"].values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)  # written from CPU copies
    assert ("cuda" in state["rng"]) == (device.type == "cuda")
    train(TrainConfig(preset="tiny-v3", steps=4, save_every=2, data=corpus, out=out, device="cpu", resume=True,
                      **SMALL))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert same(_losses(out), default_run)


def test_resume_may_change_device_and_checkpointing_from_the_command_line(corpus, tmp_path, default_run):
    """The flags as the CLI reads them: a run started with --device auto resumes with --device cpu
    --checkpoint-activations (both reported as changes) and continues the same losses."""
    from dsmoe.cli.train import build_config

    out = tmp_path / "run"
    base = ["train", "--data", str(corpus), "--out", str(out), "--batch-size", "4", "--seq-len", "32",
            "--eval-every", "3", "--vocab-size", "300", "--save-every", "2", "--steps", "4"]
    cfg, _ = build_config(build_parser().parse_args([*base, "--device", "auto"]))
    train(cfg)
    assert json.loads((out / "run.json").read_text())["device"] == "auto"
    _back_to_step_2(out)
    cfg, notes = build_config(build_parser().parse_args([*base, "--resume", "--device", "cpu",
                                                         "--checkpoint-activations"]))
    assert (cfg.device, cfg.checkpoint_activations) == ("cpu", True)
    assert "--device auto -> cpu" in notes and "--checkpoint-activations False -> True" in notes
    train(cfg)
    assert _losses(out) == pytest.approx(default_run, rel=1e-6, abs=0)


def test_cuda_without_cuda_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = subprocess.run([sys.executable, "-m", "dsmoe", "train", "--device", "cuda", "--steps", "1",
                             "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsmoe: error: --device: device 'cuda' requested but"), lines
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-v2", "tiny-v3.2", "tiny-v4"])
def test_checkpointed_activations_give_the_same_losses_and_gradients(preset):
    """The same weights and batch with and without recomputation: losses and every gradient equal (fp32
    rounding), including the MTP loss and the balance losses that read routing statistics of the forward."""
    torch.manual_seed(0)
    config = get_preset(preset)
    plain = dsmoe.Transformer(config).train()
    wrapped = dsmoe.Transformer(config).train()
    wrapped.load_state_dict(plain.state_dict())
    assert checkpoint_activations(wrapped) == config.num_hidden_layers >= 2
    tokens = torch.randint(0, config.vocab_size, (2, 18 + len(plain.mtp)))
    settings = BalanceSettings.paper_defaults(config)
    results, calls = [], []
    for model in (plain, wrapped):
        seen = []
        hook = model.layers[1].attn.register_forward_hook(lambda *_: seen.append(1))
        losses = compute_losses(model, tokens, 16, settings, 0.3)
        losses.total.backward()
        hook.remove()
        calls.append(len(seen))
        results.append((losses.as_floats(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (floats_a, grads_a), (floats_b, grads_b) = results
    assert floats_b == pytest.approx(floats_a, rel=1e-6, abs=1e-7)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)
    assert calls == [1, 2]  # the wrapped block really ran again in the backward pass
    assert list(wrapped.state_dict()) == list(plain.state_dict())  # the names checkpoints use are unchanged

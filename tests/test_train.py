"""Training: objective, crash-safe checkpoints, exact resume after SIGKILL, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dsmoe
from dsmoe.presets import get_preset
from dsmoe.train import checkpoint as ckpt
from dsmoe.train.loop import TrainConfig, TrainingError, learning_rate, parameter_groups, train
from dsmoe.train.metrics import read_metrics
from dsmoe.train.objective import BalanceSettings, compute_losses

SMALL = dict(batch_size=4, seq_len=32, eval_every=3, eval_batches=1, vocab_size=300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small folder corpus: fast tokenizer training, enough text for a few dozen windows."""
    folder = tmp_path_factory.mktemp("corpus")
    import inspect

    for module in (json, os, signal, subprocess):
        (folder / f"{module.__name__}.py").write_text(inspect.getsource(module))
    return folder


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _cli(*args: str, **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dsmoe", "train", *args]
    env = dict(os.environ, DSMOE_CACHE=os.environ["DSMOE_CACHE"])
    if kwargs.pop("background", False):
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def _args(corpus: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--data", str(corpus), "--out", str(out), "--steps", str(steps), "--batch-size", "4",
            "--seq-len", "32", "--eval-every", "3", "--save-every", "4", *extra]


def test_mtp_loss_matches_a_direct_computation():
    torch.manual_seed(0)
    model = dsmoe.Transformer(get_preset("tiny-v3").replace(num_hidden_layers=2))
    T = 16
    tokens = torch.randint(0, model.config.vocab_size, (2, T + 2))
    losses = compute_losses(model, tokens, T, BalanceSettings(), mtp_weight=0.3)
    # Directly: main hidden states, then MTP on [enorm(Emb(t_{i+1})) ; hnorm(h_i)], predicting t_{i+2}.
    h = model.hidden_states(tokens[:, :T])
    mtp = model.mtp[0]
    x = mtp.eh_proj(torch.cat((mtp.enorm(model.embed(tokens[:, 1:T + 1])), mtp.hnorm(h)), dim=-1))
    x = mtp.block(x, model.rope(torch.arange(T), x.dtype))
    expected_mtp = F.cross_entropy(model.head(mtp.norm(x)).flatten(0, 1), tokens[:, 2:T + 2].flatten())
    expected_lm = F.cross_entropy(model.head(h).flatten(0, 1), tokens[:, 1:T + 1].flatten())
    torch.testing.assert_close(losses.mtp, expected_mtp)
    torch.testing.assert_close(losses.lm, expected_lm)
    torch.testing.assert_close(losses.total, expected_lm + 0.3 * expected_mtp)


def test_run_saves_hub_layout_that_transformers_loads(corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "run"
    final = train(TrainConfig(preset="tiny-v3", steps=6, save_every=3, data=corpus, out=out, **SMALL))
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    for key in ("loss", "lm_loss", "mtp_loss", "seq_loss", "lr", "tokens_per_s", "expert_load", "max_vio"):
        assert key in records[0], key
    assert any("val_loss" in r for r in records)
    assert (out / "loss.png").stat().st_size > 0 and (out / "expert_load.png").stat().st_size > 0
    assert final["step"] == 6 and (out / "current").resolve().name == "step-000006"
    # The router biases moved (aux-loss-free balancing) and were saved.
    model = dsmoe.load_pretrained(out, dtype=torch.float32)
    assert len(model.mtp) == 1
    assert any(m.gate.bias.abs().sum() > 0 for m in model.moe_layers())
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, model(ids), atol=1e-4, rtol=0)
    assert (out / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> list[float]:
    """lm_loss of every step of a 10-step run that nothing interrupts."""
    out = tmp_path_factory.mktemp("whole") / "run"
    os.environ["DSMOE_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")  # as _private_cache sets it
    try:
        whole = _cli(*_args(corpus, out, 10))
    finally:
        del os.environ["DSMOE_CACHE"]
    assert whole.returncode == 0, whole.stderr
    return [r["lm_loss"] for r in read_metrics(out / "metrics.jsonl")]


def test_resume_after_sigkill_reproduces_uninterrupted_losses(corpus, tmp_path, uninterrupted):
    steps = 10
    out = tmp_path / "killed"
    proc = _cli(*_args(corpus, out, steps), background=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(read_metrics(out / "metrics.jsonl")) < 6:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (out / "current").resolve().name == "step-000004"  # saved at 4, killed after step 6
    resumed = _cli(*_args(corpus, out, steps), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 4" in resumed.stderr
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert [r["lm_loss"] for r in records] == pytest.approx(uninterrupted, rel=1e-6, abs=0)


def test_ctrl_c_at_a_random_step_saves_it_and_resume_alone_reproduces_the_losses(corpus, tmp_path, uninterrupted):
    import random

    out = tmp_path / "run"
    stop_after = random.randint(1, 7)
    proc = _cli(*_args(corpus, out, 10), background=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(read_metrics(out / "metrics.jsonl")) < stop_after:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    _, state = ckpt.load_checkpoint(out)
    step = state["step"]
    assert step >= stop_after and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (f"dsmoe: interrupted; step {step} is saved: continue with dsmoe "
                                                f"train --out {out} --resume")
    resumed = _cli("--out", str(out), "--resume")  # the recorded settings: nothing else to repeat
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {step}" in resumed.stderr
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 11))  # no step lost or repeated
    assert [r["lm_loss"] for r in records] == pytest.approx(uninterrupted, rel=1e-6, abs=0)


def test_crash_during_save_keeps_previous_checkpoint(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    real = ckpt.save_pretrained

    def failing_second_save(model, directory, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            (Path(directory) / "model.safetensors").write_bytes(b"half-written")
            raise OSError("disk full (simulated)")
        return real(model, directory, **kwargs)

    monkeypatch.setattr(ckpt, "save_pretrained", failing_second_save)
    with pytest.raises(OSError, match="disk full"):
        train(TrainConfig(preset="tiny-v1", steps=8, save_every=4, data=corpus, out=out, **SMALL))
    assert (out / "current").resolve().name == "step-000004"
    model = dsmoe.load_pretrained(out)  # the published names still resolve to the complete checkpoint
    _, state = ckpt.load_checkpoint(out)
    assert state["step"] == 4 and model.config.model_type == "deepseek"


def test_non_finite_loss_stops_with_last_checkpoint_intact(corpus, tmp_path):
    result = _cli(*_args(corpus, tmp_path / "run", 40, "--preset", "tiny-mixtral", "--lr", "1e6"))
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("dsmoe: error: loss became") and "Last good checkpoint" in line
    assert "Traceback" not in result.stderr
    current = tmp_path / "run" / "current"
    if current.exists():  # diverged after a save: that checkpoint still loads
        dsmoe.load_pretrained(tmp_path / "run")


@pytest.mark.parametrize("make,message", [
    (lambda p: p.mkdir(), "no .txt, .py, .md files"),
    (lambda p: None, "no such file or folder"),
])
def test_bad_data_is_one_line(tmp_path, make, message):
    data = tmp_path / "data"
    make(data)
    result = _cli("--data", str(data), "--out", str(tmp_path / "run"), "--steps", "2")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("dsmoe: error:"), result.stderr
    assert message in result.stderr



def test_train_refuses_an_ep_its_process_grid_does_not_have(corpus, tmp_path):
    with pytest.raises(ValueError, match="TrainConfig.ep=2 but the process grid has ep_size=1"):
        train(TrainConfig(preset="tiny-v1", steps=1, data=corpus, out=tmp_path / "run", ep=2, **SMALL))
    assert not (tmp_path / "run").exists()  # refused before anything was written

def test_resume_refuses_changed_shape_and_fresh_run_refuses_existing(corpus, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(preset="tiny-v1", steps=4, save_every=4, data=corpus, out=out, **SMALL))
    with pytest.raises(TrainingError, match="already holds a run"):
        train(TrainConfig(preset="tiny-v1", steps=8, data=corpus, out=out, **SMALL))
    with pytest.raises(TrainingError, match="--batch-size"):
        train(TrainConfig(preset="tiny-v1", steps=8, data=corpus, out=out, resume=True, **(SMALL | {"batch_size": 2})))


@pytest.mark.parametrize("steps,warmup", [(800, 50), (25, 20), (10, 0), (3, 1), (10, 20), (2, 0)])
def test_learning_rate_reaches_peak_and_floor(steps, warmup):
    cfg = TrainConfig(steps=steps, warmup=warmup)
    lrs = [learning_rate(cfg, s) for s in range(steps)]
    assert lrs[-1] == pytest.approx(cfg.min_lr_ratio * cfg.lr)
    assert max(lrs) == pytest.approx(cfg.lr)  # the peak is used once, even without warmup or with a long one
    peak = lrs.index(max(lrs))
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))  # rises to the peak
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1:]))  # then decays


def test_norm_gains_are_not_weight_decayed():
    model = dsmoe.Transformer(get_preset("tiny-v3"))
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if p.ndim == 1}
    assert any("norm" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_router_stays_fp32_under_bf16_autocast():
    """bf16 training runs the model under autocast, which would make the router's linear bf16 and flip picks."""
    model = dsmoe.Transformer(get_preset("tiny-v3"))
    moe = model.moe_layers()[0]
    x = torch.randn(64, model.config.hidden_size)
    reference = moe.gate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed = moe.gate(x)
    assert routed.logits.dtype == routed.scores.dtype == routed.weights.dtype == torch.float32
    assert torch.equal(routed.indices, reference.indices)
    torch.testing.assert_close(routed.weights, reference.weights)


def test_damaged_trainer_state_names_the_file_and_the_fallback(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = Path("run")  # relative, as on a command line
    train(TrainConfig(preset="tiny-v1", steps=4, save_every=2, data=corpus, out=out, **SMALL))
    state = out / "current" / ckpt.STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    resume = TrainConfig(preset="tiny-v1", steps=6, save_every=2, data=corpus, out=out, resume=True, **SMALL)
    with pytest.raises(TrainingError, match=r"trainer_state.pt: trainer state unreadable.*ln -sfn step-000002"):
        train(resume)
    state.unlink()
    with pytest.raises(TrainingError, match=r"trainer state missing.*ln -sfn step-000002"):
        train(resume)


@pytest.mark.parametrize("change,message", [
    (dict(seq_len=4096), r"the (training|validation) split of --data .* fewer than one window of \d+ \(--seq-len 4096"),
    (dict(out="FILE"), r"--out .*FILE: .*FILE exists and is not a directory"),
    (dict(preset="tiny-v2", balance={"schemes": ("device",), "devices": 3}), r"--devices 3 must divide"),
    (dict(capacity_factor=1.0, drop_level="device"), r"--drop-level device needs --devices 2 or more"),
    (dict(capacity_factor=1.0, drop_level="device", balance={"devices": 3}), r"--devices 3 must divide the model's 16"),
    # flags are settled before the corpus is read: a missing corpus is not what fails
    (dict(preset="tiny-v2", balance={"schemes": ("aux_free",)}, data=Path("/nonexistent")),
     r"aux_free needs .* tiny-v2 routes with group_limited_greedy"),
])
def test_bad_settings_fail_before_anything_is_written(corpus, tmp_path, change, message):
    (tmp_path / "FILE").write_text("x")
    out = tmp_path / change.pop("out", "run")
    cfg = TrainConfig(**{"preset": "tiny-v1", "steps": 2, "data": corpus, "out": out, **SMALL, **change})
    with pytest.raises((TrainingError, ValueError), match=message):
        train(cfg)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_resume_refuses_a_corpus_with_another_tokenizer(corpus, tmp_path):
    import inspect
    import shutil

    out, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(corpus, data)
    train(TrainConfig(preset="tiny-v1", steps=2, save_every=2, data=data, out=out, **SMALL))
    with pytest.raises(TrainingError, match=r"--resume with --data .*other, but the run was started with .*data"):
        train(TrainConfig(preset="tiny-v1", steps=4, data=tmp_path / "other", out=out, resume=True, **SMALL))
    (data / "text.py").write_text(inspect.getsource(pytest) * 3)  # same path, other text
    with pytest.raises(TrainingError, match="gives another tokenizer"):
        train(TrainConfig(preset="tiny-v1", steps=4, data=data, out=out, resume=True, **SMALL))


def test_checkpoint_from_before_parameter_groups_resumes(corpus, tmp_path):
    """Optimizer state saved with one AdamW group over model.parameters() is re-indexed into today's groups."""
    from dsmoe.train.loop import _upgrade_optimizer_state

    model = dsmoe.Transformer(get_preset("tiny-v3"))
    old = torch.optim.AdamW(model.parameters(), lr=1e-3)
    compute_losses(model, torch.randint(0, 100, (2, 10)), 8, BalanceSettings.paper_defaults(model.config),
                   0.3).total.backward()
    old.step()
    new = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-3)
    new.load_state_dict(_upgrade_optimizer_state(old.state_dict(), model, new))
    for p in model.parameters():
        assert torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"])
    assert [g["weight_decay"] for g in new.param_groups] == [0.1, 0.0]


def test_balance_losses_without_scores_are_a_clear_error():
    model = dsmoe.Transformer(get_preset("tiny-v3")).eval()
    tokens = torch.randint(0, 100, (2, 10))
    settings = BalanceSettings.paper_defaults(model.config)
    with torch.no_grad():
        with pytest.raises(ValueError, match="need the router scores"):
            compute_losses(model, tokens, 8, settings, 0.3)
        model.train()
        assert torch.isfinite(compute_losses(model, tokens, 8, settings, 0.3).total)  # train mode keeps them


def test_v2_paper_defaults_use_the_papers_alpha():
    settings = BalanceSettings.paper_defaults(get_preset("deepseek-v2"))
    assert settings.schemes == ("expert", "device", "comm") and settings.expert_alpha == 0.003

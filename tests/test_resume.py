"""A run that remembers itself: --resume alone, refused and allowed changes, the lr schedule across a changed
--steps, abandoned checkpoints, the console, --help defaults, `dsmoe plot`, a documented command run twice."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsmoe.cli import build_parser
from dsmoe.cli.train import build_config
from dsmoe.train import run_record
from dsmoe.train.errors import TrainingError
from dsmoe.train.loop import TrainConfig, learning_rate, train
from dsmoe.train.metrics import read_metrics

SMALL = dict(batch_size=4, seq_len=32, eval_every=3, eval_batches=1, vocab_size=300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for module in (json, os, signal):
        (folder / f"{module.__name__}.py").write_text(inspect.getsource(module))
    return folder


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [sys.executable, "-m", "dsmoe", *args]
    if kwargs.get("background"):
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _main(capsys, *args: str) -> tuple[int, str]:
    """The command in this process (no interpreter start-up): (exit status, stderr)."""
    from dsmoe.cli import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _recorded_run(tmp_path: Path, corpus: Path, **settings) -> Path:
    """A run directory holding only the record of a run (no training needed to check flags against it)."""
    out = tmp_path / "run"
    run_record.write_record(out, TrainConfig(out=out, data=corpus, steps=8, **{**SMALL, **settings}))
    return out


def _resume(out: Path, *flags: str):
    return build_config(build_parser().parse_args(["train", "--out", str(out), "--resume", *flags]))


@pytest.mark.parametrize("flags,named", [
    (["--preset", "tiny-v1"], "--config tiny-v1"), (["--config", "tiny-v2"], "--config tiny-v2"),
    (["--set", "num_hidden_layers=2"], "--set num_hidden_layers=2"), (["--init", "/elsewhere"], "--init /elsewhere"),
    (["--train-only", "mtp.*"], "--train-only mtp.*"), (["--freeze", "*experts*"], "--freeze *experts*"),
    (["--seed", "1"], "--seed 1"), (["--data", "/other/corpus"], "--data /other/corpus"),
    (["--batch-size", "8"], "--batch-size 8"), (["--seq-len", "64"], "--seq-len 64"),
    (["--vocab-size", "512"], "--vocab-size 512"), (["--lr", "0.001"], "--lr 0.001"), (["--warmup", "5"], "--warmup 5"),
    (["--min-lr-ratio", "0.5"], "--min-lr-ratio 0.5"), (["--weight-decay", "0"], "--weight-decay 0.0"),
    (["--dtype", "bf16"], "--dtype bf16"), (["--mtp-weight", "0.1"], "--mtp-weight 0.1"),
    (["--capacity-factor", "1.0"], "--capacity-factor 1.0"), (["--drop-protect", "0.5"], "--drop-protect 0.5"),
    (["--balance", "expert"], "--balance expert"), (["--expert-alpha", "0.01"], "--expert-alpha 0.01"),
    (["--devices", "2"], "--devices 2"), (["--bias-gamma", "0.01"], "--bias-gamma 0.01"),
])
def test_each_change_to_a_recorded_setting_is_refused_by_name(flags, named, corpus, tmp_path):
    out = _recorded_run(tmp_path, corpus)
    with pytest.raises(TrainingError, match=r"^--resume: " + named.replace("*", r"\*").replace(".", r"\.")
                       + r" would change the run, which was started with"):
        _resume(out, *flags)


def test_unchanged_flags_and_the_mutable_ones_are_accepted(corpus, tmp_path):
    out = _recorded_run(tmp_path, corpus)
    cfg, notes = _resume(out)
    assert (cfg.resume, cfg.data, cfg.batch_size, cfg.vocab_size, cfg.eval_batches) == (True, corpus, 4, 300, 1)
    cfg, notes = _resume(out, "--data", str(corpus), "--batch-size", "4", "--preset", "tiny-v3", "--steps", "12",
                         "--save-every", "5", "--ep", "1")
    assert notes == ["--steps 8 -> 12", "--save-every 200 -> 5"] and (cfg.steps, cfg.save_every) == (12, 5)
    with pytest.raises(TrainingError, match="no checkpoint to resume from"):
        _resume(tmp_path / "nothing")


def test_learning_rate_stays_continuous_when_steps_change():
    old = TrainConfig(steps=100, warmup=10)
    for resumed_at, new_steps in ((50, 200), (50, 60), (5, 100), (99, 150)):
        anchored = TrainConfig(steps=new_steps, warmup=10, lr_anchor=(resumed_at, learning_rate(old, resumed_at)))
        assert learning_rate(anchored, resumed_at) == pytest.approx(learning_rate(old, resumed_at))
        lrs = [learning_rate(anchored, s) for s in range(resumed_at, new_steps)]
        assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(0.1 * old.lr)


def test_resume_from_an_older_checkpoint_with_new_steps(corpus, tmp_path, capsys):
    """ln -sfn an older checkpoint (as the damaged-state message advises), resume with other --steps and
    --save-every: it says so, the lr goes on from where it was, the abandoned newer checkpoint is removed and
    the good ones kept; the progress lines show the LM loss from the first step."""
    out = tmp_path / "run"
    train(TrainConfig(out=out, data=corpus, preset="tiny-v1", steps=8, save_every=4, **SMALL))
    first = read_metrics(out / "metrics.jsonl")
    (out / "current").unlink()
    (out / "current").symlink_to("step-000004")
    code, stderr = _main(capsys, "train", "--out", str(out), "--resume", "--steps", "6", "--save-every", "1")
    assert code == 0, stderr
    lines = stderr.splitlines()
    assert "--resume: --steps 8 -> 6" in lines and "resuming from step 4" in lines
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000005", "step-000006"]  # 8: abandoned
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[4]["lr"] == pytest.approx(first[4]["lr"])  # the old schedule's rate at the resumed step
    assert records[5]["lr"] == pytest.approx(0.1 * TrainConfig().lr)  # its floor at the new last step
    progress = [line for line in lines if line.startswith("step 5/6  loss ")]
    assert progress and f"loss {records[4]['lm_loss']:.4f}" in progress[0]  # the LM loss, not the total
    assert " lr " in progress[0] and "tok/s" in progress[0]
    assert json.loads((out / "run.json").read_text())["steps"] == 6

    # The same command without --resume on the finished run: nothing to do, not an error (Quick start twice).
    code, stderr = _main(capsys, "train", "--out", str(out), "--data", str(corpus), "--preset", "tiny-v1", "--steps",
                         "6")
    assert code == 0 and "already holds this run, finished at step 6" in stderr
    code, stderr = _main(capsys, "train", "--out", str(out), "--data", str(corpus), "--preset", "tiny-v1", "--steps",
                         "9")
    assert code == 2 and "already holds a run: pass --resume" in stderr

    (out / "loss.png").unlink()
    assert _main(capsys, "plot", str(out))[0] == 0 and (out / "loss.png").stat().st_size > 0
    code, stderr = _main(capsys, "plot", str(tmp_path))
    assert code == 2 and stderr.startswith("dsmoe: error:")


def test_every_train_option_shows_its_default():
    parser = build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    for action in train_parser._actions:
        if action.dest in ("help", "resume"):
            continue
        assert "(default" in (action.help or ""), action.option_strings


def test_ctrl_c_during_start_up_is_one_line(corpus, tmp_path):
    proc = _cli("train", "--out", str(tmp_path / "run"), "--data", str(corpus), "--steps", "5", background=True)
    import random

    time.sleep(random.uniform(0.3, 3))  # importing torch, reading, tokenizing or building: each is one line
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:  # on a fast machine the 5 steps can end before the signal: a clean finish then
        assert "Traceback" not in stderr and "done: step 5" in stderr, stderr
        return
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("dsmoe: interrupted")

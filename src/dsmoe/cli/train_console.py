"""The console of `dsmoe train`: a live progress bar on a terminal, plain lines every few seconds otherwise
(a log file, CI, `nohup`), both from the first step.

The loss shown is the language-modelling (next-token) loss, the one the validation loss measures; the MTP
loss and the balancing terms are shown apart, never folded into it.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

PLAIN_EVERY_S = 5.0  # seconds between plain progress lines when stderr is not a terminal
_NOT_BALANCE = ("loss", "lm_loss", "mtp_loss")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def step_summary(record: dict[str, Any], steps: int, eta_s: float | None) -> str:
    """One line: step, LM loss (and validation loss), lr, tokens/s, ETA, then the MTP and balance terms apart
    (the most useful first: a narrow terminal cuts the end)."""
    parts = [f"step {record['step']}/{steps}", f"loss {record['lm_loss']:.4f}"]
    if "val_loss" in record:
        parts.append(f"val {record['val_loss']:.4f}")
    parts.append(f"lr {record['lr']:.2e}")
    parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    if "mtp_loss" in record:
        parts.append(f"mtp {record['mtp_loss']:.4f}")
    balance = {k.removesuffix("_loss"): v for k, v in record.items() if k.endswith("_loss") and k not in _NOT_BALANCE
               and k != "val_loss"}
    if balance:
        parts.append("balance " + " ".join(f"{k} {v:.2e}" for k, v in balance.items()))
    if "dropped" in record:
        parts.append(f"dropped {record['dropped']:.1%}")
    return "  ".join(parts)


class Console:
    """Receives the loop's events (`on_event`) and draws them on stderr; `quiet` for non-main ranks."""

    def __init__(self, cfg: Any, quiet: bool = False, stream: TextIO | None = None,
                 plain_every_s: float = PLAIN_EVERY_S) -> None:
        self.cfg = cfg
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.plain_every_s = plain_every_s
        self.live = (not quiet) and self.stream.isatty()
        self.saved_step: int | None = None
        self.steps = cfg.steps
        self._first: tuple[int, float] | None = None  # (step, time) of the first step this process ran
        self._last_plain = 0.0
        self._started = False
        self._progress = None
        self._task = None
        if self.live:
            from rich.console import Console as RichConsole
            from rich.progress import BarColumn, Progress, TextColumn

            self._progress = Progress(BarColumn(bar_width=12), TextColumn("{task.description}", markup=False),
                                      console=RichConsole(file=self.stream, highlight=False), transient=True)
            self._task = self._progress.add_task("preparing", total=cfg.steps)

    def __enter__(self) -> "Console":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def line(self, text: str) -> None:
        """A permanent line (above the live bar on a terminal)."""
        if self.quiet:
            return
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "status":
            if self._progress is not None:
                self._progress.update(self._task, description=event["message"])
            elif self._started:  # plain output: start-up stages are not worth a line, an error then is alone
                self.line(event["message"])
        elif kind == "warning":
            self.line(f"warning: {event['message']}")
        elif kind == "resumed":
            self.line(f"resuming from step {event['step']}")
        elif kind == "start":
            self._started = True
            self.steps = event["steps"]
            share = event["trainable"] / max(1, event["params"])
            self.line(f"{event['params'] / 1e6:.2f}M parameters, {event['trainable'] / 1e6:.2f}M trainable "
                      f"({share:.1%}); steps {event['step']} -> {event['steps']}")
            if self._progress is not None:
                self._progress.update(self._task, description="training", completed=event["step"],
                                      total=event["steps"])
        elif kind == "step":
            self._step(event)
        elif kind == "saved":
            self.saved_step = event["step"]
        elif kind == "interrupted":
            self.line(f"interrupted: checkpoint saved at step {event['step']}")

    def _step(self, record: dict[str, Any]) -> None:
        now = time.monotonic()
        step = record["step"]
        if self._first is None:
            self._first = (step, now)
        done = step - self._first[0]
        if done > 0:
            eta = (now - self._first[1]) / done * (self.steps - step)
        else:  # the first step: its own duration (evaluation and saving come on top)
            eta = (self.steps - step) * self.cfg.batch_size * self.cfg.seq_len / max(record["tokens_per_s"], 1e-9)
        summary = step_summary(record, self.steps, eta)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, description=summary)
            if "val_loss" in record:
                self.line(summary)
        elif "val_loss" in record or step == self._first[0] or step == self.steps or \
                now - self._last_plain >= self.plain_every_s:
            self._last_plain = now
            self.line(summary)

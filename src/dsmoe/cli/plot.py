"""`dsmoe plot DIR`: redraw a run's loss.png and expert_load.png from its metrics.jsonl."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import CLIError


def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="redraw a training run's plots from its metrics.jsonl",
                       description="Redraw loss.png and expert_load.png in a run directory from metrics.jsonl "
                                   "(e.g. after an interrupted run, or while one is still training).")
    p.add_argument("run_dir", type=Path, metavar="DIR", help="the run directory (dsmoe train --out)")
    p.set_defaults(run=_run_plot)


def _run_plot(args: argparse.Namespace) -> int:
    from ..train.metrics import plot_run

    path = args.run_dir / "metrics.jsonl"
    if not path.is_file():
        raise CLIError(f"{path}: no such file (is {args.run_dir} a dsmoe train --out directory?)")
    written = plot_run(args.run_dir)
    if not written:
        raise CLIError(f"{path}: no complete metrics line to plot")
    print("\n".join(str(p) for p in written))
    return 0

"""The `dsmoe` command. The only package that prints.

Each subcommand lives in its own module as an `_add_<name>(subparsers)` function that declares its
arguments and sets `run`; adding one is a module and one line in `build_parser`. Expected failures (bad
input, missing files, invalid configs) print one line `dsmoe: error: <message>` on stderr and exit with
status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .bench import _add_bench
from .common import PROG, CLIError, _fail, _Parser, load_config
from .eval import _add_eval
from .generate import _add_generate
from .info import _add_info
from .plot import _add_plot
from .serve import _add_serve
from .tokenize import _add_tokenize
from .train import _add_train

__all__ = ["CLIError", "build_parser", "load_config", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="DeepSeek V1/V2/V3/V3.2/V4 and Mixtral MoE models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_info(sub)
    _add_generate(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_plot(sub)
    _add_tokenize(sub)
    _add_bench(sub)
    _add_serve(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        # inside the try: some subcommands import their modules while the parser is built (train's loop)
        args = build_parser().parse_args(argv)
        return args.run(args)
    except (CLIError, ValueError, OSError) as err:
        _fail(str(err))
    except KeyboardInterrupt:
        # one line, no traceback; a training run keeps every checkpoint it completed (resume with --resume)
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130

"""Ctrl-C while the `dsmoe` command is still importing its dependencies (torch takes seconds): one line and
exit status 130, like every other interruption of the command, instead of an import traceback.

Only the command is affected: a library user's `import dsmoe` interrupted by Ctrl-C raises KeyboardInterrupt
as usual. No heavy import here: this must work before torch is loaded.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_INTERRUPTED = 130


def running_as_command() -> bool:
    """True under `python -m dsmoe ...` (torchrun included) or the `dsmoe` console script."""
    argv = getattr(sys, "orig_argv", None) or []
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "-m":
            return i + 1 < len(argv) and argv[i + 1] == "dsmoe"
        if not arg.startswith("-"):  # the script: the console script is named dsmoe
            return os.path.basename(arg) in ("dsmoe", "dsmoe.exe")
    return False


@contextmanager
def command_interrupt_guard() -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        if not running_as_command():
            raise
        print("dsmoe: interrupted", file=sys.stderr, flush=True)
        os._exit(EXIT_INTERRUPTED)  # nothing was started yet: no cleanup to run

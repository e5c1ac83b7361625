"""Ctrl-C while the `dsmoe` command is still importing its dependencies (torch takes seconds): one line and
exit status 130, like every other interruption of the command, instead of an import traceback (or of an
interrupt that an importing library swallowed).

Only the command is affected: a library user's `import dsmoe` interrupted by Ctrl-C raises KeyboardInterrupt
as usual. No heavy import here: this must work before torch is loaded.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_INTERRUPTED = 130
# Subcommands whose work is a tight loop of decode steps: their OpenMP threads should spin between steps.
SPINNING_COMMANDS = ("generate",)


def command_arguments() -> list[str] | None:
    """The arguments after `dsmoe` when this process is `python -m dsmoe ...` (torchrun included) or the `dsmoe`
    console script, else None."""
    argv = getattr(sys, "orig_argv", None) or []
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "-m":
            return argv[i + 2:] if i + 1 < len(argv) and argv[i + 1] == "dsmoe" else None
        if not arg.startswith("-"):  # the script: the console script is named dsmoe
            return argv[i + 1:] if os.path.basename(arg) in ("dsmoe", "dsmoe.exe") else None
    return None


def running_as_command() -> bool:
    """True under `python -m dsmoe ...` (torchrun included) or the `dsmoe` console script."""
    return command_arguments() is not None


@contextmanager
def command_interrupt_guard() -> Iterator[None]:
    """Around the command's imports: a Ctrl-C is only noted while they run (libraries importing each other
    may catch the KeyboardInterrupt and turn it into an ImportError, or swallow it), then the command
    stops with one line and status 130. Anything else than the command: no effect."""
    import signal
    import threading

    if not running_as_command() or threading.current_thread() is not threading.main_thread():
        yield
        return
    hit: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: hit.append(signum))
    try:
        yield
    except KeyboardInterrupt:  # raised before the handler was in place
        hit.append(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    if hit:
        print("dsmoe: interrupted", file=sys.stderr, flush=True)
        os._exit(EXIT_INTERRUPTED)  # nothing was started yet: no cleanup to run


def spin_openmp_threads_for_decoding() -> None:
    """For `dsmoe generate`: OMP_WAIT_POLICY=active unless the user set it, before torch (and its OpenMP
    runtime) is loaded.

    A decode step is ~100 short parallel regions separated by a few microseconds of Python; with OpenMP's
    default policy the worker threads may go to sleep in those gaps and each region then waits for them to
    wake: a bf16 step of the benchmark model took 3.26 ms by default, 2.79 ms with active waiting (6.8 ms
    with passive). llama.cpp's threads spin the same way by default. Only the short-lived generate command
    gets it: a server or a library user's process would keep its idle threads spinning."""
    args = command_arguments()
    if args is None or "OMP_WAIT_POLICY" in os.environ:
        return
    subcommand = next((arg for arg in args if not arg.startswith("-")), None)  # the first word after dsmoe
    if subcommand in SPINNING_COMMANDS:
        os.environ["OMP_WAIT_POLICY"] = "active"

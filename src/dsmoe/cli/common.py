"""Shared pieces of the `dsmoe` command: the one-line error convention and argument parsers."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import NoReturn

from ..calc import format_count
from ..config import ModelConfig
from ..presets import PRESETS, get_preset

PROG = "dsmoe"
EXIT_USAGE = 2


class CLIError(Exception):
    """An expected failure: reported as one line, no traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see '{self.prog} --help')")


def _fail(message: str) -> NoReturn:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


# ---------------------------------------------------------------------------------------------- helpers

def load_config(spec: str) -> ModelConfig:
    """A preset name, or a checkpoint directory / config.json path (read with ModelConfig.from_hf)."""
    if spec in PRESETS:
        return get_preset(spec)
    path = Path(spec)
    if not path.exists():
        raise CLIError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing directory")
    try:
        return ModelConfig.from_hf(path)
    except (ValueError, OSError) as err:
        raise CLIError(str(err)) from None
    except (TypeError, AttributeError, KeyError) as err:
        # A config.json of the wrong shape (a list, a string where an object belongs, ...).
        raise CLIError(f"{spec}: not a usable config.json ({type(err).__name__}: {err})") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _float_where(ok, wanted: str):
    """An argparse type: a float for which ok(value) holds, else an error saying what was `wanted`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {value}")
        return value
    return parse


_non_negative_float = _float_where(lambda v: v >= 0, "a finite number >= 0")
_positive_float = _float_where(lambda v: v > 0, "a finite number > 0")
_fraction = _float_where(lambda v: 0 <= v <= 1, "a fraction in [0, 1]")


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _count(n: int) -> str:
    return f"{format_count(n)}  ({n:,})"


# ---------------------------------------------------------------------------------------------- devices

def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """--device cpu|cuda|cuda:N|auto (default auto: cuda if available, else cpu); read it with resolve_device."""
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help="cpu, cuda, cuda:N or auto (default: auto = cuda if available, else cpu)")


def resolve_device(text: str, local_rank: int | None = None):
    """--device's text -> torch.device; CLIError (one line) for an unknown device or CUDA without CUDA.

    local_rank: under torchrun, a bare `cuda` (or `auto` picking CUDA) becomes cuda:LOCAL_RANK, one GPU per
    local rank; an explicit cuda:N is kept as given."""
    from ..device import resolve_device as _resolve

    try:
        return _resolve(text, allow_meta=False, local_rank=local_rank or 0)
    except ValueError as err:
        raise CLIError(f"--device: {err}") from None

"""Value kinds of ModelConfig fields and the one type check of a config.json value.

Each ModelConfig field declares its kind (`POSITIVE_INT`, `optional(NUMBER)`, a nested `Schema` ...) in its
field definition; `check(path, value, kind)` is the single place that compares a value with its kind and
raises `ValueError("ModelConfig.<path>: must be <kind>, got <value>")`. JSON has no separate integer type,
but a float such as `4.0` where a count belongs is refused like a string: it is the mark of a hand-edited
or tool-converted file whose other values may be wrong too, and `range(4.0)` would fail later anyway.

`close_key` finds the known key a misspelled one most likely meant (for the unknown-key warning).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true would otherwise count as 1


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Kind:
    """What a value must be: `desc` completes "must be ...", `ok` decides."""

    desc: str
    ok: Callable[[Any], bool]


@dataclass(frozen=True)
class Schema(Kind):
    """A JSON object with typed keys (rope_scaling, quantization_config). Keys not listed are kept unchecked;
    `aliases` maps an old spelling to the listed key (the Hub's rope_scaling `type` for `rope_type`)."""

    keys: dict[str, Kind] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)


POSITIVE_INT = Kind("a positive integer", lambda v: _is_int(v) and v > 0)
NON_NEGATIVE_INT = Kind("an integer >= 0", lambda v: _is_int(v) and v >= 0)
NUMBER = Kind("a number", _is_number)
POSITIVE_NUMBER = Kind("a number > 0", lambda v: _is_number(v) and v > 0)
NON_NEGATIVE_NUMBER = Kind("a number >= 0", lambda v: _is_number(v) and v >= 0)
BOOL = Kind("true or false", lambda v: isinstance(v, bool))  # "false" from a hand-edited file is truthy
STRING = Kind("a string", lambda v: isinstance(v, str))
TOKEN_IDS = Kind("a token id (integer >= 0) or a list of them",
                 lambda v: (_is_int(v) and v >= 0) or (isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v)))
BLOCK_SIZE = Kind("a list of two positive integers", lambda v: isinstance(v, list) and len(v) == 2
                  and all(_is_int(i) and i > 0 for i in v))


def one_of(*choices: str) -> Kind:
    return Kind(f"one of {', '.join(choices)}", lambda v: isinstance(v, str) and v in choices)


def optional(kind: Kind) -> Kind:
    if isinstance(kind, Schema):
        return Schema(f"{kind.desc} or null", lambda v: v is None or kind.ok(v), kind.keys, kind.aliases)
    return Kind(f"{kind.desc} or null", lambda v: v is None or kind.ok(v))


def schema(desc: str, keys: dict[str, Kind], aliases: dict[str, str] | None = None) -> Schema:
    return Schema(desc, lambda v: isinstance(v, dict), keys, aliases or {})


def check(path: str, value: Any, kind: Kind) -> None:
    """Raise ValueError naming `path` (e.g. "n_group", "rope_scaling.factor") unless value is of `kind`;
    a Schema's listed keys are checked in turn, each under its own dotted path."""
    if not kind.ok(value):
        raise ValueError(f"ModelConfig.{path}: must be {kind.desc}, got {value!r}")
    if isinstance(kind, Schema) and value is not None:
        for key, sub in value.items():
            name = kind.aliases.get(key, key)
            if name in kind.keys:
                check(f"{path}.{key}", sub, kind.keys[name])


def close_key(key: str, known: Iterable[str]) -> str | None:
    """The known key `key` most likely misspells (difflib ratio >= 0.84: `num_hiden_layers`,
    `rms_norm_epsilon`), or None. Short keys need a closer match, so `n_group` never stands for `topk_group`."""
    match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.84)
    return match[0] if match else None

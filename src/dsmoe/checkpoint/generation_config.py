"""generation_config.json: the token ids and sampling defaults a Hugging Face checkpoint ships with.

The Hub keeps EOS/BOS/PAD ids and default sampling settings beside config.json in generation_config.json
(transformers' `GenerationConfig`). config.json's own `eos_token_id` is often null or stale in fine-tunes,
so generation and serving read the ids from here first.

Only the fields dsmoe acts on are typed; every other key is kept verbatim in `extra` so that a load then
save writes back what the source had.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import atomic_write_text

FILE_NAME = "generation_config.json"

_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_SAMPLING_FIELDS = ("do_sample", "temperature", "top_p", "top_k", "max_new_tokens")


@dataclass
class GenerationConfig:
    """Token ids and sampling defaults (transformers' `GenerationConfig` fields of the same names).

    eos_token_id is normalised to a list (the Hub writes an int or a list). temperature/top_p/top_k apply
    only when do_sample is true, as in transformers; `sampling_defaults()` resolves that.
    """

    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # The typed keys as the file spelled them (set by from_dict), so that to_dict writes back `"eos_token_id":
    # [2]` as a list and `"pad_token_id": null` as null while those fields are unchanged.
    _read: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, int) and not isinstance(self.eos_token_id, bool):
            self.eos_token_id = [self.eos_token_id]
        elif self.eos_token_id is None:
            self.eos_token_id = []
        self.validate()

    def validate(self) -> None:
        """ValueError naming the field (as it is spelled in generation_config.json) for a wrongly typed value."""
        def token_id(name: str, value: Any) -> None:
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{FILE_NAME}: {name} must be a non-negative integer token id, got {value!r}")

        for name in ("bos_token_id", "pad_token_id"):
            token_id(name, getattr(self, name))
        if not isinstance(self.eos_token_id, list):
            raise ValueError(f"{FILE_NAME}: eos_token_id must be a token id or a list of them, "
                             f"got {self.eos_token_id!r}")
        for value in self.eos_token_id:
            token_id("eos_token_id", value)
        if self.do_sample is not None and not isinstance(self.do_sample, bool):
            raise ValueError(f"{FILE_NAME}: do_sample must be true or false, got {self.do_sample!r}")
        for name, lo in (("temperature", 0.0), ("top_p", 0.0)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < lo):
                raise ValueError(f"{FILE_NAME}: {name} must be a finite number >= {lo}, got {value!r}")
        if self.top_p is not None and self.top_p > 1:
            raise ValueError(f"{FILE_NAME}: top_p must be in (0, 1], got {self.top_p!r}")
        for name in ("top_k", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{FILE_NAME}: {name} must be a non-negative integer, got {value!r}")

    def sampling_defaults(self) -> dict[str, Any]:
        """temperature / top_p / top_k to use when a request names none: greedy (temperature 0) unless the
        file says do_sample: true, as transformers' generate() reads it. top_k 0 means no top-k limit."""
        if not self.do_sample:
            return {"temperature": 0.0, "top_p": None, "top_k": None}
        return {"temperature": 1.0 if self.temperature is None else float(self.temperature),
                "top_p": None if self.top_p in (None, 1.0) else float(self.top_p),
                "top_k": None if not self.top_k else int(self.top_k)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "GenerationConfig":
        if not isinstance(raw, dict):
            raise ValueError(f"{FILE_NAME} must hold a JSON object, got {type(raw).__name__}")
        known = {k: raw[k] for k in (*_ID_FIELDS, *_SAMPLING_FIELDS) if k in raw}
        extra = {k: v for k, v in raw.items() if k not in known}
        config = cls(**known, extra=extra)
        config._read = {k: (v, getattr(config, k)) for k, v in known.items()}
        return config

    def to_dict(self) -> dict[str, Any]:
        """The JSON object for generation_config.json: the typed fields that are set (as the file read by
        from_dict spelled them, while unchanged), then `extra` verbatim."""
        out: dict[str, Any] = {}
        for name in (*_ID_FIELDS, *_SAMPLING_FIELDS):
            value = getattr(self, name)
            if name in self._read and self._read[name][1] == value:
                out[name] = self._read[name][0]
            elif name == "eos_token_id":
                if value:
                    out[name] = value[0] if len(value) == 1 else list(value)
            elif value is not None:
                out[name] = value
        out.update(self.extra)
        return out


def generation_config_from_model_config(bos_token_id: Any, eos_token_id: Any,
                                        pad_token_id: Any) -> GenerationConfig | None:
    """A generation config carrying config.json's token ids, as transformers derives one for a checkpoint that
    ships none; None when all three are null (nothing worth writing)."""
    if bos_token_id is None and not eos_token_id and pad_token_id is None:
        return None
    return GenerationConfig(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


def read_generation_config(directory: str | Path) -> GenerationConfig | None:
    """directory/generation_config.json parsed, or None when the file is absent.

    Raises ValueError naming the file for invalid JSON or a wrongly typed field.
    """
    path = Path(directory) / FILE_NAME
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    try:
        return GenerationConfig.from_dict(raw)
    except ValueError as err:
        raise ValueError(f"{path.parent}/{err}") from None


def write_generation_config(directory: str | Path, config: GenerationConfig) -> None:
    """Write directory/generation_config.json atomically (mode 0666 less the umask, like the other checkpoint
    files)."""
    atomic_write_text(Path(directory) / FILE_NAME, json.dumps(config.to_dict(), indent=2) + "\n")

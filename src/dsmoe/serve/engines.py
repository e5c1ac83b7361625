"""Which EngineLoop `dsmoe serve` runs: the continuous-batching engine where it is available, else the
serial fallback (one request at a time through dsmoe.generate; same wire behaviour, no batching)."""

from __future__ import annotations

from ..model import Transformer
from .protocol import EngineLoop
from .serial import SerialEngine


def make_engine(model: Transformer, cache_bytes: int | None = None, max_running: int = 64,
                max_waiting: int = 256) -> tuple[EngineLoop, str]:
    """(engine, a short description for the startup line). cache_bytes / max_running size the paged
    engine; the serial fallback runs one request at a time and ignores them."""
    return SerialEngine(model, max_waiting=max_waiting), "serial engine: one request at a time"

"""Which EngineLoop `dsmoe serve` runs: the continuous-batching engine over a paged cache (serve/loop.py)
for every model its runner can reproduce exactly, else the serial fallback (one request at a time through
dsmoe.generate: the same wire behaviour, no batching) for the rest (e.g. sliding-window or sparse attention)."""

from __future__ import annotations

from ..model import Transformer
from .loop import ThreadedEngine
from .protocol import EngineLoop
from .runner import check_servable
from .serial import SerialEngine


def make_engine(model: Transformer, cache_bytes: int | None = None, max_running: int = 64,
                max_waiting: int = 256, speculative: bool = False) -> tuple[EngineLoop, str]:
    """(engine, a short description for the startup line).

    cache_bytes: the paged cache pool's size (None: the engine's default, 1 GiB). max_running: sequences
    per step at most; max_waiting: queued requests at most (then HTTP 429). speculative: accept greedy
    requests drafted by the model's MTP module. Raises ValueError for sizes the engine cannot use (e.g. a pool
    smaller than one block) or speculative decoding on a model without an MTP module.
    """
    if speculative and not model.mtp:
        raise ValueError("speculative decoding needs a model with an MTP module (num_nextn_predict_layers > 0 and "
                         "its weights in the checkpoint)")
    try:
        check_servable(model)
    except ValueError as why:
        return SerialEngine(model, max_waiting=max_waiting), f"serial engine, one request at a time ({why})"
    engine = ThreadedEngine.from_model(model, cache_memory=cache_bytes, max_running=max_running,
                                       max_waiting=max_waiting, max_tokens_per_step=max(512, max_running),
                                       speculative=speculative)
    pool = engine.engine.pool
    return engine, (f"continuous batching, paged {pool.layout} cache: {pool.num_blocks} blocks of "
                    f"{pool.block_size} tokens" + ("; MTP speculative decoding for greedy requests" if speculative
                                                   else ""))

"""ThreadedEngine: the EngineLoop of protocol.py, an Engine stepping on one background thread.

submit/abort/stats/shutdown may be called from any thread. New requests and aborts are handed to the engine
thread through an inbox guarded by a condition variable; the thread applies them between steps (aborts
free their blocks before the next step), steps while work exists and sleeps on the condition otherwise.
Events (on_event callbacks) run on the engine thread.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from ..model import Transformer
from .blocks import CachePool
from .engine import Engine, EventCallback
from .protocol import EngineOverloaded, EngineStats, RequestOutput, RequestRejected, SamplingParams


class ThreadedEngine:
    """An Engine run by a background thread (implements protocol.EngineLoop)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.max_context = engine.max_context
        self._cond = threading.Condition()
        self._inbox: list[tuple[str, list[int], SamplingParams, EventCallback]] = []
        self._aborts: list[str] = []
        self._active: set[str] = set()  # ids submitted and not yet finished
        self._stats = engine.stats()
        self._stopping = False
        self._drain = True
        self._thread = threading.Thread(target=self._loop, name="dsmoe-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_model(cls, model: Transformer, cache_memory: str | int | None = None, cache_tokens: int | None = None,
                   block_size: int = 16, max_running: int = 64, max_waiting: int = 256,
                   max_tokens_per_step: int = 512, prefix_caching: bool = True,
                   layout: str | None = None, speculative: bool = False) -> "ThreadedEngine":
        """An engine over `model` (eval mode, on its device and dtype) with a cache pool of cache_memory
        (bytes or text such as "2GiB") or cache_tokens positions (default: "1GiB").
        layout: None (the model's own: latent for MLA, kv for GQA) or "decompressed" (MLA with an
        MHA-sized cache, for comparisons). speculative: accept SamplingParams(speculative=True) requests, drafted
        by the model's first MTP module (its keys take one more layer in the pool). Raises ValueError for bad
        sizes or a model it cannot serve."""
        if cache_memory is not None and cache_tokens is not None:
            raise ValueError("give cache_memory or cache_tokens, not both")
        model.eval()
        param = model.embed.weight
        kw = dict(block_size=block_size, dtype=param.dtype, device=param.device, layout=layout,
                  extra_layers=1 if speculative else 0)
        if cache_tokens is not None:
            pool = CachePool.from_tokens(model.config, cache_tokens, **kw)
        else:
            pool = CachePool.from_memory(model.config, cache_memory if cache_memory is not None else "1GiB", **kw)
        return cls(Engine(model, pool, max_running, max_waiting, max_tokens_per_step, prefix_caching, speculative))

    @classmethod
    def from_directory(cls, directory: str | Path, dtype: torch.dtype | None = None,
                       device: torch.device | str = "cpu", **kwargs) -> "ThreadedEngine":
        """Load a checkpoint directory (dsmoe.load_pretrained) and serve it; kwargs as from_model."""
        from ..checkpoint import load_pretrained

        return cls.from_model(load_pretrained(directory, dtype, device=device), **kwargs)

    # --------------------------------------------------------------------------------- EngineLoop API
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               on_event: EventCallback) -> None:
        """Queue a request; RequestRejected / EngineOverloaded raised here, on the caller's thread."""
        self.engine.validate(request_id, prompt_ids, params)
        with self._cond:
            if self._stopping:
                raise EngineOverloaded("the engine is shutting down", retry_after=5.0)
            if request_id in self._active:
                raise RequestRejected("request_id", f"request {request_id!r} is already in the engine")
            if len(self._inbox) + self._stats.waiting >= self.engine.max_waiting:
                raise EngineOverloaded(f"the waiting queue is full ({self.engine.max_waiting} requests)")
            self._active.add(request_id)
            self._inbox.append((request_id, list(prompt_ids), params, self._wrap(request_id, on_event)))
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        with self._cond:
            if request_id in self._active:
                self._aborts.append(request_id)
                self._cond.notify()

    def stats(self) -> EngineStats:
        with self._cond:
            return self._stats

    def shutdown(self, drain: bool = True) -> None:
        """Stop admitting; with drain finish everything queued first, otherwise abort it; join the thread."""
        with self._cond:
            self._stopping, self._drain = True, drain
            self._cond.notify()
        self._thread.join()

    # ------------------------------------------------------------------------------------------ thread
    def _wrap(self, request_id: str, on_event: EventCallback) -> EventCallback:
        def deliver(out: RequestOutput) -> None:
            if out.finished:
                with self._cond:
                    self._active.discard(request_id)
            on_event(out)
        return deliver

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not (self._inbox or self._aborts or self._stopping or engine.has_work()):
                    self._cond.wait()
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                stop_now = self._stopping and not self._drain
                done = self._stopping and not inbox and not engine.has_work()
            for request_id, prompt, params, on_event in inbox:
                try:
                    engine.add(request_id, prompt, params, on_event)
                except (RequestRejected, EngineOverloaded) as e:  # raced past submit's checks
                    engine._emit_safely(on_event, RequestOutput(request_id, finished=True, finish_reason="error",
                                                                error=str(e), prompt_tokens=len(prompt)))
            if stop_now:
                aborts += list(engine.requests)
            for request_id in aborts:
                engine.abort(request_id)
            if done or stop_now:
                self._publish()
                return
            try:
                if not engine.step() and engine.has_work():  # nothing could run (cannot last): do not spin
                    with self._cond:
                        self._cond.wait(0.01)
            except Exception as e:  # a scheduler bug must not kill the thread: fail what is in flight
                for request_id in list(engine.requests):
                    seq = engine.requests[request_id]
                    engine._finish(seq, "error", error=f"engine failure: {type(e).__name__}: {e}")
            self._publish()

    def _publish(self) -> None:
        stats = self.engine.stats()
        with self._cond:
            self._stats = stats

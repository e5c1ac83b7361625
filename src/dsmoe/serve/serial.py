"""A serial EngineLoop: `dsmoe.generate.stream` on one request at a time, FIFO, on a background thread.

The fallback behind `protocol.EngineLoop` until the continuous-batching engine is used: the same wire
behaviour (events, aborts, overload, per-request failures), none of the batching. Each request runs alone,
so its tokens are exactly `dsmoe.generate` on that prompt.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from ..generate import stream
from ..model import Transformer
from .protocol import EngineOverloaded, EngineStats, RequestOutput, RequestRejected, SamplingParams

Callback = Callable[[RequestOutput], None]


class SerialEngine:
    """EngineLoop over one model, one request at a time.

    max_waiting: queued requests beyond the running one; more is EngineOverloaded (HTTP 429).
    max_context: prompt + max_tokens must fit (the model's max_position_embeddings).
    """

    def __init__(self, model: Transformer, max_waiting: int = 64) -> None:
        self.model = model
        self.max_context = model.config.max_position_embeddings
        self.max_waiting = max_waiting
        self._queue: collections.deque = collections.deque()
        self._aborted: set[str] = set()
        self._running: str | None = None
        self._stats = EngineStats()
        self._cond = threading.Condition()
        self._admitting = True
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="dsmoe-serial-engine", daemon=True)
        self._thread.start()

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, on_event: Callback) -> None:
        if not prompt_ids:
            raise RequestRejected("prompt", "the prompt is empty")
        vocab = self.model.config.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestRejected("prompt", f"token id {bad} is outside the vocabulary (size {vocab})")
        if len(prompt_ids) + params.max_tokens > self.max_context:
            raise RequestRejected("max_tokens", f"prompt ({len(prompt_ids)} tokens) + max_tokens "
                                                f"({params.max_tokens}) exceed the context of {self.max_context}")
        if params.speculative and params.temperature != 0:
            raise RequestRejected("temperature", "speculative decoding is greedy only")
        with self._cond:
            if not self._admitting:
                raise EngineOverloaded("the engine is shutting down", retry_after=5.0)
            if len(self._queue) >= self.max_waiting:
                raise EngineOverloaded(f"the waiting queue is full ({self.max_waiting} requests)", retry_after=1.0)
            self._queue.append((request_id, list(prompt_ids), params, on_event))
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        with self._cond:
            for item in self._queue:
                if item[0] == request_id:
                    self._queue.remove(item)
                    item[3](RequestOutput(request_id, finished=True, finish_reason="abort"))
                    return
            if self._running == request_id:
                self._aborted.add(request_id)

    def stats(self) -> EngineStats:
        with self._cond:
            self._stats.running = int(self._running is not None)
            self._stats.waiting = len(self._queue)
            return EngineStats(**vars(self._stats))

    def shutdown(self, drain: bool = True) -> None:
        with self._cond:
            self._admitting = False
            if not drain:
                while self._queue:
                    item = self._queue.popleft()
                    item[3](RequestOutput(item[0], finished=True, finish_reason="abort"))
                if self._running is not None:
                    self._aborted.add(self._running)
            self._stop = True
            self._cond.notify()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if not self._queue:
                    return
                request_id, prompt, params, on_event = self._queue.popleft()
                self._running = request_id
                self._stats.prompt_tokens += len(prompt)
            try:
                self._run(request_id, prompt, params, on_event)
            except Exception as err:  # this request fails alone; the loop goes on
                on_event(RequestOutput(request_id, finished=True, finish_reason="error",
                                       error=f"{type(err).__name__}: {err}", prompt_tokens=len(prompt)))
            finally:
                with self._cond:
                    self._running = None
                    self._aborted.discard(request_id)

    def _run(self, request_id: str, prompt: list[int], params: SamplingParams, on_event: Callback) -> None:
        eos = set() if params.ignore_eos else set(params.eos_token_ids)
        produced = 0
        steps = stream(self.model, [prompt], params.max_tokens, params.temperature, params.top_k, params.top_p,
                       None if params.ignore_eos or not eos else list(eos), params.seed, params.speculative)
        for tokens in steps:
            if request_id in self._aborted:
                on_event(RequestOutput(request_id, finished=True, finish_reason="abort", prompt_tokens=len(prompt)))
                return
            ids = tokens[0].tolist()
            produced += len(ids)
            with self._cond:
                self._stats.generated_tokens += len(ids)
            hit_eos = bool(eos) and ids[-1] in eos
            done = hit_eos or produced >= params.max_tokens
            on_event(RequestOutput(request_id, ids, finished=done,
                                   finish_reason=("stop" if hit_eos else "length") if done else None,
                                   prompt_tokens=len(prompt)))
            if done:
                return
        # stream() ended without either (cannot happen for max_tokens >= 1); close the request anyway
        on_event(RequestOutput(request_id, finished=True, finish_reason="length", prompt_tokens=len(prompt)))


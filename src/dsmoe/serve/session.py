"""One engine request seen from asyncio: engine events (token ids, on the engine thread) become text events
on the HTTP layer's event loop.

The engine calls `on_event` on its own thread; the event is handed to the asyncio loop with
`call_soon_threadsafe` and turned into text there (detokenisation, stop strings), so all request state is
touched by one thread only. A stop string ends the request here and aborts it in the engine, which frees
its cache blocks before the next step; tokens the engine decided after that are ignored.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

from .metrics import ServerMetrics
from .protocol import EngineLoop, RequestOutput, SamplingParams
from .text import TextStream


@dataclass
class TextEvent:
    """New text for choice `index`; finish_reason ("stop" / "length") on its last event; error: the engine
    failed this request (its message)."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None


class Generation:
    """Choice `index` of an HTTP request: one engine request, its text so far, its token counts."""

    def __init__(self, engine: EngineLoop, index: int, prompt_ids: Sequence[int], params: SamplingParams,
                 tokenizer: Tokenizer, stop: Sequence[str], queue: asyncio.Queue, metrics: ServerMetrics,
                 arrived: float, counts_prompt: bool = True) -> None:
        self.engine = engine
        self.index = index
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.request_id = f"req-{uuid.uuid4().hex}"
        self.text = TextStream(tokenizer, stop, () if params.ignore_eos else params.eos_token_ids)
        self.queue = queue
        self.metrics = metrics
        self.arrived = arrived
        self.counts_prompt = counts_prompt  # usage counts a prompt once, whatever its number of choices
        self.last_token_at: float | None = None
        self.completion_tokens = 0
        self.cached_prompt_tokens = 0
        self.finished = False
        self.finish_reason: str | None = None
        self._loop = asyncio.get_running_loop()

    def submit(self) -> None:
        """Queue it in the engine; RequestRejected / EngineOverloaded propagate at once."""
        self.engine.submit(self.request_id, self.prompt_ids, self.params, self._on_event)

    def abort(self) -> None:
        """The client is gone (or a sibling choice failed): stop it in the engine, free its blocks."""
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)

    def _on_event(self, out: RequestOutput) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._handle, out)
        except RuntimeError:  # the event loop has closed (server gone): nothing is listening any more
            pass

    def _handle(self, out: RequestOutput) -> None:  # event-loop thread
        if self.finished:
            return
        now = time.perf_counter()
        if out.token_ids:
            if self.last_token_at is None:
                self.metrics.ttft.observe(now - self.arrived)
                # a multi-token event (speculative decoding) counts as that many tokens sharing the interval
                if len(out.token_ids) > 1:
                    self.metrics.tpot.observe(0.0, len(out.token_ids) - 1)
            else:
                self.metrics.tpot.observe((now - self.last_token_at) / len(out.token_ids), len(out.token_ids))
            self.last_token_at = now
            self.completion_tokens += len(out.token_ids)
        self.cached_prompt_tokens = max(self.cached_prompt_tokens, out.cached_prompt_tokens)
        if out.finish_reason == "error" or out.error is not None or out.finish_reason == "abort":
            self.finished = True
            message = out.error or "the engine aborted this request"
            self.metrics.request_finished("error")
            self.queue.put_nowait(TextEvent(self.index, error=message))
            return
        text = self.text.push(out.token_ids, final=out.finished)
        if self.text.stopped:
            self.finished, self.finish_reason = True, "stop"
            if not out.finished:
                self.engine.abort(self.request_id)
        elif out.finished:
            self.finished, self.finish_reason = True, out.finish_reason or "stop"
        if self.finished:
            self.metrics.request_finished(self.finish_reason)
        if text or self.finished:
            self.queue.put_nowait(TextEvent(self.index, text, self.finish_reason))

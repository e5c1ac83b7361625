"""The contract between the HTTP layer and the engine: requests in token ids, events out.

The engine works in token ids only. Text concerns (tokenising, chat templates, stop strings, holding back
an incomplete UTF-8 character) belong to the HTTP layer, which ends a request early with `abort` when a
stop string completes.

Threading: `EngineLoop` runs the engine's steps on one background thread. `submit` and `abort` may be
called from any thread; `on_event` callbacks run on the engine thread and must not block (the HTTP layer
hands each event to its asyncio loop with `loop.call_soon_threadsafe`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings (OpenAI names where they exist).

    max_tokens: new tokens at most (>= 1). temperature 0 = greedy. top_k None/0 and top_p None/1.0 = off.
    seed: the request's own generator, so a seeded sample does not depend on what else runs concurrently.
    eos_token_ids: generation stops after emitting one of these (finish_reason "stop"), unless ignore_eos.
    speculative: greedy decoding with the model's MTP module drafting (same tokens as plain greedy).
    """

    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    speculative: bool = False


@dataclass
class RequestOutput:
    """What the engine reports for one request after a step.

    token_ids: the tokens decided in this step (1, or more with speculative decoding; empty for a final
    event without new tokens, e.g. after abort or error). An EOS token that ends the request is included.
    finished / finish_reason: "stop" (EOS), "length" (max_tokens), "abort" (abort() called), "error"
    (this request failed; `error` holds the message; other requests are unaffected).
    prompt_tokens: the prompt's length; cached_prompt_tokens: how many of them were prefix-cache hits.
    """

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0


class EngineOverloaded(Exception):
    """The waiting queue is full (HTTP 429). retry_after: a suggested wait in seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestRejected(ValueError):
    """A request the engine can never serve (HTTP 400): `field` names the culprit (e.g. "prompt",
    "max_tokens"), the message says why (e.g. prompt + max_tokens beyond the context)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


@dataclass
class EngineStats:
    """Gauges and counters for /metrics, read between steps."""

    running: int = 0
    waiting: int = 0
    blocks_used: int = 0
    blocks_free: int = 0
    block_size: int = 0
    prefix_cache_hit_tokens: int = 0
    prefix_cache_queried_tokens: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    preemptions: int = 0
    speculative_drafted: int = 0  # MTP drafts verified (speculative requests)
    speculative_accepted: int = 0  # of which the main model agreed (acceptance = accepted / drafted)


class EngineLoop(Protocol):
    """A running engine, as the HTTP layer sees it."""

    max_context: int  # prompt + max_tokens must fit in this many positions

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               on_event: Callable[[RequestOutput], None]) -> None:
        """Queue a request. Raises RequestRejected (never servable) or EngineOverloaded (queue full) at once,
        on the caller's thread; otherwise every later outcome arrives through on_event, the last one with
        finished=True."""

    def abort(self, request_id: str) -> None:
        """Stop a request (client gone, stop string hit): its blocks are freed before the next step. A final
        event with finish_reason "abort" follows unless it had already finished. Unknown ids are ignored."""

    def stats(self) -> EngineStats: ...

    def shutdown(self, drain: bool = True) -> None:
        """Stop admitting; with drain, finish what is running and waiting first; then stop the thread."""

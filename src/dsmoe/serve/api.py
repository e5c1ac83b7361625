"""The OpenAI-compatible HTTP API on FastAPI: /v1/models, /v1/completions, /v1/chat/completions (JSON or
server-sent events), /health and /metrics.

This layer owns all text work (tokenising prompts, chat templates, stop strings, UTF-8 hold-back) and
talks to the engine in token ids through `protocol.EngineLoop`. Wire format: OpenAI's API reference for
completions and chat completions; streams are `data: {json}` lines ending with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from tokenizers import Tokenizer

from .chat import ChatTemplate, ChatTemplateError
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import EngineLoop, EngineOverloaded, RequestRejected, SamplingParams
from .session import Generation, TextEvent
from .wire import APIError, ParsedRequest, bad, parse_chat, parse_completion

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to what fits


def create_app(engine: EngineLoop, tokenizer: Tokenizer, model_name: str, *, chat_template: ChatTemplate | None = None,
               eos_token_ids: Sequence[int] = (), sampling_defaults: Mapping[str, Any] | None = None,
               default_max_tokens: int | None = None, vocab_size: int | None = None,
               api_key: str | None = None, speculative: bool = False) -> FastAPI:
    """The ASGI app serving `engine` under the model id `model_name`.

    eos_token_ids: where generation stops (generation_config.json's, else config.json's, else the
    tokenizer's <|endoftext|>). sampling_defaults: temperature / top_p / top_k when a request names none
    (GenerationConfig.sampling_defaults(); None: OpenAI's temperature 1). default_max_tokens: the
    checkpoint's max_new_tokens, else 16 for completions and what fits the context for chat.
    vocab_size: token-id prompts must be below it. api_key: required as `Authorization: Bearer KEY` on /v1/*.
    speculative: the engine drafts with the model's MTP module; greedy requests use it (the same tokens as
    plain greedy decoding, fewer steps), sampled ones decode plainly.
    app.state.draining = True makes new /v1 requests answer 503 (SIGTERM: stop admitting).
    """
    app = FastAPI(title="dsmoe", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics()
    defaults = dict(sampling_defaults) if sampling_defaults is not None else {"temperature": 1.0}
    app.state.draining = False
    app.state.metrics = metrics
    eos = tuple(eos_token_ids)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        metrics.error_answered(err.status)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return await _api_error(request, APIError(err.status_code, str(err.detail),
                                                  code="not_found" if err.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        # never a traceback on the wire: the message, as a server error
        return await _api_error(request, APIError(500, f"{type(err).__name__}: {err}", type="server_error"))

    def guard(request: Request) -> None:
        if api_key is not None:
            header = request.headers.get("authorization", "")
            if not secrets.compare_digest(header.encode(), f"Bearer {api_key}".encode()):  # constant time
                raise APIError(401, "a missing or wrong API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key", type="authentication_error")
        if app.state.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")

    async def read_json(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from None

    def check_model(req: ParsedRequest) -> None:
        if req.model != model_name:
            raise bad("model", f"the model {req.model!r} does not exist: this server serves {model_name!r}",
                      code="model_not_found")

    def params_for(req: ParsedRequest, prompt_len: int, prompt_field: str, default_max: int | None) -> SamplingParams:
        context = engine.max_context
        if prompt_len >= context:
            raise bad(prompt_field, f"the prompt is {prompt_len} tokens; the context holds {context} (prompt + "
                                    "max_tokens), leaving no room for a new token", code="context_length_exceeded")
        room = context - prompt_len
        if req.max_tokens is not None:
            if req.max_tokens > room:
                raise bad("max_tokens", f"max_tokens ({req.max_tokens}) + the prompt ({prompt_len} tokens) exceed "
                                        f"the context of {context} tokens: at most {room} new tokens fit",
                          code="context_length_exceeded")
            max_tokens = req.max_tokens
        else:
            wanted = default_max_tokens if default_max_tokens is not None else default_max
            max_tokens = room if wanted is None else min(wanted, room)
        pick = lambda name: getattr(req, name) if getattr(req, name) is not None else defaults.get(name)  # noqa: E731
        top_p = pick("top_p")
        temperature = float(pick("temperature") or 0.0)
        return SamplingParams(max_tokens=max_tokens, temperature=temperature,
                              top_p=None if top_p in (None, 1.0) else top_p, top_k=pick("top_k") or None,
                              seed=req.seed, eos_token_ids=eos, ignore_eos=req.ignore_eos,
                              speculative=speculative and temperature == 0)

    def start(prompts: list[list[int]], req: ParsedRequest, prompt_field: str,
              default_max: int | None) -> tuple[list[Generation], asyncio.Queue]:
        """One engine request per choice: prompt i's choice j has index i * n + j (OpenAI's order) and, when
        the request is seeded, seed + j, so the n samples differ and each is reproducible alone."""
        arrived = time.perf_counter()
        params = [params_for(req, len(ids), prompt_field, default_max) for ids in prompts]
        queue: asyncio.Queue = asyncio.Queue()
        gens = []
        for i, (ids, p) in enumerate(zip(prompts, params)):
            for j in range(req.n):
                choice = p if j == 0 or p.seed is None else dataclasses.replace(p, seed=p.seed + j)
                gens.append(Generation(engine, i * req.n + j, ids, choice, tokenizer, req.stop, queue, metrics,
                                       arrived, counts_prompt=j == 0))
        for i, g in enumerate(gens):
            try:
                g.submit()
            except (RequestRejected, EngineOverloaded) as err:
                for done in gens[:i]:  # no half-served request: earlier choices go too
                    done.abort()
                if isinstance(err, RequestRejected):
                    field = prompt_field if err.field == "prompt" else err.field
                    raise bad(field, str(err)) from None
                retry = max(1, math.ceil(err.retry_after))
                raise APIError(429, str(err) or "the waiting queue is full", type="server_overloaded",
                               code="queue_full", headers={"Retry-After": str(retry)}) from None
        return gens, queue

    @app.get("/health")
    async def health() -> JSONResponse:
        if app.state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(engine.stats()), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        guard(request)
        return JSONResponse({"object": "list", "data": [{
            "id": model_name, "object": "model", "created": 0, "owned_by": "dsmoe",
            "max_model_len": engine.max_context}]})

    @app.post("/v1/completions")
    async def completions(request: Request):
        guard(request)
        req = parse_completion(await read_json(request))
        check_model(req)
        prompts = []
        for p in req.prompts:
            ids = tokenizer.encode(p).ids if isinstance(p, str) else list(p)
            if not ids:
                raise bad("prompt", "the prompt encodes to no tokens")
            if vocab_size is not None and max(ids) >= vocab_size:
                raise bad("prompt", f"token id {max(ids)} is outside the vocabulary (size {vocab_size})")
            prompts.append(ids)
        gens, queue = start(prompts, req, "prompt", COMPLETION_DEFAULT_MAX_TOKENS)
        return await respond(request, req, gens, queue, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        guard(request)
        req = parse_chat(await read_json(request))
        check_model(req)
        if chat_template is None:
            raise bad("messages", f"the model {model_name!r} has no chat template (neither chat_template.jinja "
                                  "nor tokenizer_config.json's chat_template): use /v1/completions", code="no_chat_template")
        try:
            text = chat_template.render(req.messages, add_generation_prompt=True, **req.chat_template_kwargs)
        except ChatTemplateError as err:
            raise bad("messages", f"the chat template refused these messages: {err}") from None
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            raise bad("messages", "the messages render to no tokens")
        gens, queue = start([ids], req, "messages", None)
        return await respond(request, req, gens, queue, chat=True)

    async def respond(request: Request, req: ParsedRequest, gens: list[Generation], queue: asyncio.Queue,
                      chat: bool):
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            first = await _first_event(request, queue)
            if first is None:  # the client left before the first token: nothing to stream
                for g in gens:
                    g.abort()
                return PlainTextResponse("", status_code=499)
            if first.error is not None:
                for g in gens:
                    g.abort()
                raise APIError(500, first.error, type="server_error", code="engine_error")
            body = _sse(first, queue, gens, ident, created, model_name, chat, req.include_usage)
            return StreamingResponse(body, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        if not await _collect(request, gens, queue):
            return PlainTextResponse("", status_code=499)  # the client is gone; nobody reads this
        choices = []
        for g in gens:
            if chat:
                choices.append({"index": g.index, "message": {"role": "assistant", "content": g.text.text},
                                "logprobs": None, "finish_reason": g.finish_reason})
            else:
                choices.append({"index": g.index, "text": g.text.text, "logprobs": None,
                                "finish_reason": g.finish_reason})
        return JSONResponse({"id": ident, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": model_name, "choices": choices, "usage": _usage(gens)})

    return app


def _usage(gens: list[Generation]) -> dict:
    prompt = sum(len(g.prompt_ids) for g in gens if g.counts_prompt)  # once per prompt, not per choice
    completion = sum(g.completion_tokens for g in gens)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    cached = sum(g.cached_prompt_tokens for g in gens)
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


async def _wait_disconnect(request: Request) -> None:
    # The body has been read: the next ASGI message is http.disconnect, whenever the client goes away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _first_event(request: Request, queue: asyncio.Queue) -> TextEvent | None:
    """The first event of a stream (it decides between a 200 stream and a 500); None if the client left
    while the request was still queued or prefilling."""
    get = asyncio.ensure_future(queue.get())
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
        if get.done():
            return get.result()
        get.cancel()
        return None
    finally:
        gone.cancel()


async def _collect(request: Request, gens: list[Generation], queue: asyncio.Queue) -> bool:
    """Wait for every choice to finish; False when the client disconnected first (all aborted)."""
    left = len(gens)
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        while left:
            get = asyncio.ensure_future(queue.get())
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                return False
            event: TextEvent = get.result()
            if event.error is not None:
                raise APIError(500, event.error, type="server_error", code="engine_error")
            if event.finish_reason is not None:
                left -= 1
        return True
    finally:
        gone.cancel()
        for g in gens:
            g.abort()  # no-op for finished choices


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(first: TextEvent, queue: asyncio.Queue, gens: list[Generation], ident: str, created: int,
               model: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """The event stream of one request; on a client disconnect (cancellation) every choice is aborted."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta: dict = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        out = {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return _data(out)

    try:
        if chat:
            for g in gens:
                yield chunk(g.index, None, None, role=True)
        left, event = len(gens), first
        while True:
            if event.error is not None:
                yield _data({"error": {"message": event.error, "type": "server_error", "param": None,
                                       "code": "engine_error"}})
                break
            if event.text:
                yield chunk(event.index, event.text, None)
            if event.finish_reason is not None:
                yield chunk(event.index, None, event.finish_reason)
                left -= 1
                if not left:
                    if include_usage:
                        yield _data({"id": ident, "object": kind, "created": created, "model": model,
                                     "choices": [], "usage": _usage(gens)})
                    break
            event = await queue.get()
        yield "data: [DONE]\n\n"
    finally:
        for g in gens:
            g.abort()

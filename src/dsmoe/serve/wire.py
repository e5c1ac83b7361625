"""OpenAI request bodies checked field by field: what is served, what is refused, and why.

Every field of a request is either understood (typed, range-checked), accepted only at its default value
(an option we do not implement: `n`, `logprobs`, `echo`, `logit_bias`, penalties, tools, ...), or unknown.
Anything else than the understood or the default gets a 400 naming the field: an option is never silently
ignored. Errors carry OpenAI's body shape `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MAX_STOP_STRINGS = 16
MAX_CHOICES = 16  # n: choices per prompt
_MAX_SEED = 2**63 - 1


class APIError(Exception):
    """An HTTP error answer. param: the request field at fault (or None)."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = None) -> APIError:
    """A 400 naming `param`; the message says which field unless it already does."""
    if param not in message:
        message = f"'{param}': {message}"
    return APIError(400, message, param=param, code=code)


@dataclass
class ParsedRequest:
    """A validated request, before tokenisation. prompts: texts or token-id lists (completions), or None for
    chat (messages instead). max_tokens None: the server's default applies. n: choices per prompt."""

    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: list[str]
    ignore_eos: bool
    n: int = 1
    prompts: list[str | list[int]] | None = None
    messages: list[dict] | None = None
    tools: list[dict] | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- field checks

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise bad(name, f"'{name}' must be an integer, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        where = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise bad(name, f"'{name}' must be {where}, got {v}")
    return v


def _number(body: dict, name: str, lo: float, hi: float | None = None, lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_number(v) or not math.isfinite(v):
        raise bad(name, f"'{name}' must be a finite number, got {v!r}")
    if v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
        where = f"{'>' if lo_open else '>='} {lo}" + ("" if hi is None else f" and <= {hi}")
        raise bad(name, f"'{name}' must be {where}, got {v}")
    return float(v)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"'{name}' must be true or false, got {v!r}")
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("stop", f"'stop' must be a string or a list of strings, got {v!r}")
    if len(items) > MAX_STOP_STRINGS:
        raise bad("stop", f"'stop' holds {len(items)} strings; at most {MAX_STOP_STRINGS} are allowed")
    if any(s == "" for s in items):
        raise bad("stop", "'stop' strings must not be empty")
    return items


# Options accepted only at their default ("not set" values): anything else is refused by name.
_DEFAULT_ONLY = {
    "best_of": (1,),
    "echo": (False,),
    "logprobs": (False,),  # chat: a bool; completions: an int (None also accepted: see _refuse_unsupported)
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "repetition_penalty": (1, 1.0),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "functions": ([],),
    "function_call": ("none", "auto"),
    "response_format": ({"type": "text"},),
    "min_tokens": (0,),
    "include_stop_str_in_output": (False,),
    "skip_special_tokens": (True,),
}
_WHY = {
    "best_of": "only best_of = 1 is supported",
    "echo": "echo is not supported",
    "logprobs": "logprobs are not supported",
    "top_logprobs": "logprobs are not supported",
    "logit_bias": "logit_bias is not supported",
    "tools": "tool calling is not supported",
    "functions": "function calling is not supported",
    "tool_choice": "tool calling is not supported",
    "function_call": "function calling is not supported",
    "response_format": "only response_format {'type': 'text'} is supported",
}
# Metadata that changes nothing about generation; accepted as is.
_IGNORED_METADATA = {"user", "parallel_tool_calls", "metadata", "store"}


def _is_default(name: str, value: Any) -> bool:
    if value is None:
        return True
    for default in _DEFAULT_ONLY[name]:
        if isinstance(value, bool) or isinstance(default, bool):  # True == 1 in Python: compare bools apart
            if value is default:
                return True
        elif value == default:
            return True
    return False


def _refuse_unsupported(body: dict, allowed: set[str]) -> None:
    for name, value in body.items():
        if name in allowed or name in _IGNORED_METADATA:
            continue
        if name in _DEFAULT_ONLY:
            if _is_default(name, value):
                continue
            why = _WHY.get(name, f"'{name}' is not supported")
            raise bad(name, f"'{name}' = {_preview(value)} is not supported: {why}", code="unsupported_parameter")
        raise bad(name, f"unrecognized request argument '{name}'", code="unrecognized_parameter")


_COMMON = {"model", "n", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
           "ignore_eos"}


def _common(body: Any, extra: set[str]) -> ParsedRequest:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    _refuse_unsupported(body, _COMMON | extra)
    model = body.get("model")
    if model is None:
        raise bad("model", "'model' is required")
    if not isinstance(model, str):
        raise bad("model", f"'model' must be a string, got {model!r}")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options", "'stream_options' is only allowed with 'stream': true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad("stream_options", f"'stream_options' must be {{'include_usage': bool}}, got {options!r}")
        include_usage = _bool(options, "include_usage")
    top_k = _int(body, "top_k", lo=-1)
    return ParsedRequest(
        model=model, stream=stream, include_usage=include_usage,
        max_tokens=_int(body, "max_tokens", lo=1),
        temperature=_number(body, "temperature", 0.0),
        top_p=_number(body, "top_p", 0.0, 1.0, lo_open=True),
        top_k=None if top_k in (-1, 0) else top_k,
        seed=_int(body, "seed", lo=-_MAX_SEED - 1, hi=_MAX_SEED),
        stop=_stop(body), ignore_eos=_bool(body, "ignore_eos"), n=_int(body, "n", lo=1, hi=MAX_CHOICES) or 1)


def parse_completion(body: Any) -> ParsedRequest:
    """/v1/completions. prompt: a string, a list of strings, a list of token ids, or a list of id lists."""
    req = _common(body, {"prompt"})
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt", "'prompt' is required")
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt):
        prompts = list(prompt)
    else:
        raise bad("prompt", "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                            f"token-id lists (not empty), got {_preview(prompt)}")
    for p in prompts:
        if len(p) == 0:
            raise bad("prompt", "'prompt' must not be empty")
        if isinstance(p, list) and any(t < 0 for t in p):
            raise bad("prompt", "'prompt' token ids must be >= 0")
    req.prompts = prompts
    return req


_ROLES = {"system", "developer", "user", "assistant", "tool"}


def parse_chat(body: Any) -> ParsedRequest:
    """/v1/chat/completions. messages: [{"role", "content"}...]; content a string or a list of text parts."""
    req = _common(body, {"messages", "max_completion_tokens", "chat_template_kwargs"})
    completion_tokens = _int(body, "max_completion_tokens", lo=1)
    if completion_tokens is not None:
        if req.max_tokens is not None and req.max_tokens != completion_tokens:
            raise bad("max_completion_tokens", "'max_tokens' and 'max_completion_tokens' disagree")
        req.max_tokens = completion_tokens
    messages = body.get("messages")
    if messages is None:
        raise bad("messages", "'messages' is required")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", f"'messages' must be a non-empty list, got {_preview(messages)}")
    req.messages = [_message(i, m) for i, m in enumerate(messages)]
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise bad("chat_template_kwargs", "'chat_template_kwargs' must be an object")
    req.chat_template_kwargs = dict(kwargs or {})
    return req


def _message(i: int, m: Any) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad(where, f"'{where}' must be an object with 'role' and 'content', got {_preview(m)}")
    role = m.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise bad(f"{where}.role", f"'{where}.role' must be one of {sorted(_ROLES)}, got {role!r}")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only, joined as vLLM does for string templates
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad(f"{where}.content[{j}]", f"'{where}.content[{j}]': only text parts are supported, "
                                                  f"got {_preview(part)}")
            texts.append(part["text"])
        content = "\n".join(texts)
    elif content is not None and not isinstance(content, str):
        raise bad(f"{where}.content", f"'{where}.content' must be a string or a list of text parts, "
                                      f"got {_preview(content)}")
    if content is None and not (role == "assistant" and m.get("tool_calls")):
        raise bad(f"{where}.content", f"'{where}.content' is required")
    return {**m, "content": content}


def _preview(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."

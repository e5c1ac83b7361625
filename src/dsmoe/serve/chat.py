"""Chat templates: a checkpoint's Jinja2 `chat_template`, rendered the way transformers renders it.

Where the template comes from (transformers' tokenizer loading, same precedence): `chat_template.jinja`
(and `additional_chat_templates/*.jinja`) beside the weights, else `tokenizer_config.json`'s
`chat_template`, a string or a list of `{"name", "template"}` of which "default" is used.

How it is rendered (transformers' `apply_chat_template` with `tokenize=False`): a sandboxed, immutable
Jinja2 environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter
that does not escape HTML, and the globals `raise_exception`, `strftime_now`, `dict` and `namespace`. The
template sees `messages` (None-valued keys dropped, reasoning fields aliased), `tools`, `documents`,
`add_generation_prompt`, and the special tokens of tokenizer_config.json (`bos_token`, `eos_token`, ...).
The rendered text is tokenised without adding special tokens: the template writes them itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
# The named special tokens transformers passes to every template (PreTrainedTokenizerBase.special_tokens_map).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning is sent under; transformers copies it to all of them (templates read one).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The template refused the conversation (its `raise_exception`) or failed while rendering it."""


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering ignores it."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace() that refuses underscore names, so a template cannot reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")


class _Dict:
    """`dict(...)` in templates, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want the JSON as it is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict with "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _plain(value: Any) -> Any:
    """Drop None-valued keys of each message (as transformers does: templates print 'None' otherwise)."""
    return {k: v for k, v in value.items() if v is not None}


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


class ChatTemplate:
    """A compiled chat template plus the special tokens it is rendered with.

    source: the Jinja2 text; special_tokens: {"bos_token": "<s>", ...} (the names in SPECIAL_TOKEN_NAMES).
    Raises ValueError for a template that does not compile (the message names `origin`).
    """

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None, origin: str = "chat_template"):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateError as err:
            raise ValueError(f"{origin}: the chat template does not compile ({err})") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               documents: list[dict] | None = None, **kwargs: Any) -> str:
        """The prompt text for `messages` (OpenAI-style dicts with "role" and "content").

        kwargs are extra template variables (e.g. `enable_thinking`); they override special tokens.
        Raises ChatTemplateError with the template's own message when it refuses the conversation.
        """
        chat = [_alias_reasoning(_plain(m)) for m in messages]
        variables = {**self.special_tokens, **kwargs}
        try:
            return self._template.render(messages=chat, tools=tools, documents=documents,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as err:
            raise ChatTemplateError(str(err)) from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as err:
            raise ChatTemplateError(f"the chat template failed on these messages ({type(err).__name__}: {err})") \
                from None

    @classmethod
    def from_directory(cls, directory: str | Path) -> "ChatTemplate | None":
        """The template a checkpoint directory ships, or None when it has none.

        Raises ValueError naming the file for unreadable JSON, a malformed `chat_template` entry, a list
        without a "default" template, or a template that does not compile.
        """
        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        config: dict = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{config_path}: not valid JSON ({err})") from None
            if not isinstance(config, dict):
                raise ValueError(f"{config_path}: expected a JSON object")
        special = {name: text for name in SPECIAL_TOKEN_NAMES
                   if (text := _token_text(config.get(name))) is not None}

        templates: dict[str, str] = {}
        origin = str(config_path)
        raw = config.get("chat_template")
        if isinstance(raw, str):
            templates["default"] = raw
        elif isinstance(raw, list):
            for entry in raw:
                if not (isinstance(entry, Mapping) and isinstance(entry.get("name"), str)
                        and isinstance(entry.get("template"), str)):
                    raise ValueError(f"{config_path}: chat_template entries must be "
                                     f'{{"name": ..., "template": ...}}, got {entry!r}')
                templates[entry["name"]] = entry["template"]
        elif raw is not None:
            raise ValueError(f"{config_path}: chat_template must be a string or a list of named templates, "
                             f"got {type(raw).__name__}")
        # Separate .jinja files take precedence, as in transformers' loading.
        if (directory / TEMPLATE_DIR).is_dir():
            for path in sorted((directory / TEMPLATE_DIR).glob("*.jinja")):
                templates[path.stem] = path.read_text(encoding="utf-8")
        if (directory / TEMPLATE_FILE).is_file():
            templates["default"] = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
            origin = str(directory / TEMPLATE_FILE)
        if not templates:
            return None
        if "default" not in templates:
            raise ValueError(f"{config_path}: several chat templates ({', '.join(sorted(templates))}) and none "
                             "named 'default'")
        return cls(templates["default"], special, origin)

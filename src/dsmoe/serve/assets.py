"""The text side of a checkpoint directory: tokenizer, chat template, EOS ids and sampling defaults.

EOS ids, first found wins: generation_config.json `eos_token_id` (the Hub keeps the current ids there),
config.json `eos_token_id`, the tokenizer's `<|endoftext|>` (what a `dsmoe train` run directory stops
on, as `dsmoe generate` does). Sampling defaults come from generation_config.json (greedy unless it says
do_sample); a directory without one gets OpenAI's defaults (temperature 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from ..checkpoint.generation_config import read_generation_config
from ..config import ModelConfig
from ..train.tokenizer import EOT_TOKEN, load_tokenizer
from .chat import ChatTemplate


@dataclass
class TextAssets:
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None
    eos_token_ids: tuple[int, ...]
    sampling_defaults: dict[str, Any] | None
    default_max_tokens: int | None


def load_text_assets(directory: str | Path, config: ModelConfig) -> TextAssets:
    """Read tokenizer.json, the chat template and generation_config.json of `directory`.

    Raises ValueError / DataError naming the file for a missing tokenizer or an unreadable config.
    """
    directory = Path(directory)
    tokenizer = load_tokenizer(directory)
    generation = read_generation_config(directory)
    eos: list[int] = list(generation.eos_token_id) if generation is not None else []
    if not eos and config.eos_token_id is not None:
        eos = [config.eos_token_id] if isinstance(config.eos_token_id, int) else list(config.eos_token_id)
    if not eos and tokenizer.token_to_id(EOT_TOKEN) is not None:
        eos = [tokenizer.token_to_id(EOT_TOKEN)]
    return TextAssets(tokenizer=tokenizer, chat_template=ChatTemplate.from_directory(directory),
                      eos_token_ids=tuple(eos),
                      sampling_defaults=generation.sampling_defaults() if generation is not None else None,
                      default_max_tokens=generation.max_new_tokens if generation is not None else None)

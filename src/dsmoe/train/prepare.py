"""Before the first step: the tokenizer (trained on the corpus, or the `--init` checkpoint's own), the
end-of-text id a run separates documents with and writes to generation_config.json, and the token streams.

Library code, no printing: progress goes through `on_event`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import parallel
from ..checkpoint.generation_config import FILE_NAME as GENERATION_CONFIG, GenerationConfig, read_generation_config
from ..config import ModelConfig
from ..parallel import ParallelInfo
from . import data, shards, tokenizer
from .errors import TrainingError

# Files of a Hugging Face checkpoint's tokenizer copied verbatim into a fine-tuning run's checkpoints, so
# `transformers.AutoTokenizer` reads the run directory as it read the source.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class Corpus:
    """What the loop needs from the data side.

    files: name -> bytes written into every checkpoint beside the weights (tokenizer files and
    generation_config.json). eos_id: the id appended after each document; bos_id: prepended (None: none).
    """

    tokenizer: Any  # tokenizers.Tokenizer
    eos_id: int
    bos_id: int | None
    train: data.TokenStream
    val: data.TokenStream
    files: dict[str, bytes] = field(default_factory=dict)


def checkpoint_token_ids(directory: Path, config: ModelConfig | None, tok: Any
                         ) -> tuple[int, int | None, GenerationConfig]:
    """(eos_id, bos_id, generation config) of a checkpoint: generation_config.json first, then config.json
    (`config`, or the directory's file when None), then the tokenizer's <|endoftext|>. DataError when no
    end-of-text id can be found or it lies outside the tokenizer."""
    directory = Path(directory)
    if config is None:
        config = _token_ids_of_config_json(directory)
    gen = read_generation_config(directory)
    eos = gen.eos_token_id[0] if gen is not None and gen.eos_token_id else None
    if eos is None and config.eos_token_id is not None:
        eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    if eos is None:
        eos = tok.token_to_id(data.EOT_TOKEN)
    if eos is None:
        raise data.DataError(f"{directory}: no end-of-text token id (generation_config.json and config.json have no "
                             f"eos_token_id, and the tokenizer has no {data.EOT_TOKEN})")
    bos = gen.bos_token_id if gen is not None and gen.bos_token_id is not None else config.bos_token_id
    size = tok.get_vocab_size(with_added_tokens=True)
    for name, value in (("eos_token_id", eos), ("bos_token_id", bos)):
        if value is not None and value >= size:
            raise data.DataError(f"{directory}: {name} {value} is outside its tokenizer ({size} ids)")
    if gen is None:
        gen = GenerationConfig(bos_token_id=bos, eos_token_id=[eos])
    return eos, bos, gen


def _token_ids_of_config_json(directory: Path) -> Any:
    """The bos/eos ids of directory/config.json, if any, without requiring a whole model config."""
    import json
    from types import SimpleNamespace

    raw: dict[str, Any] = {}
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        pass
    raw = raw if isinstance(raw, dict) else {}
    return SimpleNamespace(eos_token_id=raw.get("eos_token_id"), bos_token_id=raw.get("bos_token_id"))


def prepare_corpus(cfg: Any, model_config: ModelConfig, info: ParallelInfo,
                   on_event: Callable[[dict[str, Any]], None], resume_dir: Path | None, depth: int) -> Corpus:
    """Tokenizer and token streams for `cfg` (a TrainConfig). With cfg.init the checkpoint's tokenizer is
    used as it is (no tokenizer is trained); otherwise one is trained on the training split (cached).
    `depth`: MTP depth, which lengthens each training window."""
    if shards.is_shard_dir(cfg.data):
        return _shard_corpus(cfg, model_config, resume_dir, depth)
    on_event({"event": "status", "message": "reading corpus"})
    warn = lambda message: on_event({"event": "warning", "message": message})  # noqa: E731
    docs = data.load_corpus(cfg.data, cfg.data_field, cfg.strict_data, warn)
    train_docs, val_docs = data.split_corpus(docs, seed=cfg.seed)
    files: dict[str, bytes] = {}
    if cfg.init is not None:
        init = _init_files(cfg, resume_dir)
        tok = tokenizer.load_tokenizer(init)
        size = tok.get_vocab_size(with_added_tokens=True)
        if size > model_config.vocab_size:
            raise data.DataError(f"--init {init}: its tokenizer has {size} ids but the model's embedding only "
                                 f"{model_config.vocab_size} (vocab_size)")
        eos, bos, gen = checkpoint_token_ids(init, model_config, tok)
        for name in TOKENIZER_FILES:
            if (init / name).is_file():
                files[name] = (init / name).read_bytes()
    else:
        vocab = cfg.vocab_size or model_config.vocab_size
        on_event({"event": "status", "message": f"tokenizer ({vocab} tokens)"})
        if not info.is_main:
            parallel.barrier(info)  # the main rank trains and caches the tokenizer; the others then read it
        tok = tokenizer.train_tokenizer(train_docs, vocab)
        if info.is_main:
            parallel.barrier(info)
        eos, bos = tokenizer.eot_id(tok), None
        gen = GenerationConfig(eos_token_id=[eos])
        files["tokenizer.json"] = tok.to_str().encode()
        if resume_dir is not None and (resume_dir / "tokenizer.json").is_file() and \
                tokenizer.load_tokenizer(resume_dir).get_vocab() != tok.get_vocab():
            raise TrainingError(f"--resume: the corpus at --data {cfg.data} gives another tokenizer than the run "
                                 f"in {cfg.out} was trained with (was --data changed?)")
    files[GENERATION_CONFIG] = (_json(gen.to_dict())).encode()
    on_event({"event": "status", "message": "tokenizing"})
    train_stream = data.encode_corpus(train_docs, tok, eos, bos_id=bos)
    val_stream = data.encode_corpus(val_docs, tok, eos, bos_id=bos)
    _check_windows(cfg, train_stream, val_stream, depth)
    return Corpus(tok, eos, bos, train_stream, val_stream, files)


def _shard_corpus(cfg: Any, model_config: ModelConfig, resume_dir: Path | None, depth: int) -> Corpus:
    """Token shards from `dsmoe tokenize`: their tokenizer and ids, streamed from disk."""
    directory = Path(cfg.data)
    index, train_stream, val_stream = shards.open_shards(directory)
    tok = tokenizer.load_tokenizer(directory)
    if cfg.init is not None:
        init_tok = _init_files(cfg, resume_dir) / "tokenizer.json"
        if not init_tok.is_file() or shards.sha256_file(init_tok) != index["tokenizer_sha256"]:
            raise TrainingError(f"--data {directory} was tokenized with another tokenizer than --init {cfg.init}'s "
                                f"(run dsmoe tokenize --tokenizer {cfg.init})")
    if index["vocab_size"] > model_config.vocab_size and cfg.init is not None:
        raise TrainingError(f"--data {directory}: {index['vocab_size']} token ids, more than the model's "
                            f"{model_config.vocab_size}")
    if resume_dir is not None and (resume_dir / "tokenizer.json").is_file() and \
            tokenizer.load_tokenizer(resume_dir).get_vocab() != tok.get_vocab():
        raise TrainingError(f"--resume: the shards at --data {directory} use another tokenizer than the run in "
                            f"{cfg.out} was trained with")
    eos, bos = index["eos_token_id"], index["bos_token_id"]
    files = {"tokenizer.json": (directory / "tokenizer.json").read_bytes()}
    if cfg.init is not None:
        init = _init_files(cfg, resume_dir)
        _, _, gen = checkpoint_token_ids(init, model_config, tok)
        for name in TOKENIZER_FILES[1:]:
            if (init / name).is_file():
                files[name] = (init / name).read_bytes()
    else:
        gen = GenerationConfig(bos_token_id=bos, eos_token_id=[eos])
    files[GENERATION_CONFIG] = _json(gen.to_dict()).encode()
    _check_windows(cfg, train_stream, val_stream, depth)
    return Corpus(tok, eos, bos, train_stream, val_stream, files)


def _init_files(cfg: Any, resume_dir: Path | None) -> Path:
    """Where a fine-tuning run reads its tokenizer files and token ids: the checkpoint it resumes from (which
    holds the --init checkpoint's copies, so a resumed run does not need the original any more), else --init."""
    if resume_dir is not None and (resume_dir / "tokenizer.json").is_file():
        return resume_dir
    return Path(cfg.init)


def _check_windows(cfg: Any, train_stream: data.TokenStream, val_stream: data.TokenStream, depth: int) -> None:
    # Both splits must hold one window before the first step: the validation split otherwise fails only at
    # the first evaluation, possibly before any checkpoint.
    for split, stream, need in (("training", train_stream, cfg.seq_len + 1 + depth),
                                ("validation", val_stream, cfg.seq_len + 1)):
        if len(stream) < need:
            raise TrainingError(f"the {split} split of --data {cfg.data} has {len(stream)} tokens, fewer than one "
                                 f"window of {need} (--seq-len {cfg.seq_len} + 1"
                                 f"{f' + {depth} MTP' if split == 'training' and depth else ''}): add text or "
                                 "lower --seq-len")


def _json(value: dict[str, Any]) -> str:
    import json

    return json.dumps(value, indent=2) + "\n"

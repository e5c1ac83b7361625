"""Token shards: a corpus tokenized once (`dsmoe tokenize`) into memory-mapped files that training streams
without holding the corpus in memory.

    SHARDS/
      index.json          format, dtype, token ids, split sizes, the shard files and their token counts
      tokenizer.json      the tokenizer the shards were made with (copied, byte for byte)
      train-00000.bin     raw little-endian uint16 (vocabularies up to 65,536 ids) or uint32 token ids
      val-00000.bin       ...

The token stream is exactly what training builds in memory from the same corpus: documents in the corpus
order, each framed by the tokenizer's BOS (when it has one) and EOS ids, split into training and validation
documents by the same hash of their names (`data.split_corpus`, seed 0, 5% validation). A shard holds a
run of that stream (documents may straddle shards), so `ShardStream` reads the same windows a `TokenStream`
over the whole corpus would, and a run resumes from its saved position exactly.

Writing reads the source twice (one pass to decide the split from the document names, one to encode), one
document batch at a time; index.json is written last, so a folder without it is not a set of shards.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_write_text
from .data import DataError, Document, TokenStream, split_corpus
from .sources import iter_documents

INDEX = "index.json"
FORMAT = "dsmoe-token-shards"
VERSION = 1
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16 per shard
VAL_FRACTION = 0.05
ENCODE_BATCH = 256


def is_shard_dir(path: str | Path | None) -> bool:
    """Whether `path` is a folder written by `write_shards` (it holds index.json)."""
    return path is not None and (Path(path) / INDEX).is_file()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (identifies the tokenizer shards were made with)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _split_plan(names: list[str], lengths: dict[str, int], seed: int) -> tuple[set[str], tuple[str, int] | None]:
    """(validation document names, (name, cut) when a single document is cut by characters), as
    data.split_corpus decides them (it reads names, and the text only to cut a single document)."""
    if len(names) == 1:
        name = names[0]
        _, val = split_corpus([Document(name, "x" * lengths[name])], VAL_FRACTION, seed)
        return set(), (name, lengths[name] - len(val[0].text))
    _, val = split_corpus([Document(n, "") for n in names], VAL_FRACTION, seed)
    return {d.name for d in val}, None


class _ShardWriter:
    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.documents = 0
        self._handle = None

    def write(self, ids: list[int]) -> None:
        array = np.asarray(ids, dtype=self.dtype)
        while array.size:
            if self._handle is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._open()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, array = array[:room], array[room:]
            part.tofile(self._handle)
            self.shards[-1]["tokens"] += int(part.size)

    def _open(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._handle = open(self.out / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def summary(self) -> dict[str, Any]:
        return {"tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents, "shards": self.shards}


def write_shards(source: str | Path, tokenizer_dir: str | Path, out: str | Path, field: str = "text",
                 strict: bool = False, warn: Callable[[str], None] | None = None, seed: int = 0,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Tokenize the corpus at `source` with the tokenizer in `tokenizer_dir` (a tokenizer.json, or a checkpoint
    directory holding one) into shards in `out`; returns the index. DataError for a corpus or tokenizer
    problem, or an `out` that already holds shards. on_progress(documents done, documents)."""
    from .prepare import checkpoint_token_ids
    from .tokenizer import load_tokenizer

    out, tokenizer_dir = Path(out), Path(tokenizer_dir)
    tokenizer_file = tokenizer_dir / "tokenizer.json" if tokenizer_dir.is_dir() else tokenizer_dir
    tok = load_tokenizer(tokenizer_file)
    eos, bos, _ = checkpoint_token_ids(tokenizer_file.parent, None, tok)
    if (out / INDEX).exists():
        raise DataError(f"--out {out} already holds token shards ({INDEX}); choose another folder")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")

    names, lengths, skipped = [], {}, []

    def note(message: str) -> None:
        skipped.append(message)
        if warn is not None:
            warn(message)

    for doc in iter_documents(source, field, strict, note):  # pass 1: which documents, and the split
        if doc.text.strip():
            names.append(doc.name)
            lengths[doc.name] = len(doc.text)
    if not names:
        raise DataError(f"{source}: no text (all files are empty, whitespace or skipped)")
    val_names, cut = _split_plan(names, lengths, seed)

    size = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype("<u2") if size <= 2**16 else np.dtype("<u4")
    out.mkdir(parents=True, exist_ok=True)
    writers = {split: _ShardWriter(out, split, dtype, shard_tokens) for split in ("train", "val")}
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    pending: list[tuple[str, str]] = []  # (split, text)
    done = 0

    def flush() -> None:
        for (split, _), enc in zip(pending, encode([text for _, text in pending], add_special_tokens=False)):
            writers[split].write(([bos] if bos is not None else []) + enc.ids + [eos])
            writers[split].documents += 1
        pending.clear()

    try:
        for doc in iter_documents(source, field, strict, None):  # pass 2: encode, in corpus order
            if not doc.text.strip():
                continue
            if cut is not None:  # a single document: its last characters are the validation split
                pending += [("train", doc.text[:cut[1]]), ("val", doc.text[cut[1]:])]
            else:
                pending.append(("val" if doc.name in val_names else "train", doc.text))
            done += 1
            if len(pending) >= ENCODE_BATCH:
                flush()
                if on_progress is not None:
                    on_progress(done, len(names))
        flush()
    finally:
        for writer in writers.values():
            writer.close()
    shutil.copyfile(tokenizer_file, out / "tokenizer.json")
    index = {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "vocab_size": size,
             "eos_token_id": eos, "bos_token_id": bos, "tokenizer_sha256": sha256_file(tokenizer_file),
             "source": str(Path(source).expanduser().resolve()), "field": field, "seed": seed,
             "val_fraction": VAL_FRACTION, "skipped": skipped,
             "splits": {split: writer.summary() for split, writer in writers.items()}}
    atomic_write_text(out / INDEX, json.dumps(index, indent=2) + "\n")
    if on_progress is not None:
        on_progress(len(names), len(names))
    return index


def read_index(directory: str | Path) -> dict[str, Any]:
    """index.json of a shard folder, checked (DataError naming the file and the problem)."""
    path = Path(directory) / INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable shard index ({err})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise DataError(f"{path}: not a dsmoe token shard index (format {FORMAT} version {VERSION})")
    for split in ("train", "val"):
        for shard in index["splits"][split]["shards"]:
            file = Path(directory) / shard["file"]
            expected = shard["tokens"] * np.dtype(index["dtype"]).itemsize
            if not file.is_file() or file.stat().st_size != expected:
                raise DataError(f"{file}: missing or not {expected} bytes as {INDEX} says (an incomplete copy?)")
    return index


class ShardStream(TokenStream):
    """A `TokenStream` over memory-mapped shard files: the same windows, read from disk on demand."""

    def __init__(self, directory: str | Path, index: dict[str, Any], split: str) -> None:
        dtype = np.dtype(index["dtype"])
        shards = [s for s in index["splits"][split]["shards"] if s["tokens"]]
        self.parts = [np.memmap(Path(directory) / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],))
                      for s in shards]
        self.starts = np.cumsum([0] + [s["tokens"] for s in shards])
        self.tokens = None  # nothing in memory
        if len(self) < 2:
            raise DataError(f"{directory}: the {split} split holds {len(self)} tokens")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _slice(self, start: int, stop: int) -> torch.Tensor:
        """Tokens [start, stop) of the stream (0 <= start <= stop <= len), across shard boundaries, as int64."""
        pieces = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            begin = start - int(self.starts[shard])
            take = min(stop - start, len(self.parts[shard]) - begin)
            pieces.append(np.asarray(self.parts[shard][begin:begin + take], dtype=np.int64))
            start += take
            shard += 1
        return torch.from_numpy(np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64))

    def windows(self, position: int, batch_size: int, seq_len: int, extra: int = 0) -> tuple[torch.Tensor, int]:
        if batch_size < 1 or seq_len < 1 or extra < 0 or position < 0:
            raise ValueError(f"need batch_size >= 1, seq_len >= 1, extra >= 0, position >= 0; "
                             f"got {batch_size}, {seq_len}, {extra}, {position}")
        n, width = len(self), seq_len + 1 + extra
        if width > n:
            raise DataError(f"token stream has {n} tokens, fewer than one window of seq_len + 1 + extra = {width}")
        start = position % n
        rows = []
        for b in range(batch_size):  # each row wraps around the end of the stream, as TokenStream's do
            s = (start + b * seq_len) % n
            head = self._slice(s, min(n, s + width))
            rows.append(head if head.numel() == width else torch.cat((head, self._slice(0, width - head.numel()))))
        return torch.stack(rows), (start + batch_size * seq_len) % n


def open_shards(directory: str | Path) -> tuple[dict[str, Any], ShardStream, ShardStream]:
    """(index, training stream, validation stream) of a shard folder."""
    index = read_index(directory)
    return index, ShardStream(directory, index, "train"), ShardStream(directory, index, "val")

"""Training corpus: load documents, split train/validation, encode into one token stream, cut batches.

The corpus is a list of `Document`s. Three sources:

- ``None``: the Python standard library's own ``*.py`` files (about 600 files, 10 MB on CPython 3.11),
  so `dsmoe train` works offline with no download. Deterministic for a given Python version.
- a folder: every ``.txt``, ``.py`` and ``.md`` file under it (hidden files and folders skipped), or a
  single such file;
- a ``.jsonl`` file (one JSON object per line, the text in a string field, ``"text"`` by default) or a
  ``.parquet`` file (a string column): see `dsmoe.train.sources`, which reads them one document at a time.

Token shards written by `dsmoe tokenize` are streamed from disk instead: `dsmoe.train.shards`.

Documents are encoded once and concatenated, each followed by the end-of-text token, into one 1-D
tensor (`TokenStream`). Batches are contiguous windows read from an integer position that wraps around,
so the whole data-loader state of a run is that one integer: save it, restore it, get the same batches.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the tokenizers package is only needed by encode_corpus's caller
    from tokenizers import Tokenizer

EOT_TOKEN = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".py", ".md")
# encodings/: generated codec tables (cp1252.py, ...) that would teach a small model little but hex rows
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "encodings"})
STDLIB_MAX_FILE_BYTES = 200_000  # drops generated blobs (pydoc_data/topics.py, 750 KB) and _pydecimal.py


class DataError(ValueError):
    """A corpus or tokenizer problem; the message is one line and names the file (and line) at fault."""


@dataclass(frozen=True)
class Document:
    name: str  # stable identifier (relative path, or "file.jsonl:LINE"); the train/val split hashes it
    text: str


# --------------------------------------------------------------------------------------------- loading


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's ``*.py`` files used as the built-in corpus, sorted by relative path.

    Excludes installed packages, the test suites (mostly fixtures, and huge), idlelib and lib2to3, and
    files over 200 KB.
    """
    root = stdlib_root()
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in STDLIB_EXCLUDED_DIRS for part in rel.parts[:-1]):
            continue
        try:
            if not path.is_file() or path.stat().st_size > STDLIB_MAX_FILE_BYTES:
                continue
        except OSError:
            continue
        found.append((rel.as_posix(), path))
    return [path for _, path in sorted(found)]


def _load_stdlib() -> list[Document]:
    root = stdlib_root()
    docs = []
    for path in stdlib_files():
        try:  # built-in corpus: a file we cannot read or decode is skipped, not the user's problem
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        docs.append(Document(path.relative_to(root).as_posix(), text))
    return docs


def _folder_files(folder: Path) -> list[tuple[str, Path]]:
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.suffix.lower() not in TEXT_SUFFIXES or any(p.startswith(".") for p in rel.parts):
            continue
        if path.is_dir():  # a folder named "notes.txt"; a broken link is kept so that reading it fails loudly
            continue
        found.append((rel.as_posix(), path))
    return sorted(found)


def load_corpus(data: str | Path | None = None, field: str = "text", strict: bool = True,
                warn=None) -> list[Document]:
    """Load the documents of a corpus: ``None`` (the standard library), a folder, a text file, a .jsonl (text
    in `field`) or a .parquet (column `field`); see `dsmoe.train.sources`.

    Whitespace-only documents are dropped. Raises `DataError` (a `ValueError`) with a one-line message
    when the path does not exist, has no matching files, a file cannot be read, a JSON line is malformed,
    or there is no text at all. A file that is not valid UTF-8 is an error with strict=True, else skipped
    with a call of warn(message).
    """
    if data is None:
        docs, where = _load_stdlib(), f"the standard library at {stdlib_root()}"
        if not docs:
            raise DataError(f"no .py files found in {where}")
    else:
        from .sources import iter_documents

        where = str(Path(data).expanduser())
        docs = list(iter_documents(data, field, strict, warn))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError(f"{where}: no text (all files are empty, whitespace or skipped)")
    return docs


# ----------------------------------------------------------------------------------------------- split


def _unit_hash(name: str, seed: int) -> float:
    """A uniform number in [0, 1) from the document name: stable across runs, machines and Python versions
    (unlike hash(), which is salted per process)."""
    digest = hashlib.sha1(f"{seed}\0{name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_corpus(docs: list[Document], val_fraction: float = 0.05,
                 seed: int = 0) -> tuple[list[Document], list[Document]]:
    """Split documents into (train, val) by a hash of each name, so a document's side never depends on the
    order or the number of the others.

    With two or more documents and ``val_fraction > 0`` both sides get at least one document. A single
    document is cut by characters: its last ``val_fraction`` goes to val. ``val_fraction = 0`` returns
    every document as train and an empty val. Order within each side follows ``docs``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not docs:
        raise DataError("cannot split an empty corpus")
    if val_fraction == 0.0:
        return list(docs), []
    if len(docs) == 1:
        doc = docs[0]
        if len(doc.text) < 2:
            raise DataError(f"{doc.name}: too short to split into train and validation ({len(doc.text)} chars)")
        n_val = min(len(doc.text) - 1, max(1, round(len(doc.text) * val_fraction)))
        cut = len(doc.text) - n_val
        return [Document(doc.name, doc.text[:cut])], [Document(doc.name + "#val", doc.text[cut:])]
    u = [_unit_hash(d.name, seed) for d in docs]
    is_val = [x < val_fraction for x in u]
    if not any(is_val):  # tiny corpus: the lowest hash goes to val
        is_val[min(range(len(docs)), key=u.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(docs)), key=u.__getitem__)] = False
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val


# ------------------------------------------------------------------------------------------ token stream


class TokenStream:
    """One long 1-D tensor of token ids (documents each followed by end-of-text) read as contiguous windows.

    `batch(position, B, T, extra)` returns ``inputs (B, T)``, ``targets (B, T + extra)`` and the next
    position. Row b starts at ``position + b*T``; targets are the inputs shifted by one, extended by
    ``extra`` more tokens for multi-token prediction: the next-token labels are ``targets[:, :T]`` and
    the labels of MTP depth k (predicting token t+1+k) are ``targets[:, k:k + T]``, k = 1..extra.
    Reads wrap around at the end (modulo the stream length), so any non-negative position is valid and a
    run resumes exactly from the saved integer.
    """

    def __init__(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 1 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be a 1-D integer tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.numel() < 2:
            raise DataError(f"token stream too short ({tokens.numel()} tokens)")
        self.tokens = tokens

    def __len__(self) -> int:
        return self.tokens.numel()

    def windows(self, position: int, batch_size: int, seq_len: int, extra: int = 0) -> tuple[torch.Tensor, int]:
        """``(tokens (B, T + 1 + extra), next_position)``: the raw windows that `batch` slices."""
        if batch_size < 1 or seq_len < 1 or extra < 0:
            raise ValueError(f"need batch_size >= 1, seq_len >= 1, extra >= 0; "
                             f"got {batch_size}, {seq_len}, {extra}")
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        n = len(self)
        width = seq_len + 1 + extra
        if width > n:
            raise DataError(f"token stream has {n} tokens, fewer than one window of seq_len + 1 + extra = {width}")
        start = position % n
        offsets = torch.arange(batch_size).unsqueeze(1) * seq_len + torch.arange(width)  # (B, T+1+extra)
        idx = (start + offsets) % n
        return self.tokens[idx].long(), (start + batch_size * seq_len) % n

    def shuffled_windows(self, position: int, batch_size: int, seq_len: int, extra: int = 0,
                         seed: int = 0) -> tuple[torch.Tensor, int]:
        """Training batches: ``(tokens (B, T + 1 + extra), next_position)`` where the rows are windows at
        seq_len-aligned offsets drawn in a seeded random order, a fresh order each epoch.

        Consecutive windows come from one file; batching them gives correlated, noisy gradients. Here
        `position` counts windows consumed, so the state is still one integer and a resumed run reads
        exactly the batches an uninterrupted one would.
        """
        width = seq_len + 1 + extra
        if width > len(self):
            raise DataError(f"token stream has {len(self)} tokens, fewer than one window of seq_len + 1 + extra = {width}")
        count = max(1, (len(self) - width) // seq_len + 1)  # windows per epoch
        rows = []
        for k in range(position, position + batch_size):
            epoch, index = divmod(k, count)
            if epoch != getattr(self, "_order_epoch", None) or seed != getattr(self, "_order_seed", None):
                generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                self._order, self._order_epoch, self._order_seed = torch.randperm(count, generator=generator), epoch, seed
            start = int(self._order[index]) * seq_len
            rows.append(self._slice(start, start + width))
        return torch.stack(rows).long(), position + batch_size

    def _slice(self, start: int, stop: int) -> torch.Tensor:
        """Tokens [start, stop) of the stream (within its length); `shards.ShardStream` reads them from disk."""
        return self.tokens[start:stop]

    def batch(self, position: int, batch_size: int, seq_len: int,
              extra: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(inputs (B, T), targets (B, T + extra), next_position)``; see the class docstring."""
        win, nxt = self.windows(position, batch_size, seq_len, extra)
        return win[:, :seq_len], win[:, 1:], nxt

    def batches_per_epoch(self, batch_size: int, seq_len: int) -> int:
        """How many batches cover the stream once (at least 1): the size of a full validation pass."""
        return max(1, len(self) // (batch_size * seq_len))


def encode_corpus(docs: list[Document], tokenizer: Tokenizer, eot_id: int | None = None,
                  chunk_docs: int = 256, bos_id: int | None = None) -> TokenStream:
    """Encode documents (in parallel, in chunks to bound memory) into one `TokenStream`, each document
    followed by the end-of-text id (``eot_id``, default: the tokenizer's ``<|endoftext|>``) and, when
    ``bos_id`` is given, preceded by it (as a pretrained checkpoint's tokenizer frames a document)."""
    if not docs:
        raise DataError("cannot encode an empty corpus")
    if eot_id is None:
        eot_id = tokenizer.token_to_id(EOT_TOKEN)
        if eot_id is None:
            raise DataError(f"the tokenizer has no {EOT_TOKEN} token; pass eot_id")
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no offsets: less memory
    parts = []
    for i in range(0, len(docs), chunk_docs):
        ids: list[int] = []
        for enc in encode([d.text for d in docs[i:i + chunk_docs]], add_special_tokens=False):
            if bos_id is not None:
                ids.append(bos_id)
            ids.extend(enc.ids)
            ids.append(eot_id)
        parts.append(torch.tensor(ids, dtype=torch.int32))  # int32 halves memory; batch() returns int64
    return TokenStream(torch.cat(parts))

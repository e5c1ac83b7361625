"""Corpus sources read one document at a time: a folder of text files, a single text file, a .jsonl file (one
JSON object per line, the text in a configurable field) or a .parquet file (a string column, read in record
batches with pyarrow). Nothing here holds more than one file's text (a .jsonl line, a parquet batch) at once.

A file (or .jsonl line) that is not valid UTF-8 is skipped with a warning naming it, or refused
(`DataError`) with strict=True; any other unreadable input is an error naming the file (and line).
Document names are stable identifiers (relative path, ``file.jsonl:LINE``, ``file.parquet:ROW``): the
train/validation split hashes them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

from .data import TEXT_SUFFIXES, DataError, Document, _folder_files

Warn = Callable[[str], None]
SUPPORTED = "a folder of .txt/.py/.md files, a .txt/.py/.md file, a .jsonl file or a .parquet file"


def _decode(data: bytes, where: str, strict: bool, warn: Warn | None) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        message = f"{where}: not valid UTF-8 (byte {e.start})"
        if strict:
            raise DataError(message + "; --strict-data refuses it") from None
        if warn is not None:
            warn(message + ": skipped")
        return None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _jsonl(path: Path, field: str, strict: bool, warn: Warn | None) -> Iterator[Document]:
    try:
        handle = path.open("rb")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    with handle:
        # split on b"\n" only, as the file is read line by line: U+2028 may sit unescaped inside a JSON string
        for lineno, raw in enumerate(handle, start=1):
            line = _decode(raw, f"{path}:{lineno}", strict, warn)
            if line is None or not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                raise DataError(f'{path}:{lineno}: expected a JSON object with a string "{field}" field')
            yield Document(f"{path.name}:{lineno}", obj[field])


def _parquet(path: Path, field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq

        reader = pq.ParquetFile(path)
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    except Exception as e:  # pyarrow raises its own types for a file that is not parquet
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    if field not in reader.schema_arrow.names:
        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(reader.schema_arrow.names)}); "
                        "choose one with --field")
    row = 0
    for batch in reader.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is not None and not isinstance(value, str):
                raise DataError(f"{path}: column {field!r} holds {type(value).__name__} values, not text")
            if value is not None:
                yield Document(f"{path.name}:{row}", value)
            row += 1


def iter_documents(data: str | Path, field: str = "text", strict: bool = True,
                   warn: Warn | None = None) -> Iterator[Document]:
    """The documents of a corpus path, one at a time, in a deterministic order (whitespace-only ones
    included; callers drop them). DataError for a missing path, a folder without text files, an
    unsupported file, malformed JSON lines, a missing field or column."""
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if path.is_dir():
        files = _folder_files(path)
        if not files:
            raise DataError(f"{path}: no {', '.join(TEXT_SUFFIXES)} files in this folder")
        for name, file in files:
            text = _decode(_read_bytes(file), str(file), strict, warn)
            if text is not None:
                yield Document(name, text)
    elif suffix == ".jsonl":
        yield from _jsonl(path, field, strict, warn)
    elif suffix == ".parquet":
        yield from _parquet(path, field)
    elif suffix in TEXT_SUFFIXES:
        text = _decode(_read_bytes(path), str(path), strict, warn)
        if text is not None:
            yield Document(path.name, text)
    else:
        raise DataError(f"{path}: unsupported corpus file; expected {SUPPORTED}")

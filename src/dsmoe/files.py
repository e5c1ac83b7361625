"""Atomic file writes, shared by checkpoints and the tokenizer cache."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def new_file_mode() -> int:
    """The mode open() gives a new file in this process: 0o666 without the umask's bits (0o644 under the
    usual umask 022). Temporary files (mkstemp, safetensors' writer) are created 0600 and must be set to
    this before they are renamed into place, or a checkpoint written by one user cannot be read by another."""
    try:  # Linux >= 4.7 reports it without changing it (os.umask can only read by setting)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file in the same folder and a rename, so that a
    reader (or a run killed mid-write) sees the old file or the whole new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, new_file_mode())  # mkstemp makes it 0600; honour the umask as open() would
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise

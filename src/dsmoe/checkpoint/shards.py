"""safetensors shards in the Hugging Face layout: `model.safetensors`, or `model-0000k-of-0000n.safetensors`
plus `model.safetensors.index.json` (weight_map: tensor name -> file).

Reading opens every shard once up front, so a damaged or missing file is reported before any tensor is
materialised; writing streams one shard at a time and renames each file into place when complete.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..files import atomic_write_text, new_file_mode

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the tensor and/or file."""


class ShardReader:
    """Name -> (file, header info) over all shards of a checkpoint directory. Use as a context manager."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        self.file_of: dict[str, str] = {}

    def __enter__(self) -> "ShardReader":
        try:
            for file in self._shard_files():
                handle = self._open(file)
                for name in handle.keys():
                    if name in self.file_of and self.file_of[name] != file:
                        raise CheckpointError(f"tensor {name!r} is stored twice: in {self.file_of[name]} and {file}")
                    self.file_of[name] = file
            self._check_index_consistency()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _shard_files(self) -> list[str]:
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                self._weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
            files = sorted(set(self._weight_map.values()))
            for file in files:
                if not (self.directory / file).is_file():
                    raise CheckpointError(f"{index} lists shard {file}, which does not exist")
            return files
        self._weight_map = None
        files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.directory}: no *.safetensors files and no {INDEX_NAME}")
        return files

    def _open(self, file: str) -> object:
        path = self.directory / file
        try:
            handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
        except Exception as err:  # safetensors raises its own error types for damaged headers
            raise CheckpointError(f"{path}: damaged or not a safetensors file ({err})") from None
        self._handles[file] = handle
        return handle

    def _check_index_consistency(self) -> None:
        if self._weight_map is None:
            return
        for name, file in self._weight_map.items():
            if self.file_of.get(name) != file:
                raise CheckpointError(f"{INDEX_NAME} maps tensor {name!r} to {file}, but that file does not hold it")

    def names(self) -> list[str]:
        return list(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """safetensors dtype string, e.g. 'BF16', 'F32', 'F8_E4M3'."""
        return self._handles[self.file_of[name]].get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        file = self.file_of[name]
        try:
            return self._handles[file].get_tensor(name)
        except Exception as err:
            raise CheckpointError(f"tensor {name!r} in {self.directory / file} cannot be read ({err})") from None


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """5_000_000, "5GB", "500MB", "2GiB" -> bytes."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    match = _SIZE.match(str(size))
    if not match:
        raise ValueError(f"max_shard_size: cannot read {size!r} (use bytes or e.g. '5GB', '500MB')")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def write_shards(tensors: Iterable[tuple[str, torch.Tensor]], directory: str | Path, max_shard_size: int) -> list[str]:
    """Write (name, tensor) pairs into shards of at most max_shard_size bytes (a tensor larger than that
    gets a shard of its own), holding one shard in memory at a time. Shards are written under temporary
    names and renamed once all are complete, so a reader never sees a half-written checkpoint file."""
    directory = Path(directory)
    temps: list[tuple[Path, list[str]]] = []
    total = 0
    try:
        for k, group in enumerate(_group(tensors, max_shard_size)):
            tmp = directory / f".shard-{k:05d}.safetensors.tmp"
            save_file(dict(group), str(tmp), metadata={"format": "pt"})
            os.chmod(tmp, new_file_mode())  # safetensors writes through a 0600 temporary file
            temps.append((tmp, [name for name, _ in group]))
            total += sum(t.numel() * t.element_size() for _, t in group)
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    n = len(temps)
    weight_map: dict[str, str] = {}
    files = []
    for k, (tmp, names) in enumerate(temps, start=1):
        file = SINGLE_NAME if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        os.replace(tmp, directory / file)
        files.append(file)
        weight_map.update(dict.fromkeys(names, file))
    index = directory / INDEX_NAME
    if n > 1:
        atomic_write_text(index, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                            indent=2) + "\n")
    else:
        index.unlink(missing_ok=True)  # a stale index from an earlier sharded save would shadow model.safetensors
    return files


def _group(tensors: Iterable[tuple[str, torch.Tensor]], limit: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    group: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if group and size + nbytes > limit:
            yield group
            group, size = [], 0
        group.append((name, t))
        size += nbytes
    if group:
        yield group

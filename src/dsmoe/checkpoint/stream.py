"""Read one safetensors tensor straight into a buffer that the caller owns, with plain file reads.

safetensors' own `get_tensor` returns a view of a memory map of the whole file: a model whose weights
keep the checkpoint's dtype would then be backed by the map (kept after loading, and counted in the
process's resident memory as file pages), and every tensor read for conversion leaves its pages resident
until the file is closed, so the peak of a load is the model plus the file. Reading with readinto into
the final tensor (CPU), or into a one-tensor staging buffer that is then copied to the device, keeps the
peak at the model's size plus the largest tensor. Format: 8-byte little-endian header length, a JSON
header of {name: {dtype, shape, data_offsets: [begin, end]}} (offsets from the end of the header), data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

# safetensors dtype string -> torch dtype (all the ones a DeepSeek / Mixtral checkpoint uses)
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
             "F8_E8M0": torch.float8_e8m0fnu,  # V4's UE8M0 block scales
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


class TensorFile:
    """One open shard: name -> (dtype, shape, byte range), and reads into caller buffers."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            (length,) = struct.unpack("<Q", self._file.read(8))
            header = json.loads(self._file.read(length))
        except Exception:
            self._file.close()
            raise
        header.pop("__metadata__", None)
        self._base = 8 + length
        self.entries: dict[str, dict] = header

    def close(self) -> None:
        self._file.close()

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Fill `out` (a contiguous CPU tensor of the stored dtype and element count) with tensor `name`."""
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        if not out.is_contiguous() or out.device.type != "cpu" or out.numel() * out.element_size() != end - begin:
            raise ValueError(f"tensor {name!r}: buffer of {out.numel() * out.element_size()} bytes on {out.device} "
                             f"cannot hold its {end - begin} bytes")
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        self._file.seek(self._base + begin)
        done = 0
        while done < len(view):  # one read() returns at most ~2 GiB on Linux
            n = self._file.readinto(view[done:])
            if not n:
                raise OSError(f"{self.path}: file ends inside tensor {name!r}")
            done += n
        return out

    def read(self, name: str, staging: "Staging | None" = None) -> torch.Tensor:
        """Tensor `name` as a CPU tensor of its stored dtype and shape: fresh, or a view of `staging`'s
        buffer (valid until the next read through the same Staging)."""
        entry = self.entries[name]
        dtype, shape = ST_DTYPES[entry["dtype"]], entry["shape"]
        if staging is None:
            out = torch.empty(shape, dtype=dtype)
        else:
            begin, end = entry["data_offsets"]
            out = staging.buffer(end - begin).view(dtype).view(shape)
        return self.read_into(name, out)


class Staging:
    """One reusable CPU byte buffer for tensors that are read, then cast or copied to a GPU: a load stages
    one tensor at a time, so the buffer only grows to the largest of them (pinned for a CUDA target, which
    makes the host-to-device copy a direct DMA)."""

    def __init__(self, pin: bool = False) -> None:
        self.pin = pin
        self._buf = torch.empty(0, dtype=torch.uint8)

    def buffer(self, nbytes: int) -> torch.Tensor:
        if self._buf.numel() < nbytes:
            self._buf = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self._buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
        return self._buf[:nbytes]


__all__ = ["ST_DTYPES", "Staging", "TensorFile"]

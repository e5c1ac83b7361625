"""Device names: `cpu`, `cuda`, `cuda:N`, `meta` and `auto` (CUDA when one is usable, else the CPU).

One parser for the library (load_pretrained's `device=`) and the command line (`--device`), so both
refuse the same things with the same message: an unknown device type, a CUDA index the machine does not
have, or CUDA asked for on a torch build or machine without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

DEVICE_CHOICES = "cpu, cuda, cuda:N, meta or auto"


def resolve_device(device: str | torch.device | None, allow_meta: bool = True,
                   local_rank: int | None = None) -> torch.device:
    """'auto' / None -> cuda (the current CUDA device) if torch.cuda.is_available(), else cpu; 'cpu',
    'cuda', 'cuda:N', 'meta' (allow_meta) -> that torch.device, checked to exist.

    local_rank: under torchrun, a bare `cuda` (or `auto` picking CUDA) becomes cuda:LOCAL_RANK, one GPU per
    local rank; an explicit cuda:N is kept as given.

    Raises ValueError naming the text for anything else: a misspelling, a device type dsmoe does not run on
    (mps, xla, ...), CUDA on a machine or torch build without it, or cuda:N past torch.cuda.device_count().
    """
    dev = _resolve(device, allow_meta)
    if local_rank is not None and dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", local_rank)
    return dev


def _resolve(device: str | torch.device | None, allow_meta: bool) -> torch.device:
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    text = device if isinstance(device, str) else str(device)
    choices = DEVICE_CHOICES if allow_meta else "cpu, cuda, cuda:N or auto"
    try:
        dev = torch.device(text.strip().lower()) if isinstance(device, str) else device
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"unknown device {text!r} (expected {choices})") from None
    allowed = ("cpu", "cuda", "meta") if allow_meta else ("cpu", "cuda")
    if dev.type not in allowed:
        raise ValueError(f"unsupported device {text!r} (expected {choices})")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {text!r} requested but {why} (use --device cpu or auto)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {text!r} requested but only {count} CUDA device(s) exist (cuda:0..cuda:{count - 1})")
    if dev.type == "cpu":
        return torch.device("cpu")  # 'cpu:0' and 'cpu' are the same place
    return dev


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on `device` (CUDA); a no-op on the CPU. For timing only."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)



class _SkipMetaInit(torch.overrides.TorchFunctionMode):
    """Drops in-place initialisers (torch.nn.init.*, Tensor.normal_ / uniform_ / ...) applied to meta tensors."""

    _INIT = frozenset({"normal_", "uniform_", "trunc_normal_", "kaiming_normal_", "kaiming_uniform_",
                       "xavier_normal_", "xavier_uniform_", "orthogonal_", "sparse_", "constant_", "zeros_",
                       "ones_", "eye_", "dirac_", "random_", "exponential_", "geometric_", "cauchy_",
                       "log_normal_", "bernoulli_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes its tensor by keyword
        if getattr(func, "__name__", None) in self._INIT and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


@contextmanager
def meta_device() -> Iterator[None]:
    """`with meta_device(): model = Transformer(config)` builds modules with parameters on the meta device (no
    memory), as `with torch.device("meta")` does, but without running their initialisers: those do nothing on
    meta tensors, yet `normal_` on a meta tensor goes through torch._refs, whose first use imports
    torch._dynamo, torch._inductor and sympy, ~75 MiB of resident memory for the rest of the process (a
    loaded checkpoint assigns every parameter anyway)."""
    with torch.device("meta"), _SkipMetaInit():  # the skipping mode innermost: it sees the calls first
        yield


__all__ = ["DEVICE_CHOICES", "meta_device", "resolve_device", "synchronize"]

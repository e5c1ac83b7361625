"""The small-batch CPU decode kernels (ops/cpu/: decode_kernels.cpp, decode_step.cpp), compiled on first use.

`kernels()` returns torch.ops.dsmoe_cpu (linear, swiglu, moe_experts, mla_decode, rms_norm, rope, route,
the layer pieces and mla_decode_step) or None where they cannot be built
(no C++ compiler or ninja, a build error, or DSMOE_CPU_KERNELS=0): callers then keep PyTorch's own
operators, which compute the same thing (tests/test_cpu_kernels.py holds each kernel against them).
The build goes through torch.utils.cpp_extension with -O3 -march=native into torch's extension cache
(~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR); the name carries a hash of the sources, of their folder
and of this CPU's flags, so a change of any rebuilds (the folder: two checkouts sharing one build directory would
rebuild it in turn, since ninja's build file records the sources' paths). The first build takes ~45 s on 2 cores
(a line on stderr says so); later loads ~0.2 s. A build lock left by a killed build is cleared after 10 minutes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "cpu" / name for name in ("decode_kernels.cpp", "decode_step.cpp")]
HEADERS = [Path(__file__).parent / "cpu" / "kernel_math.h"]
MAX_TOKENS = 8  # kMaxTokens in the source: the most tokens one call takes

_DTYPES = (torch.float32, torch.bfloat16)
_STALE_LOCK_SECONDS = 600  # a build takes ~45-90 s: a lock this old belongs to a build that was killed
_lock = threading.Lock()
_state: dict[str, object] = {}
_switch = {"on": os.environ.get("DSMOE_CPU_KERNELS", "1") != "0"}


@contextlib.contextmanager
def cpu_kernels(enabled: bool) -> Iterator[None]:
    """Turn the decode kernels on or off inside the block (process-wide; tests and benchmarks use it to run the
    PyTorch twin of the same step). The environment variable DSMOE_CPU_KERNELS=0 turns them off for good."""
    before = _switch["on"]
    _switch["on"] = bool(enabled)
    try:
        yield
    finally:
        _switch["on"] = before


def small_batch_kernels(x: torch.Tensor, *weights: torch.Tensor):
    """torch.ops.dsmoe_cpu when these operands are a small-batch CPU inference call the kernels take, else None.

    x (..., K): at most MAX_TOKENS tokens, fp32 or bf16, on the CPU, with autograd and autocast off (training
    and anything that needs gradients keeps PyTorch's operators); weights fp32 or bf16, contiguous, CPU."""
    if not _switch["on"] or x.device.type != "cpu" or torch.is_grad_enabled() or x.dtype not in _DTYPES:
        return None
    if x.numel() == 0 or x.numel() > MAX_TOKENS * x.shape[-1] or torch.is_autocast_enabled("cpu"):
        return None
    for w in weights:
        if w.device.type != "cpu" or w.dtype not in _DTYPES or not w.is_contiguous():
            return None
    return kernels()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build_name() -> str:
    code = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    folder = str(SOURCES[0].parent.resolve()).encode()
    digest = hashlib.sha256(code + folder + _cpu_flags().encode() + torch.__version__.encode())
    return f"dsmoe_cpu_{digest.hexdigest()[:12]}"


def kernels():
    """torch.ops.dsmoe_cpu once built and loaded (thread-safe, built at most once per process), else None;
    the reason it is None is logged once and kept in `unavailable_reason()`."""
    if "ops" in _state:
        return _state["ops"]
    with _lock:
        if "ops" not in _state:
            _state["ops"], _state["reason"] = _load()
            if _state["ops"] is None and _state["reason"] != "DSMOE_CPU_KERNELS=0":  # asked for: no news
                log.warning("dsmoe CPU decode kernels unavailable (%s); decoding on the CPU uses PyTorch's "
                            "operators, several times slower", _state["reason"])
    return _state["ops"]


def unavailable_reason() -> str | None:
    """Why kernels() returned None, or None if they loaded (or were not tried yet)."""
    return _state.get("reason")  # type: ignore[return-value]


def _load():
    if os.environ.get("DSMOE_CPU_KERNELS", "1") == "0":
        return None, "DSMOE_CPU_KERNELS=0"
    if hasattr(torch.ops, "dsmoe_cpu") and hasattr(torch.ops.dsmoe_cpu, "linear"):
        return torch.ops.dsmoe_cpu, None
    try:
        from torch.utils import cpp_extension

        name = _build_name()
        _announce_build(cpp_extension, name)
        # -ffp-contract=off: no silent fused multiply-adds, so that the operators and the whole step, compiled
        # separately, round alike (the step is tested bitwise against the operators)
        cpp_extension.load(name=name, sources=[str(path) for path in SOURCES], is_python_module=False,
                           extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
                           extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # no compiler, no ninja, a build error: the PyTorch path still works
        return None, f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
    _register_fakes()
    return torch.ops.dsmoe_cpu, None


def _announce_build(cpp_extension, name: str) -> None:
    """Say on stderr when the load will build (a silent ~45 s looks like a hang) or wait for another process's
    build; remove a lock older than any build, which a build killed mid-way leaves (torch would wait forever)."""
    try:  # a private helper of torch's: if it changes, only the announcement and the lock check are lost
        folder = Path(cpp_extension._get_build_directory(name, verbose=False))
    except Exception:
        return
    lock = folder / "lock"
    try:
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_SECONDS:
            log.warning("removing %s, left %.0f min ago by a CPU-kernel build that did not finish", lock,
                        (time.time() - lock.stat().st_mtime) / 60)
            lock.unlink()
        else:
            print(f"dsmoe: waiting for another process building the CPU decode kernels (lock {lock})",
                  file=sys.stderr, flush=True)
            return
    except FileNotFoundError:
        pass
    if not (folder / f"{name}.so").exists():
        print("dsmoe: building the CPU decode kernels (once per checkout, machine and torch version, ~45 s on "
              "2 cores)", file=sys.stderr, flush=True)


def _register_fakes() -> None:
    """Shape functions, so that torch.compile can trace through the kernels (they stay opaque calls)."""

    @torch.library.register_fake("dsmoe_cpu::linear")
    def _linear(x, w):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("dsmoe_cpu::swiglu")
    def _swiglu(x, w1, w3):
        return x.new_empty(x.shape[0], w1.shape[0])

    @torch.library.register_fake("dsmoe_cpu::moe_experts")
    def _moe(x, indices, gate, w1, w2, w3):
        return x.new_empty(x.shape)

    @torch.library.register_fake("dsmoe_cpu::rms_norm")
    def _rms_norm(x, weight, eps):
        both_half = x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
        return x.new_empty(x.shape, dtype=torch.bfloat16 if both_half else torch.float32)

    @torch.library.register_fake("dsmoe_cpu::rope")
    def _rope(x, cos, sin, interleaved):
        return x.new_empty(x.shape)

    @torch.library.register_fake("dsmoe_cpu::route")
    def _route(x, weight, bias, sigmoid, top_k, n_group, topk_group, group_mode, normalise, scale, scaling):
        return (x.new_empty(x.shape[0], top_k, dtype=torch.float32),
                x.new_empty(x.shape[0], top_k, dtype=torch.long))

    @torch.library.register_fake("dsmoe_cpu::mla_project")
    def _mla_project(x, attn_norm, attn_eps, wq_a, q_norm, q_eps, wq, wkv_a, kv_norm, kv_eps, cos, sin,
                     interleaved, nope_dim, rope_dim):
        heads = wq.shape[0] // (nope_dim + rope_dim)
        return (x.new_empty(x.shape[0], heads, nope_dim), x.new_empty(x.shape[0], heads, rope_dim),
                x.new_empty(x.shape[0], wkv_a.shape[0]))

    @torch.library.register_fake("dsmoe_cpu::mlp_block")
    def _mlp_block(x, norm, eps, w1, w3, w2):
        return x.new_empty(x.shape)

    @torch.library.register_fake("dsmoe_cpu::moe_block")
    def _moe_block(x, norm, eps, gate, bias, sigmoid, top_k, n_group, topk_group, group_mode, normalise, scale,
                   scaling, w1, w2, w3, sw1, sw3, sw2):
        return x.new_empty(x.shape)

    @torch.library.register_fake("dsmoe_cpu::mla_decode")
    def _mla_decode(q_nope, q_pe, latent, wkv_b, v_dim, scale, mask):
        return q_nope.new_empty(q_nope.shape[0], q_nope.shape[1] * v_dim)


__all__ = ["MAX_TOKENS", "SOURCES", "cpu_kernels", "kernels", "small_batch_kernels", "unavailable_reason"]

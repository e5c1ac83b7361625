"""A decode step of fixed shapes, for capture in a CUDA graph (one launch per step instead of hundreds).

The eager step (`model(token, cache=cache, start=p)`) slices the cache to the p + 1 keys written so far and
builds positions from the Python int p: every step has new shapes and new constants, which a CUDA graph
cannot replay. `StaticDecodeStep` computes the same thing with shapes that never change: the position is a
device tensor, the new key/value (or MLA latent) is written with index_copy_ at that position, attention
runs over the cache's whole capacity L with a mask hiding keys after p (and each row's left padding), and
the rope angles come from the position tensor. Its logits equal the eager step's up to float rounding
(tests/test_decode_graph.py, on the CPU). `CUDAGraphDecodeStep` captures it once per batch bucket and
replays it (torch.cuda.CUDAGraph); batches are padded up to the next bucket (`bucket_for`) with dummy rows
whose outputs are dropped, so a few graphs serve every batch size.

Not covered (ValueError): sliding-window layers (rolling cache) and DeepSeek-V3.2's sparse attention.
A capturable step must not synchronise with the host: on CUDA the MoE layers then need the grouped-GEMM
path (bf16 on SM80+, torch >= 2.9); the fp32 per-expert loop reads expert counts on the host and cannot be
captured. The CUDA part is untested until scripts/gpu_check.sh has passed on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .model import Transformer
from .model.cache import KVCache, LatentCache, ModelCache

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def bucket_for(batch: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket >= batch; ValueError naming both when the batch exceeds the largest."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    for b in sorted(buckets):
        if b >= batch:
            return b
    raise ValueError(f"batch {batch} exceeds the largest decode bucket {max(buckets)}")


class _StaticKV:
    """A KVCache seen through a fixed write slot: update() writes at self.pos and returns all L slots."""

    def __init__(self, inner: KVCache, pos: torch.Tensor) -> None:
        self.inner, self.pos = inner, pos

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.inner.k.index_copy_(2, self.pos, k)  # k (B, G, 1, D)
        self.inner.v.index_copy_(2, self.pos, v)
        return self.inner.k, self.inner.v


class _StaticLatent:
    """A LatentCache seen through a fixed write slot (MLA): [c_kv | k_pe] written at self.pos, all L returned."""

    def __init__(self, inner: LatentCache, pos: torch.Tensor) -> None:
        self.inner, self.pos, self.kv_rank = inner, pos, inner.kv_rank

    def update(self, start: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        self.inner.latent.index_copy_(1, self.pos, torch.cat((c_kv, k_pe), dim=-1))  # (B, 1, C + R)
        return self.inner.latent


class StaticDecodeStep:
    """One-token decode steps over `cache` with fixed shapes (module doc); any device.

    model: eval mode. cache: model.make_cache(B, L), already holding the prompt (prefilled eagerly).
    pad (B,) long or None: each row's left padding, as given to the prefill.
    __call__(token (B,) long, position int) -> logits (B, V) fp32 of the token at slot `position`, the
    cache updated; the same as model(token[:, None], cache=cache, start=position, pad=pad)[:, -1].
    """

    def __init__(self, model: Transformer, cache: ModelCache, pad: torch.Tensor | None = None) -> None:
        config = model.config
        if config.uses_dsa:
            raise ValueError("static decode steps do not cover DeepSeek-V3.2 sparse attention (DSA)")
        if any(not isinstance(c, (KVCache, LatentCache)) for c in cache.layers):
            raise ValueError("static decode steps do not cover sliding-window (rolling) caches")
        self.model = model
        device = model.embed.weight.device
        B = cache.layers[0].k.shape[0] if isinstance(cache.layers[0], KVCache) else cache.layers[0].latent.shape[0]
        self.batch, self.capacity = B, cache.capacity
        # Static inputs: written in place before each step (a replayed graph reads these very tensors).
        self.token = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.pad = (torch.zeros(B, dtype=torch.long, device=device) if pad is None
                    else pad.to(device=device, dtype=torch.long).clone())
        self.keys = torch.arange(cache.capacity, device=device)  # (L,)
        layers = cache.layers[: config.num_hidden_layers]
        self.layers = [_StaticKV(c, self.pos) if isinstance(c, KVCache) else _StaticLatent(c, self.pos) for c in layers]

    @torch.no_grad()
    def compute(self) -> torch.Tensor:
        """The step on the static inputs -> logits (B, V) fp32. Capturable: no host reads, fixed shapes."""
        return _static_step(self)

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        if not 0 <= position < self.capacity:
            raise ValueError(f"position {position} is outside the cache (capacity {self.capacity})")
        self.token.copy_(token.view(-1, 1))
        self.pos.fill_(position)
        return self.compute()


def _static_step(step: StaticDecodeStep) -> torch.Tensor:
    """StaticDecodeStep.compute's body: a free function, so that one torch.compile of it serves every step object
    (dynamo keys its compiled code on this function and guards on the shapes it sees)."""
    model, keys = step.model, step.keys
    # a row's real keys: from its padding on, up to the new token; padding slots never (the new token
    # always sees itself, as in Transformer.positions_and_mask)
    visible = (keys[None, :] >= step.pad[:, None]) & (keys[None, :] <= step.pos)  # (B, L)
    mask = visible[:, None, None, :]  # (B, 1, 1, L)
    positions = (step.pos - step.pad).clamp(min=0)[:, None]  # (B, 1)
    x = model.embed(step.token)
    rope = model.rope(positions, x.dtype)
    for block, cache in zip(model.layers, step.layers):
        x = block(x, rope, cache, 0, mask)
    return model.head(model.norm(x)[:, -1]).float()


class CompiledDecodeStep(StaticDecodeStep):
    """StaticDecodeStep compiled by torch.compile (inductor), for the CPU above all (issue 16).

    An eager decode step dispatches ~1000 PyTorch operators, most of them tiny (norms, rope, residuals, the
    router's arithmetic): on a CPU that overhead costs more than the matrix products. Compiled, the elementwise
    work becomes a few fused C++ loops and the matrix products stay calls to dsmoe's decode kernels
    (ops/cpu_kernels.py), which torch.compile sees as opaque operators. The first step of a new shape compiles
    (~15-30 s on 2 cores; PyTorch caches the generated code on disk, so later processes load it faster);
    after a second shape PyTorch recompiles once with symbolic sizes and reuses that for any cache length.
    Same results as StaticDecodeStep (tests/test_decode_graph.py); the eager step stays the slow twin.
    """

    def __init__(self, model: Transformer, cache: ModelCache, pad: torch.Tensor | None = None) -> None:
        super().__init__(model, cache, pad)
        if self.token.device.type == "cpu":
            from .ops.cpu_kernels import kernels

            kernels()  # built or loaded here, outside the traced code (the loader takes a lock)

    @torch.no_grad()
    def compute(self) -> torch.Tensor:
        return _compiled_for(self.model)(self)


def _compiled_for(model: Transformer):
    """The compiled step function of this model instance, made once and kept on the model.

    One compiled function per model, so that its guards can skip the model's modules and parameters
    (torch.compiler.skip_guard_on_all_nn_modules_unsafe): evaluating guards on every parameter cost ~0.3 ms a
    step, and a model's structure does not change while it decodes; the guards on the step's own tensors (batch,
    cache length) stay. The parameters are inputs of the compiled code, not constants baked into it."""
    compiled = model.__dict__.get("_dsmoe_compiled_step")
    if compiled is None:
        compiled = torch.compile(_static_step,
                                 options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        model.__dict__["_dsmoe_compiled_step"] = compiled
    return compiled


class CUDAGraphDecodeStep(StaticDecodeStep):
    """StaticDecodeStep captured once in a CUDA graph, then replayed each step (CUDA only).

    The capture runs a few warm-up steps on a side stream first (as torch.cuda.graphs requires); those
    steps write their keys at slot `position` of the first call, which that call then overwrites, so the
    cache ends as an eager step would leave it. Returns a view of the graph's static output: copy it
    before the next call if it must be kept.
    """

    def __init__(self, model: Transformer, cache: ModelCache, pad: torch.Tensor | None = None,
                 warmup: int = 2) -> None:
        super().__init__(model, cache, pad)
        if self.token.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, not {self.token.device}")
        from .ops.dispatch import grouped_mm_usable

        moes = model.moe_layers()
        if moes and not grouped_mm_usable(model.embed.weight[:1], moes[0].experts.w1):
            # the per-expert loop reads expert counts on the host, which a capture forbids
            raise ValueError(f"CUDA graph decoding needs the grouped-GEMM MoE path (bf16 weights on SM80+, "
                             f"torch >= 2.9); this model is {model.embed.weight.dtype}")
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _capture(self) -> None:
        stream = torch.cuda.Stream(self.token.device)
        stream.wait_stream(torch.cuda.current_stream(self.token.device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.compute()
        torch.cuda.current_stream(self.token.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.compute()

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        if not 0 <= position < self.capacity:
            raise ValueError(f"position {position} is outside the cache (capacity {self.capacity})")
        self.token.copy_(token.view(-1, 1), non_blocking=True)
        self.pos.fill_(position)
        if self.graph is None:
            self._capture()  # records the kernels only: the replay below runs the step
        self.graph.replay()
        return self.logits


__all__ = ["CUDAGraphDecodeStep", "CompiledDecodeStep", "DEFAULT_BUCKETS", "StaticDecodeStep", "bucket_for"]

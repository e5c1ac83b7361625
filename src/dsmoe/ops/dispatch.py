"""Token dispatch to stacked SwiGLU experts: a plain reference loop and a sorted grouped path.

Both take the same arguments and return the same thing:
    x        (T, D)     tokens
    indices  (T, K)     expert picked in each of a token's K slots
    weights  (T, K)     gate weight of each slot (fp32 from the router)
    w1, w3   (E, I, D)  gate / up projections of every expert, stacked
    w2       (E, D, I)  down projection
    keep     (T, K)     optional bool: False for pairs dropped by a capacity (dsmoe.ops.capacity), which are
                        neither computed nor added
    -> (T, D)  sum over kept slots of weight * expert(x)
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from .cpu_kernels import small_batch_kernels
from .weight_only import widen_for_cpu


def _hidden(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """An expert's SwiGLU activation: x (n, D), w1/w3 (I, D) -> silu(x w1^T) * (x w3^T), (n, I)."""
    return F.silu(F.linear(x, w1)) * F.linear(x, w3)


def _swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """One expert on its tokens: x (n, D), w1/w3 (I, D), w2 (D, I) -> (n, D)."""
    return F.linear(_hidden(x, w1, w3), w2)


def expert_loop(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: for every expert, find its tokens with a mask and run them. Slow, obviously right."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w1.shape[0]):
        token, slot = torch.where(indices == e if keep is None else (indices == e) & keep)
        if token.numel() == 0:
            continue
        y = _swiglu(x[token], w1[e], w2[e], w3[e])
        out.index_add_(0, token, y.float() * weights[token, slot, None])
    return out.to(x.dtype)


def sorted_dispatch(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                    w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, keep: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Sort the T*K (token, slot) pairs by expert once, run every expert on its contiguous slice, and sum the
    weighted results back per token (_combine). No per-expert masks, no per-token weight gathers. The gate
    weights are cast to x's dtype, as transformers does (bf16 gates in bf16).

    The experts run as three grouped GEMMs (`_grouped_experts`) where torch has them for this device and
    dtype, else one matmul per non-empty expert (`_looped_experts`); the two agree to one rounding step.
    The gate weight scales the expert's I-wide hidden activation rather than its D-wide output (the same
    product, w2 being linear; I < D for fine-grained experts).

    Dropped pairs (keep False) are sorted behind every expert as a virtual expert E and cut off."""
    T, K = indices.shape
    E = w1.shape[0]
    kernels = small_batch_kernels(x, w1, w2, w3) if keep is None else None
    if kernels is not None:  # a CPU decode step of <= 8 tokens: the picked experts' weights read in place
        return kernels.moe_experts(x, indices, weights, w1, w2, w3)
    autograd = torch.is_grad_enabled() and any(w.requires_grad for w in (x, weights, w1, w2, w3))
    if T == 1 and not autograd and x.device.type == "cpu":  # on CUDA its .tolist() calls would sync the host
        return _one_token(x, indices, weights, w1, w2, w3, keep)
    flat = indices.reshape(-1).long()  # (T*K,)
    if keep is not None:
        flat = torch.where(keep.reshape(-1), flat, E)
    order = flat.argsort(stable=True)  # (T*K,) pair ids grouped by expert
    # Counted with a scatter rather than bincount, whose output size needs the maximum on the host: the
    # grouped path then runs without a host sync on CUDA (when nothing is dropped).
    counts = flat.new_zeros(E + 1).scatter_add_(0, flat, torch.ones_like(flat))  # (E + 1,), [E] = dropped
    if keep is not None:
        order = order[:T * K - int(counts[E])]  # the kept pairs
    counts = counts[:E]
    token = order // K  # token of each sorted pair
    xs = x.index_select(0, token)  # (P, D), contiguous per expert; P = T*K pairs, fewer if some were dropped
    gates = weights.reshape(-1).index_select(0, order).unsqueeze(1).to(x.dtype)  # (P, 1)
    if _prefer_grouped(xs, w1, autograd):
        ys = _grouped_experts(xs, gates, counts, w1, w2, w3)
    else:
        ys = _looped_experts(xs, gates, counts.tolist(), w1, w2, w3, autograd)
    return _combine(ys, token, order, T, K)


def _prefer_grouped(xs: torch.Tensor, w1: torch.Tensor, autograd: bool) -> bool:
    """Grouped GEMMs wherever torch has them, except a no-grad CPU forward whose experts average 16+ rows (a
    prefill): there the loop writes each expert's rows in place, and in bf16 its matmuls are 1.05-1.1x faster
    (bench model, 4 x 512, A/B in one process); fp32 is as fast either way, and the grouped call's whole-batch
    intermediates raised the forward's peak RSS from 64 to 100 MiB. With fewer rows (a batch-8 decode step) the
    grouped call is 1.03-1.07x faster in bf16, and in training 1.03-1.07x in bf16 (fp32 within 1-4% either way)."""
    if not grouped_mm_usable(xs, w1) or (not autograd and widen_for_cpu(xs, w1)):
        return False  # (the loop widens bf16 experts to fp32 one at a time on CPUs without bf16 arithmetic)
    cpu_prefill = xs.device.type == "cpu" and not autograd and xs.shape[0] >= 16 * w1.shape[0]
    return not cpu_prefill


def grouped_mm_usable(xs: torch.Tensor, w1: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM takes these operands: torch >= 2.9 (CPU: fp32 / bf16 / fp16; CUDA: bf16
    on SM80+) with every row a multiple of 16 bytes, in the dtype the GEMMs would run in (autocast's)."""
    if _GROUPED_MM is None:
        return False
    dtype = _compute_dtype(xs)
    if xs.device.type == "cpu":
        supported = dtype in (torch.float32, torch.bfloat16, torch.float16)
    elif xs.device.type == "cuda":
        supported = dtype == torch.bfloat16 and torch.cuda.get_device_capability(xs.device) >= (8, 0)
    else:
        supported = False
    return supported and all(n * dtype.itemsize % 16 == 0 for n in w1.shape[1:])


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer on x computes in: autocast's where it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


# The public name from torch 2.10, the private one before. torch 2.8 has the private op but no CPU kernel and
# a CUDA one for SM90 only; 2.9 brought both, so older versions use the per-expert loop.
_GROUPED_MM = ((getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None))
               if tuple(map(int, re.match(r"(\d+)\.(\d+)", torch.__version__).groups())) >= (2, 9) else None)


def _grouped_experts(xs: torch.Tensor, gates: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor,
                     w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """Every expert on its rows of xs (P, D) as three grouped GEMMs (one kernel launch each on CUDA, one call
    each on the CPU: no per-expert Python, no concatenation, and a backward that writes the stacked weight
    gradients directly; on the CPU the MoE layers alone train 1.1x (fp32) to 1.25x (bf16) faster than with
    `_looped_experts`, a whole model's step 1.03-1.07x in bf16, within noise in fp32)."""
    # grouped_mm is not autocast-aware: under autocast, cast every operand of every GEMM as F.linear would (xs
    # once per GEMM, so that its two gradients are summed in xs's dtype, as with F.linear). Without autocast
    # mixed dtypes are an error, as they are for F.linear.
    cast = (lambda t: t.to(_compute_dtype(xs))) if torch.is_autocast_enabled(xs.device.type) else (lambda t: t)
    w1, w2, w3 = cast(w1), cast(w2), cast(w3)
    ends = counts.cumsum(0).to(torch.int32)  # (E,) where each expert's rows end
    h1 = _GROUPED_MM(cast(xs), w1.transpose(1, 2), offs=ends)
    h = F.silu(h1) * _GROUPED_MM(cast(xs), w3.transpose(1, 2), offs=ends)  # (P, I)
    return _GROUPED_MM(cast(h * gates), w2.transpose(1, 2), offs=ends)  # (P, D)


def _looped_experts(xs: torch.Tensor, gates: torch.Tensor, counts: list[int], w1: torch.Tensor,
                    w2: torch.Tensor, w3: torch.Tensor, autograd: bool) -> torch.Tensor:
    """The same as `_grouped_experts` with one matmul per non-empty expert (any torch, device and dtype)."""
    D = w2.shape[1]
    used = [e for e, n in enumerate(counts) if n]  # experts with tokens, in sorted order
    sizes = [counts[e] for e in used]
    # split, not slicing: a slice's backward is a zero tensor the size of all pairs plus an add, per expert.
    chunks = zip(used, xs.split(sizes), gates.split(sizes))
    if autograd:
        # unbind, not w1[e], for the same reason (its backward would be a zero tensor the size of all experts).
        w1, w2, w3 = w1.unbind(0), w2.unbind(0), w3.unbind(0)
        outs = [F.linear(_hidden(xe, w1[e], w3[e]) * ge, w2[e]) for e, xe, ge in chunks]
        return torch.cat(outs) if outs else xs.new_zeros(0, D, dtype=_compute_dtype(xs))
    # Without autograd w1[e] is a free view, and each expert writes its rows of ys in place: with out= in
    # fp32 (MKL); other dtypes go through oneDNN, whose out= into a view makes a new primitive for most
    # calls once the per-expert row counts vary (2.7x slower bf16 training steps when tried there).
    ys = xs.new_empty(xs.shape[0], D, dtype=_compute_dtype(xs))  # F.linear's output dtype
    if widen_for_cpu(xs, w1):  # bf16 weights, no bf16 arithmetic on this CPU: each expert in fp32
        for (e, xe, ge), ye in zip(chunks, ys.split(sizes)):
            h = _hidden(xe.float(), w1[e].float(), w3[e].float()) * ge.float()
            ye.copy_(torch.mm(h, w2[e].float().t()))
        return ys
    for (e, xe, ge), ye in zip(chunks, ys.split(sizes)):
        h = _hidden(xe, w1[e], w3[e]) * ge
        if ys.dtype == torch.float32:
            torch.mm(h, w2[e].t(), out=ye)
        else:
            ye.copy_(F.linear(h, w2[e]))
    return ys


def _one_token(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
               w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """A single token (a batch-1 decode step), no autograd: its K experts in turn, each output added with its
    gate weight as alpha into an fp32 accumulator. Skips the sort, gathers and scatter that only pay off
    when experts share tokens: 1.5x faster per MoE layer here."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    kept = [True] * indices.shape[1] if keep is None else keep[0].tolist()
    for e, gate, kept_pair in zip(indices[0].tolist(), weights[0].tolist(), kept):
        if kept_pair:
            out.add_(_swiglu(x, w1[e], w2[e], w3[e]), alpha=gate)
    return out.to(x.dtype)


def _combine(ys: torch.Tensor, token: torch.Tensor, order: torch.Tensor, T: int, K: int) -> torch.Tensor:
    """Sum the expert-sorted pair outputs ys (P, D) into their tokens -> (T, D), accumulating in fp32;
    P = T*K, or fewer when pairs were dropped (the missing ones then count as zero rows).

    fp32: scatter-add in place (index_add_). Lower precision: back to (token, slot) order and a sum over the
    K slots, which accumulates in fp32 internally; scatter-adding would need an fp32 copy of all of ys
    first (measured: bf16 forward 1.28x faster this way, fp32 forward 1.07x slower)."""
    if ys.dtype == torch.float32:
        return torch.zeros(T, ys.shape[1], dtype=ys.dtype, device=ys.device).index_add_(0, token, ys)
    if order.numel() < T * K:  # dropped pairs: zero rows in their (token, slot) places
        full = ys.new_zeros(T * K, ys.shape[1]).index_copy(0, order, ys)
        return full.view(T, K, ys.shape[1]).sum(dim=1)
    unsort = torch.empty_like(order)
    unsort[order] = torch.arange(order.numel(), device=order.device)
    return ys.index_select(0, unsort).view(T, K, ys.shape[1]).sum(dim=1)


DISPATCH = {"loop": expert_loop, "sorted": sorted_dispatch}

"""Autoregressive generation: one prefill forward, then one cached token per step; sampling; and
speculative decoding with DeepSeek-V3's MTP module as the drafter.

Prompts of different lengths are left-padded into one batch; the model gives each row's real tokens the
positions they would have alone and masks the padding (Transformer.positions_and_mask), so a batched
row decodes the same tokens as that prompt alone.

Devices: every tensor made here (prompt batch, pad counts, stop ids, finished-row flags, the sampling
generator) lives on the model's device (that of its embedding). Host synchronisations left in the plain
decode loop on CUDA: the finished-rows test `done.all()` after each step, only when stop ids are given
(to end the stream early), and whatever the consumer does with the yielded tokens (`.tolist()`).
The prompt check (check_input: id range) syncs once before the loop. Speculative decoding syncs once per
step by nature (whether the draft was accepted decides the next step's shape). Seeded sampling draws from a
generator on the model's device, so the same seed gives different (each reproducible) samples on CPU and CUDA.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .model import Transformer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    drafted: int = 0  # speculative: MTP tokens proposed
    accepted: int = 0  # speculative: of which the main model agreed

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). Greedy at temperature 0. No host synchronisation."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # The best logit becomes 0 before the division, so a tiny temperature gives -inf for the others, never
    # inf - inf = NaN.
    logits = (logits.float() - logits.float().amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the tokens before it already cover top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _check_args(max_new_tokens: int, temperature: float, top_k: int | None,
                top_p: float | None) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _batch_prompts(input_ids: torch.Tensor | Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) tensor or lists of different lengths -> left-padded (B, T) ids and pad counts (or None)."""
    if isinstance(input_ids, torch.Tensor):
        # any integer dtype; floats would be truncated by .long() (shape and range: model.check_input)
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        return input_ids.long(), None
    prompts = [list(p) for p in input_ids]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    for row, p in enumerate(prompts):
        bad = next((t for t in p if not isinstance(t, numbers.Integral) or isinstance(t, bool)), None)
        if bad is not None:
            raise ValueError(f"prompt {row} holds {bad!r}: token ids must be integers")
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
    pad = torch.tensor([width - len(p) for p in prompts])
    return ids, (pad if pad.any() else None)


def _eos_set(eos_token_id: int | Sequence[int] | None) -> torch.Tensor | None:
    """The stop ids as a tensor; None (never stop early) for None or an empty list."""
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"eos_token_id must be a token id or a list of them, got {eos_token_id!r}")
    return torch.tensor(list(ids), dtype=torch.long) if ids else None


@torch.no_grad()
def stream(model: Transformer, input_ids: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           eos_token_id: int | Sequence[int] | None = None, seed: int | None = None,
           speculative: bool = False, stats: GenerationStats | None = None,
           sync: Callable[[torch.Tensor], torch.Tensor] | None = None,
           cuda_graph: bool = False, compiled: bool = False, prefill_chunk: int | None = None
           ) -> Iterator[torch.Tensor]:
    """Yield new tokens as they are decided: (B, n) per step (n = 1, or 2 when a draft is accepted).
    Rows that have emitted EOS yield their EOS id again as padding; the stream ends when every row has
    finished or max_new_tokens were produced.

    sync: applied to each sampled token batch, e.g. a broadcast from rank 0 when experts are sharded, so
    that every rank feeds the same tokens (and runs the same collectives) at every step.
    cuda_graph: decode steps replayed from a CUDA graph captured once for this batch (dsmoe.decode_graph;
    CUDA, bf16 MoE weights; ValueError otherwise). Untested until scripts/gpu_check.sh passes on a GPU.
    compiled: decode steps through torch.compile (dsmoe.decode_graph.CompiledDecodeStep); the first step of a new
    shape compiles (~15 s on 2 cores). Same tokens as the eager step. ValueError for models it does not cover
    (V3.2 sparse attention, sliding windows, V4).
    Without either, plain decoding of at most 8 rows on the CPU runs through dsmoe's decode kernels
    (dsmoe.kernel_step.KernelDecodeStep; for MLA models the whole step is one C++ call): the eager step's tokens
    at several times its speed. DSMOE_CPU_KERNELS=0 (or dsmoe.ops.cpu_kernels.cpu_kernels(False)) keeps the
    eager step; so do sliding-window, V3.2, V4, sharded and speculative decoding.
    prefill_chunk: write the prompt into the cache in forwards of at most this many positions (None: one
    forward). The prefill's activations (MoE dispatch buffers, attention scores, the MLP's hidden states)
    then scale with the chunk instead of the prompt, which bounds the peak memory of a long prompt; the
    tokens are the same up to float rounding. Plain decoding only: speculative decoding, and DeepSeek-V4
    models (their compressed caches), prefill in one forward.
    """
    _check_args(max_new_tokens, temperature, top_k, top_p)
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                      or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk must be a positive integer or None, got {prefill_chunk!r}")
    device = model.embed.weight.device
    ids, pad = _batch_prompts(input_ids)
    ids, pad = ids.to(device), None if pad is None else pad.to(device)
    model.check_input(ids, 0)
    B, T = ids.shape
    capacity = T + max_new_tokens  # speculative steps never write past the last emitted token's slot either
    if capacity > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings={model.config.max_position_embeddings}")
    eos = _eos_set(eos_token_id)
    eos = None if eos is None else eos.to(device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens += int(ids.numel() - (0 if pad is None else pad.sum()))
    began = time.perf_counter()
    if max_new_tokens == 0:
        return
    if cuda_graph and compiled:
        raise ValueError("pass one of cuda_graph / compiled")
    if speculative:
        if cuda_graph or compiled:
            raise ValueError("speculative decoding does not use compiled or graphed steps: pass one of "
                             "speculative / cuda_graph / compiled")
        if sync is not None:
            raise ValueError("speculative decoding is not supported with sharded experts")
        steps = _speculative(model, ids, max_new_tokens, capacity, stats)
    else:
        if (cuda_graph or compiled) and sync is not None:
            raise ValueError("compiled / CUDA graph decoding is not supported with sharded experts "
                             "(collectives per step)")
        steps = _plain(model, ids, pad, max_new_tokens, capacity, temperature, top_k, top_p, generator, sync,
                       cuda_graph, compiled, prefill_chunk)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    produced = 0
    for tokens in steps:  # (B, n)
        tokens = tokens[:, : max_new_tokens - produced]
        if eos is not None:
            # a row that finished keeps emitting its EOS as padding; it finishes at its first EOS
            hit = torch.isin(tokens, eos)
            after = done[:, None] | (hit.cumsum(dim=1) - hit.long() > 0)
            tokens = torch.where(after, eos[0], tokens)
            done |= hit.any(dim=1)
        produced += tokens.shape[1]
        stats.new_tokens += tokens.shape[1] * B
        stats.seconds = time.perf_counter() - began
        yield tokens
        if produced >= max_new_tokens or (eos is not None and bool(done.all())):  # the one sync per step
            return


def _plain(model: Transformer, ids: torch.Tensor, pad: torch.Tensor | None, max_new_tokens: int, capacity: int,
           temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None,
           sync: Callable[[torch.Tensor], torch.Tensor] | None = None, cuda_graph: bool = False,
           compiled: bool = False, prefill_chunk: int | None = None) -> Iterator[torch.Tensor]:
    B, T = ids.shape
    if pad is not None and model.config.model_type == "deepseek_v4":  # positional windows: one cache per row
        from .generate_v4 import plain_rows

        yield from plain_rows(model, ids, pad, max_new_tokens,
                              lambda logits: sample(logits, temperature, top_k, top_p, generator), sync)
        return
    cache = model.make_cache(B, capacity)
    fixed_step = None
    if cuda_graph:  # checked before the prefill: a refusal costs nothing
        from .decode_graph import CUDAGraphDecodeStep
        fixed_step = CUDAGraphDecodeStep(model, cache, pad)
    elif compiled:
        from .decode_graph import CompiledDecodeStep
        fixed_step = CompiledDecodeStep(model, cache, pad)
    elif sync is None and ids.device.type == "cpu":
        from .kernel_step import KernelDecodeStep

        if KernelDecodeStep.supports(model, cache, B):  # the eager step's fast twin (see kernel_step.py)
            fixed_step = KernelDecodeStep(model, cache, pad)
    # Prefill in one forward (or chunks); only the last position's logits are needed (the head is ~20% of a
    # prefill). stream() validated the prompt; sampled tokens are in the vocabulary: no per-step id checks below.
    if prefill_chunk is None or model.config.model_type == "deepseek_v4":
        prefill_chunk = T
    for begin in range(0, T, prefill_chunk):
        h = model.hidden_states(ids[:, begin:begin + prefill_chunk], cache, begin, pad=pad, check=False)[:, -1]
    logits = model.head(h).float()
    for step in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)
        if sync is not None:
            token = sync(token)
        yield token[:, None]
        if step + 1 < max_new_tokens:
            if fixed_step is not None:
                logits = fixed_step(token, T + step)  # the graph's output buffer: sampled before the next replay
            else:
                logits = model(token[:, None], cache=cache, start=T + step, pad=pad, check=False)[:, -1]


def _speculative(model: Transformer, ids: torch.Tensor, max_new_tokens: int, capacity: int,
                 stats: GenerationStats) -> Iterator[torch.Tensor]:
    """Greedy decoding with the first MTP module drafting one token ahead (DeepSeek-V3 section 5.4.3).

    Each step verifies [t, draft] in one forward: the main model's own greedy choice after t is always
    what is emitted, so the output equals plain greedy decoding; the draft only saves a step when the
    two agree. MTP slot i holds the MTP block's latent for (h_i, Emb(t_{i+1})).
    """
    if not model.mtp:
        raise ValueError("speculative decoding needs a model with MTP modules (num_nextn_predict_layers > 0 "
                         "and MTP weights in the checkpoint)")
    if ids.shape[0] != 1:
        raise ValueError(f"speculative decoding takes one prompt at a time, got {ids.shape[0]}")
    if model.config.model_type == "deepseek_v4":  # V4's caches roll back differently (see generate_v4)
        from .generate_v4 import speculative_v4

        yield from speculative_v4(model, ids, stats)
        return
    T = ids.shape[1]
    cache = model.make_cache(1, capacity, extra_layers=1)
    main_cache, mtp_cache = cache, cache.layers[-1]

    def draft(h: torch.Tensor, next_ids: torch.Tensor, start: int) -> torch.Tensor:
        h_mtp = model.mtp_hidden(0, h, next_ids, mtp_cache, start)
        return model.head(model.mtp[0].norm(h_mtp[:, -1])).argmax(dim=-1)  # (1,)

    h = model.hidden_states(ids, main_cache, check=False)  # (1, T, D), validated by stream()
    token = model.head(h[:, -1]).argmax(dim=-1)  # (1,)
    guess = draft(h, torch.cat((ids[:, 1:], token[:, None]), dim=1), 0)
    pos = T  # slot of `token`
    while True:
        yield token[:, None]
        if pos + 2 > capacity:  # the caller stops before this; never write past the cache
            return
        h = model.hidden_states(torch.stack((token, guess), dim=1), main_cache, pos, check=False)  # (1, 2, D)
        best = model.head(h).argmax(dim=-1)  # (1, 2): after token, after guess
        stats.drafted += 1
        if bool(best[0, 0] == guess[0]):
            stats.accepted += 1
            yield guess[:, None]
            token = best[:, 1]
            guess = draft(h, torch.stack((guess, token), dim=1), pos)
            pos += 2
        else:
            token = best[:, 0]
            guess = draft(h[:, :1], token[:, None], pos)
            pos += 1


def generate(model: Transformer, input_ids: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = None, seed: int | None = None,
             speculative: bool = False, stats: GenerationStats | None = None,
             cuda_graph: bool = False, compiled: bool = False, prefill_chunk: int | None = None
             ) -> torch.Tensor | list[list[int]]:
    """Prompts followed by their new tokens.

    input_ids: a (B, T) LongTensor -> a (B, T + n) tensor, rows that hit EOS padded with EOS after it;
    or a list of token lists (lengths may differ) -> a list of lists, each ending at its EOS if it met one.
    Greedy when temperature is 0; otherwise sampling with optional top-k / top-p, reproducible with seed.
    Runs on the model's device; a prompt tensor may be on any device.
    speculative: greedy decoding with the MTP module as drafter (same output as plain greedy).
    cuda_graph: replay decode steps from a CUDA graph (see stream).
    compiled: decode steps through torch.compile (see stream).
    prefill_chunk: prefill the prompt in forwards of at most this many positions (see stream).
    """
    if speculative and temperature != 0:
        raise ValueError("speculative decoding is greedy only: use temperature=0")
    new = list(stream(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed,
                      speculative, stats, cuda_graph=cuda_graph, compiled=compiled, prefill_chunk=prefill_chunk))
    device = model.embed.weight.device
    out = torch.cat([torch.zeros(len(input_ids), 0, dtype=torch.long, device=device), *new], dim=1)
    if isinstance(input_ids, torch.Tensor):  # returned on the device the prompt came on
        return torch.cat((input_ids.long(), out.to(input_ids.device)), dim=1)
    stops = _eos_set(eos_token_id)
    eos = set() if stops is None else set(stops.tolist())
    result = []
    for prompt, row in zip(input_ids, out.tolist()):
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))  # through the first EOS
        result.append(list(prompt) + row[:end])
    return result

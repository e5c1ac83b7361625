"""The scheduler: continuous batching of requests over the paged cache (single-threaded; see loop.py for
the background-thread EngineLoop).

Every `step()` builds one batch (SGLang / vLLM v1 style) under a token budget (max_tokens_per_step):
1. every running sequence with one token to compute (a decode), oldest first; when the pool has no block for
   one, the youngest unscheduled running sequence is preempted (its blocks freed, its tokens recomputed
   later) rather than anything failing;
2. the rest of prompts already being prefilled, in chunks that fit the remaining budget;
3. waiting requests, first in first out, while the running count, the budget and the pool allow: a request
   is admitted when the blocks of its whole prompt (less its prefix-cache hits) are free, and takes them all
   at once (so that admitted prompts never compete for blocks while they are prefilled in chunks).
A long prompt is thus prefilled in chunks between the decodes of the running streams instead of stalling
them. Requests join and leave the batch at every step.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generate import sample
from ..model import Transformer
from .blocks import CachePool, block_hash
from .protocol import EngineOverloaded, EngineStats, RequestOutput, RequestRejected, SamplingParams
from .runner import ModelRunner, Work

EventCallback = Callable[[RequestOutput], None]


@dataclass(eq=False)
class Sequence:
    """One request's state. tokens = prompt + generated; `computed` of them have keys in the cache."""

    request_id: str
    prompt_len: int
    params: SamplingParams
    on_event: EventCallback
    tokens: list[int]
    generator: torch.Generator | None
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # digests of blocks[:len(hashes)], all full
    computed: int = 0
    cached_prompt_tokens: int | None = None  # prefix hits at first admission
    finished: bool = False
    draft: int | None = None  # speculative: the MTP module's guess for the token after tokens[-1]

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


def validate_request(request_id: str, prompt_ids: list[int], params: SamplingParams, vocab_size: int,
                     max_context: int, pool_tokens: int, speculative: bool = False) -> None:
    """Raise RequestRejected naming the field when the request can never be served. speculative: whether
    the engine drafts with an MTP module (otherwise speculative requests are refused)."""
    if not isinstance(request_id, str) or not request_id:
        raise RequestRejected("request_id", f"request_id must be a non-empty string, got {request_id!r}")
    if not isinstance(prompt_ids, list | tuple) or not prompt_ids:
        raise RequestRejected("prompt", "the prompt must be a non-empty list of token ids")
    for i, t in enumerate(prompt_ids):
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
            raise RequestRejected("prompt", f"prompt token {i} is {t!r}, not a token id in [0, {vocab_size})")
    p = params
    if not isinstance(p.max_tokens, int) or isinstance(p.max_tokens, bool) or p.max_tokens < 1:
        raise RequestRejected("max_tokens", f"max_tokens must be an integer >= 1, got {p.max_tokens!r}")
    if not isinstance(p.temperature, int | float) or not math.isfinite(p.temperature) or p.temperature < 0:
        raise RequestRejected("temperature", f"temperature must be a finite number >= 0, got {p.temperature!r}")
    if p.top_p is not None and (not isinstance(p.top_p, int | float) or not 0 < p.top_p <= 1):
        raise RequestRejected("top_p", f"top_p must be in (0, 1], got {p.top_p!r}")
    if p.top_k is not None and (not isinstance(p.top_k, int) or p.top_k < 0):
        raise RequestRejected("top_k", f"top_k must be an integer >= 0 (0 = off), got {p.top_k!r}")
    if p.seed is not None and (not isinstance(p.seed, int) or isinstance(p.seed, bool)):
        raise RequestRejected("seed", f"seed must be an integer, got {p.seed!r}")
    if p.speculative and not speculative:
        raise RequestRejected("speculative", "speculative decoding needs an engine built with speculative=True "
                                             "over a model with an MTP module")
    if p.speculative and p.temperature != 0:
        raise RequestRejected("speculative", "speculative decoding is greedy only: use temperature 0")
    n = len(prompt_ids)
    if n > max_context:
        raise RequestRejected("prompt", f"the prompt has {n} tokens, more than the model's context of "
                                        f"{max_context}")
    if n + p.max_tokens > max_context:
        raise RequestRejected("max_tokens", f"prompt ({n} tokens) + max_tokens ({p.max_tokens}) = "
                                            f"{n + p.max_tokens} exceeds the model's context of {max_context}")
    # the last sampled token is never written to the cache (speculative: its draft is, when verified)
    positions = n + p.max_tokens - (0 if p.speculative else 1)
    if positions > pool_tokens:
        raise RequestRejected("max_tokens", f"prompt ({n} tokens) + max_tokens ({p.max_tokens}) needs "
                                            f"{positions} cache positions; the cache pool holds {pool_tokens}")


class Engine:
    """Continuous-batching engine over `model` and a CachePool. Not thread-safe: one thread calls add,
    abort and step (ThreadedEngine does that). Events go to each request's callback during step/abort."""

    def __init__(self, model: Transformer, pool: CachePool, max_running: int = 64, max_waiting: int = 256,
                 max_tokens_per_step: int = 512, prefix_caching: bool = True, speculative: bool = False) -> None:
        for name, value in (("max_running", max_running), ("max_waiting", max_waiting),
                            ("max_tokens_per_step", max_tokens_per_step)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if max_tokens_per_step < max_running:
            raise ValueError(f"max_tokens_per_step ({max_tokens_per_step}) must be >= max_running "
                             f"({max_running}): every running sequence decodes one token per step")
        if speculative and (not model.mtp or pool.extra_layers < 1):
            raise ValueError("speculative=True needs a model with an MTP module (num_nextn_predict_layers > 0 and "
                             "its weights) and a cache pool with extra_layers=1 for it")
        self.speculative = speculative
        self.drafted = self.accepted = 0  # speculative: drafts verified, and of which the main model agreed
        self.runner = ModelRunner(model, pool)
        self.model, self.pool, self.allocator = model, pool, pool.allocator
        self.block_size = pool.block_size
        self.max_running, self.max_waiting = max_running, max_waiting
        self.max_tokens_per_step = max_tokens_per_step
        self.prefix_caching = prefix_caching
        self.max_context = model.config.max_position_embeddings
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the youngest last
        self.requests: dict[str, Sequence] = {}
        self.counters = EngineStats(block_size=pool.block_size)

    # ------------------------------------------------------------------------------------------ requests
    def validate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        validate_request(request_id, prompt_ids, params, self.model.config.vocab_size, self.max_context,
                         self.pool.capacity_tokens, self.speculative)

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
            on_event: EventCallback) -> None:
        """Queue a request; RequestRejected / EngineOverloaded at once, otherwise events via on_event."""
        self.validate(request_id, prompt_ids, params)
        if request_id in self.requests:
            raise RequestRejected("request_id", f"request {request_id!r} is already in the engine")
        if len(self.waiting) >= self.max_waiting:
            raise EngineOverloaded(f"the waiting queue is full ({self.max_waiting} requests)")
        # the request's own generator, on the logits' device: a seeded sample ignores what else runs
        gen = (torch.Generator(self.runner.device).manual_seed(params.seed) if params.seed is not None else None)
        seq = Sequence(request_id, len(prompt_ids), params, on_event, list(prompt_ids), gen)
        self.requests[request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> None:
        """Free the request's blocks now and send its final "abort" event; unknown ids are ignored."""
        seq = self.requests.get(request_id)
        if seq is not None:
            self._finish(seq, "abort")

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def stats(self) -> EngineStats:
        """Gauges now, counters since the engine started."""
        return dataclasses.replace(self.counters, running=len(self.running), waiting=len(self.waiting),
                                   blocks_used=self.allocator.num_used, blocks_free=self.allocator.num_free,
                                   speculative_drafted=self.drafted, speculative_accepted=self.accepted)

    # ------------------------------------------------------------------------------------------- blocks
    def _reserve(self, seq: Sequence, positions: int) -> bool:
        """Give seq blocks for `positions` positions; False (nothing taken) when the pool lacks them."""
        need = -(-positions // self.block_size) - len(seq.blocks)
        if need > self.allocator.num_free:
            return False
        seq.blocks += [self.allocator.allocate() for _ in range(max(need, 0))]
        return True

    def _release(self, seq: Sequence) -> None:
        for block in reversed(seq.blocks):  # the tail first: an evicted prefix should lose its end first
            self.allocator.release(block)
        seq.blocks, seq.hashes, seq.computed = [], [], 0

    def _prefix_hits(self, seq: Sequence) -> None:
        """Take the cached full blocks that start seq's tokens (at least one token is left to compute)."""
        parent = seq.hashes[-1] if seq.hashes else b""
        P = self.block_size
        while (len(seq.blocks) + 1) * P <= len(seq.tokens) - 1:
            i = len(seq.blocks)
            digest = block_hash(parent, seq.tokens[i * P:(i + 1) * P])
            block = self.allocator.lookup(digest)
            if block is None:
                break
            seq.blocks.append(block)
            seq.hashes.append(digest)
            parent = digest
        seq.computed = len(seq.blocks) * P

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Hash the blocks that the last step filled, so later requests can share them."""
        P = self.block_size
        while (len(seq.hashes) + 1) * P <= seq.computed:
            i = len(seq.hashes)
            digest = block_hash(seq.hashes[-1] if seq.hashes else b"", seq.tokens[i * P:(i + 1) * P])
            self.allocator.register(seq.blocks[i], digest)
            seq.hashes.append(digest)

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and queue it first in line; its tokens (prompt + generated) are recomputed on
        readmission, mostly from the prefix cache when its blocks have not been reused meanwhile."""
        self.running.remove(seq)
        self._release(seq)
        seq.draft = None
        self.waiting.appendleft(seq)
        self.counters.preemptions += 1

    # ---------------------------------------------------------------------------------------- scheduling
    def schedule(self) -> list[tuple[Sequence, int]]:
        """This step's (sequence, new token count) pairs; allocates their blocks (see the module doc). A
        speculative decode counts 2: its last token and the MTP draft after it, verified in one forward."""
        budget = self.max_tokens_per_step
        batch: list[tuple[Sequence, int]] = []
        scheduled: set[int] = set()
        decodes = [s for s in self.running if len(s.tokens) - s.computed == 1]
        prefills = [s for s in self.running if len(s.tokens) - s.computed > 1]
        for seq in decodes + prefills:
            if seq not in self.running or budget == 0:
                continue
            n = min(len(seq.tokens) - seq.computed, budget)
            if seq.draft is not None and n == 1 and budget >= 2:
                n = 2  # verify the draft too (the token after it is dropped if max_tokens is reached first)
            while not self._reserve(seq, seq.computed + n):
                victim = next(s for s in reversed(self.running) if id(s) not in scheduled)
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                batch.append((seq, n))
                scheduled.add(id(seq))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if self.prefix_caching:
                self._prefix_hits(seq)
            remaining = -(-len(seq.tokens) // self.block_size) - len(seq.blocks)
            if remaining > self.allocator.num_free:
                self._release(seq)  # FIFO: the head waits for room, nobody overtakes it
                break
            self.waiting.popleft()
            if seq.cached_prompt_tokens is None:  # first admission: count the prefix-cache query
                seq.cached_prompt_tokens = min(seq.computed, seq.prompt_len)
                self.counters.prefix_cache_queried_tokens += seq.prompt_len
                self.counters.prefix_cache_hit_tokens += seq.cached_prompt_tokens
                self.counters.prompt_tokens += seq.prompt_len
            n = min(len(seq.tokens) - seq.computed, budget)
            self._reserve(seq, len(seq.tokens))  # the whole prompt now: later chunks never wait for blocks
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def step(self) -> bool:
        """Schedule, run the model once, sample and send events. False when there was nothing to run."""
        batch = self.schedule()
        if not batch:
            return False
        work = []
        for s, n in batch:
            verify = n > len(s.tokens) - s.computed
            tokens = s.tokens[s.computed:s.computed + n] + ([s.draft] if verify else [])
            work.append(Work(tokens, s.computed, s.blocks, 2 if verify else int(s.computed + n == len(s.tokens))))
        drafting = self.speculative and any(s.params.speculative for s, _ in batch)
        try:
            logits = self.runner.run(work, keep_hidden=drafting)
            logits, hidden = logits if drafting else (logits, None)
        except Exception as e:  # not attributable to one request: fail this step's requests, keep serving
            for seq, _ in batch:
                self._finish(seq, "error", error=f"engine step failed: {type(e).__name__}: {e}")
            return True
        greedy = logits.argmax(dim=-1).tolist()  # one host sync for every greedy request of the step
        row, offset, mtp = 0, 0, []
        for (seq, n), w in zip(batch, work):
            start = seq.computed
            if w.logits == 2:  # speculative: keep the draft's position only if the model agrees with it
                self.drafted += 1
                if greedy[row] == seq.draft:
                    self.accepted += 1
                    seq.computed += 2
                    new = [seq.draft, greedy[row + 1]]
                else:
                    seq.computed += 1
                    new = [greedy[row]]
            else:
                seq.computed += n
                new = [self._sample(seq, logits[row:row + 1], greedy[row])] if w.logits else []
            row += w.logits
            if self.prefix_caching:
                self._register_full_blocks(seq)
            if new and None not in new:
                self._append(seq, new)
            if drafting and seq.params.speculative and not seq.finished:
                kept = seq.computed - start  # MTP slot j reads h_j and token j+1 (DeepSeek-V3 section 2.2)
                mtp.append((seq, Work(seq.tokens[start + 1:start + kept + 1], start, seq.blocks, int(bool(new))),
                            range(offset, offset + kept)))
            offset += len(w.tokens)
        if mtp:
            self._draft(mtp, hidden)
        return True

    def _draft(self, mtp: list[tuple[Sequence, Work, range]], hidden: torch.Tensor) -> None:
        """Run the MTP module over this step's kept positions of the speculative sequences; those that
        sampled a token get the module's greedy guess for the next one as their draft."""
        rows = torch.tensor([r for _, _, span in mtp for r in span], device=hidden.device)
        try:
            guesses = self.runner.run_mtp([w for _, w, _ in mtp], hidden[rows]).argmax(dim=-1).tolist()
        except Exception as e:
            for seq, _, _ in mtp:
                self._finish(seq, "error", error=f"speculative draft failed: {type(e).__name__}: {e}")
            return
        wanting = [seq for seq, w, _ in mtp if w.logits]
        for seq, guess in zip(wanting, guesses):
            seq.draft = guess

    def _sample(self, seq: Sequence, logits: torch.Tensor, greedy: int) -> int | None:
        """seq's next token from logits (1, V) (greedy: its argmax); None after failing the request (a
        failure in its sampling fails this request only)."""
        p = seq.params
        try:
            if p.temperature == 0:
                return greedy
            return int(sample(logits, p.temperature, p.top_k or None, p.top_p, seq.generator)[0])
        except Exception as e:
            self._finish(seq, "error", error=f"sampling failed: {type(e).__name__}: {e}")
            return None

    def _append(self, seq: Sequence, tokens: list[int]) -> None:
        """Append decided tokens up to the first EOS or max_tokens and send them in one event."""
        p = seq.params
        reason, sent = None, []
        for token in tokens:
            seq.tokens.append(token)
            sent.append(token)
            self.counters.generated_tokens += 1
            if token in p.eos_token_ids and not p.ignore_eos:
                reason = "stop"
            elif seq.generated >= p.max_tokens:
                reason = "length"
            if reason is not None:
                break
        if reason is not None:
            self._finish(seq, reason, sent)
        else:
            self._emit(seq, RequestOutput(seq.request_id, sent, prompt_tokens=seq.prompt_len,
                                          cached_prompt_tokens=seq.cached_prompt_tokens or 0))

    def _finish(self, seq: Sequence, reason: str, tokens: list[int] | None = None,
                error: str | None = None) -> None:
        """Remove seq from the engine, free its blocks, send its final event."""
        if seq.finished:
            return
        seq.finished = True
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        self.requests.pop(seq.request_id, None)
        self._emit(seq, RequestOutput(seq.request_id, tokens or [], True, reason, error, seq.prompt_len,
                                      seq.cached_prompt_tokens or 0))

    @staticmethod
    def _emit_safely(on_event: EventCallback, out: RequestOutput) -> None:
        """Deliver a final event to a callback that may raise (the request is over either way)."""
        try:
            on_event(out)
        except Exception:  # noqa: BLE001 - a failing client callback must not stop the engine
            pass

    def _emit(self, seq: Sequence, out: RequestOutput) -> None:
        try:
            seq.on_event(out)
        except Exception as e:  # the request's own callback failed: end that request, nobody else
            if not out.finished:
                self._finish(seq, "error", error=f"event callback failed: {type(e).__name__}: {e}")

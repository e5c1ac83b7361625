"""Generation for DeepSeek-V4 batches whose prompts differ in length.

V4's compressed entries cover fixed windows of absolute positions (tokens [w*m, (w+1)*m)), so rows that are
left-padded to a common width cannot share one compression schedule. Each row therefore runs with its own
cache, at its own positions; the rows are stepped together, so the caller still receives (B, 1) tokens per
step, the same as for a padded batch of V1-V3. Speculative decoding with V4's MTP module: speculative_v4.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import torch


def plain_rows(model, ids: torch.Tensor, pad: torch.Tensor, max_new_tokens: int, sample_fn: Callable,
               sync: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
    """Like generate._plain for a left-padded batch: ids (B, T), pad (B,) -> (B, 1) tokens per step.
    sample_fn(logits (B, V)) -> (B,) tokens."""
    B = ids.shape[0]
    caches = [model.make_cache(1) for _ in range(B)]
    starts = [ids.shape[1] - int(p) for p in pad]  # each row's prompt length
    logits = torch.cat([model.head(model.hidden_states(ids[r:r + 1, int(pad[r]):], caches[r], check=False)[:, -1])
                        for r in range(B)]).float()
    for step in range(max_new_tokens):
        token = sample_fn(logits)
        if sync is not None:
            token = sync(token)
        yield token[:, None]
        if step + 1 < max_new_tokens:
            logits = torch.cat([model(token[r:r + 1, None], cache=caches[r], start=starts[r] + step,
                                      check=False)[:, -1] for r in range(B)])


def _snapshot(layers: list) -> list:
    """Shallow copies of V4LayerCache objects: a cached forward only reassigns their fields (new tensors, new
    counts), never writes into a tensor it already holds, so a shallow copy restores the state exactly."""
    return [replace(c, compressor=replace(c.compressor), indexer=replace(c.indexer)) for c in layers]


def speculative_v4(model, ids: torch.Tensor, stats) -> Iterator[torch.Tensor]:
    """Greedy decoding of one prompt ids (1, T) with MTP depth 0 drafting one token ahead (DeepSeek-V3 section
    5.4.3, the V4 MTP module of dsmoe.model.mtp_v4) -> (1, n) tokens per step, n in {1, 2}; the caller stops it.

    Each step verifies [token, draft] in one forward of the main model and emits the main model's own greedy
    choices, so the output equals plain greedy decoding. A rejected draft must leave the cache as if only
    `token` had been seen; V4's caches (sliding window, compressor buffers, entries) cannot be cut back by one
    position cheaply, so the cache is restored from a snapshot taken before the verify step and `token` is
    run again alone: a rejection costs one extra one-token forward. MTP slot i holds (streams_i, Emb(t_{i+1}))
    and is written only once t_{i+1} is verified, so the MTP layer's cache never needs a rollback.
    stats: a GenerationStats; drafted / accepted are counted."""
    T = ids.shape[1]
    cache = model.make_cache(1, extra_layers=1)
    n_main = len(model.layers)
    mtp_cache = cache.layers[n_main]

    def logits(h: torch.Tensor) -> torch.Tensor:  # streams (1, t, N, D) -> (1, t, V)
        return model.head(model.norm(model.hc_head(h))).float()

    def draft(h: torch.Tensor, next_ids: torch.Tensor, start: int) -> torch.Tensor:
        h_mtp = model.mtp_hidden(0, h, next_ids, mtp_cache, start)
        return model.mtp_logits(0, h_mtp[:, -1:])[:, -1].argmax(dim=-1)  # (1,)

    h = model.streams(ids, cache, check=False)  # (1, T, N, D), validated by stream()
    token = logits(h[:, -1:])[:, -1].argmax(dim=-1)  # (1,)
    guess = draft(h, torch.cat((ids[:, 1:], token[:, None]), dim=1), 0)
    pos = T  # position of `token`
    while True:
        yield token[:, None]
        saved = _snapshot(cache.layers[:n_main])
        h = model.streams(torch.stack((token, guess), dim=1), cache, pos, check=False)  # (1, 2, N, D)
        best = logits(h).argmax(dim=-1)  # (1, 2): after token, after guess
        stats.drafted += 1
        if bool(best[0, 0] == guess[0]):
            stats.accepted += 1
            yield guess[:, None]
            token = best[:, 1]
            guess = draft(h, torch.stack((guess, token), dim=1), pos)
            pos += 2
        else:
            cache.layers[:n_main] = saved
            h = model.streams(token[:, None], cache, pos, check=False)  # (1, 1, N, D): the cache as plain decode
            token = best[:, 0]
            guess = draft(h, token[:, None], pos)
            pos += 1

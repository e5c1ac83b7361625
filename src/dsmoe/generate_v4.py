"""Generation for DeepSeek-V4 batches whose prompts differ in length.

V4's compressed entries cover fixed windows of absolute positions (tokens [w*m, (w+1)*m)), so rows that are
left-padded to a common width cannot share one compression schedule. Each row therefore runs with its own
cache, at its own positions; the rows are stepped together, so the caller still receives (B, 1) tokens per
step, the same as for a padded batch of V1-V3.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

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

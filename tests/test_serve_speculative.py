"""MTP speculative decoding in the serving engine: plain greedy tokens, the MTP module's own drafts
(checked against the contiguous MTP forward and dsmoe.generate's acceptances), accept and reject paths."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import Collector, drain, generate_alone, make_prompts, tiny_model
from torch import nn

import dsmoe
from dsmoe.serve.blocks import CachePool
from dsmoe.serve.engine import Engine
from dsmoe.serve.protocol import SamplingParams


def test_speculative_requests_decode_plain_greedy_tokens_with_the_mtp_drafts_of_generate():
    """MTP speculative decoding in the engine: the tokens equal plain greedy decoding alone; every draft is
    the MTP module's guess computed without the engine (contiguous forward of the main model and the MTP
    module over the final sequence); as many drafts are accepted as dsmoe.generate(speculative=True)
    accepts on each prompt alone. The MTP input projection is biased towards the next token's embedding and
    the head tied to the embedding, so that drafts are sometimes right."""
    model = tiny_model("tiny-v3")
    D = model.config.hidden_size
    with torch.no_grad():
        model.head.weight.copy_(model.embed.weight * 3)
        w = model.mtp[0].eh_proj.weight
        w[:, D:] *= 0.3
        w[:, :D] = torch.eye(D)
    drafts: dict[str, dict[int, int]] = {}

    class Recording(Engine):
        def _draft(self, mtp, hidden):
            super()._draft(mtp, hidden)
            for seq, work, _ in mtp:
                if work.logits:  # the guess from MTP slot computed - 1 (h there, and the token after it)
                    drafts.setdefault(seq.request_id, {})[seq.computed - 1] = seq.draft

    pool = CachePool.from_tokens(model.config, 1024, block_size=4, extra_layers=1)
    engine = Recording(model, pool, max_running=8, max_tokens_per_step=24, speculative=True)
    out = Collector()
    prompts = make_prompts(5, 2, 30, seed=16)
    accepted = 0
    for i, p in enumerate(prompts):
        speculative = i != 2  # one plain request in the same batches
        engine.add(str(i), p, SamplingParams(max_tokens=12, speculative=speculative), out(str(i)))
        if speculative:
            stats = dsmoe.GenerationStats()
            dsmoe.generate(model, [p], 12, speculative=True, stats=stats)
            accepted += stats.accepted
    drain(engine)
    for i, p in enumerate(prompts):
        assert out.tokens[str(i)] == generate_alone(model, p, 12), f"request {i}"
    assert engine.accepted == accepted > 0 and engine.drafted > accepted
    assert (engine.stats().speculative_drafted, engine.stats().speculative_accepted) == (engine.drafted, accepted)
    assert set(drafts) == {"0", "1", "3", "4"}
    with torch.no_grad():
        for rid, guesses in drafts.items():
            full = torch.tensor([prompts[int(rid)] + out.tokens[rid]])
            h = model.hidden_states(full)
            ref = model.head(model.mtp[0].norm(model.mtp_hidden(0, h[:, :-1], full[:, 1:]))).argmax(-1)[0]
            assert guesses == {j: int(ref[j]) for j in guesses}, f"request {rid}"
    assert engine.stats().blocks_used == 0


@pytest.mark.parametrize("pool_tokens", [512, 40])
def test_accepted_drafts_emit_two_tokens_and_stay_exact(pool_tokens):
    """An oracle drafter (the reference's next token on even steps, a wrong one on odd steps) drives the
    accept and reject paths of verification; tokens stay exact and accepted steps emit two at once, also
    when a small pool preempts speculative sequences."""
    model = tiny_model("tiny-mixtral")
    prompts = make_prompts(3, 3, 12, seed=17)
    refs = {str(i): generate_alone(model, p, 14) for i, p in enumerate(prompts)}

    class Oracle(Engine):
        def _draft(self, mtp, hidden):
            for seq, w, _ in mtp:
                if w.logits and seq.generated < 14:
                    right = refs[seq.request_id][seq.generated]
                    seq.draft = right if seq.generated % 2 == 0 else (right + 1) % 4096

    pool = CachePool.from_tokens(model.config, pool_tokens, block_size=4, extra_layers=1)
    model.mtp = nn.ModuleList([nn.Identity()])  # lets the engine build; the oracle never calls it
    engine = Oracle(model, pool, max_running=4, max_tokens_per_step=16, speculative=True)
    out = Collector()
    sizes = []
    for rid, p in zip(refs, prompts):
        engine.add(rid, p, SamplingParams(max_tokens=14, speculative=True),
                   lambda o, f=out(rid): (sizes.append(len(o.token_ids)), f(o)))
    drain(engine)
    assert {rid: out.tokens[rid] for rid in refs} == refs
    assert engine.accepted > 0 and engine.drafted > engine.accepted and 2 in sizes
    assert (engine.stats().preemptions > 0) == (pool_tokens < 100) and engine.stats().blocks_used == 0

"""The serving engine: every request's tokens equal dsmoe.generate on that prompt alone (the reference),
whatever else runs: concurrency, chunked prefill, preemption, prefix-cache hits; the paged forward against
the contiguous cache; aborts, seeded sampling, errors and rejections."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from torch import nn

import dsmoe
from dsmoe.presets import get_preset
from dsmoe.serve.blocks import CachePool
from dsmoe.serve.engine import Engine
from dsmoe.serve.loop import ThreadedEngine
from dsmoe.serve.protocol import EngineOverloaded, RequestOutput, RequestRejected, SamplingParams
from dsmoe.serve.runner import ModelRunner, Work

MLA_AND_GQA = ["tiny-v2", "tiny-v3", "tiny-v1", "tiny-mixtral"]


def _model(preset: str, **changes) -> dsmoe.Transformer:
    torch.manual_seed(0)
    config = get_preset(preset).replace(initializer_range=0.08, num_hidden_layers=2, **changes)
    model = dsmoe.Transformer(config).eval()
    for moe in model.moe_layers():
        if moe.gate.bias is not None:
            moe.gate.bias.uniform_(-0.05, 0.05)
    return model


def _prompts(n: int, lo: int = 1, hi: int = 40, seed: int = 1, vocab: int = 4096) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _alone(model, prompt: list[int], max_tokens: int, **kw) -> list[int]:
    return dsmoe.generate(model, [prompt], max_tokens, **kw)[0][len(prompt):]


class Collector:
    """Gathers each request's tokens and final event."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.final: dict[str, RequestOutput] = {}
        self.lock = threading.Lock()

    def __call__(self, rid: str):
        def on_event(out: RequestOutput) -> None:
            with self.lock:
                assert rid not in self.final, f"event for {rid} after its final one"
                self.tokens.setdefault(rid, []).extend(out.token_ids)
                if out.finished:
                    self.final[rid] = out
        return on_event


def _engine(model, tokens: int = 4096, block_size: int = 4, **kw) -> Engine:
    pool = CachePool.from_tokens(model.config, tokens, block_size=block_size, dtype=model.embed.weight.dtype)
    return Engine(model, pool, **kw)


def _drain(engine: Engine, limit: int = 5000) -> int:
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < limit and len(engine.running) <= engine.max_running
    return steps


@pytest.mark.parametrize("preset", MLA_AND_GQA)
def test_concurrent_greedy_requests_equal_generate_alone(preset):
    """Many requests of different lengths, admitted while others decode, prompts chunked under a small
    token budget: each one's tokens equal dsmoe.generate on its prompt alone (fp32)."""
    model = _model(preset)
    engine = _engine(model, max_running=6, max_tokens_per_step=16)
    out = Collector()
    prompts = _prompts(10)
    lengths = [3 + i % 5 for i in range(10)]
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        engine.add(str(i), p, SamplingParams(max_tokens=n), out(str(i)))
    _drain(engine)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        assert out.tokens[str(i)] == _alone(model, p, n), f"request {i}"
        assert out.final[str(i)].finish_reason == "length" and out.final[str(i)].prompt_tokens == len(p)
    s = engine.stats()
    assert s.blocks_used == 0 and s.generated_tokens == sum(lengths) and s.prompt_tokens == sum(map(len, prompts))


@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-mixtral"])
def test_preemption_keeps_outputs_exact(preset):
    """A pool of 12 blocks of 4 for 8 requests of up to 45 positions: the youngest are preempted and
    recomputed; nothing fails and every output is still exact."""
    model = _model(preset)
    engine = _engine(model, tokens=48, max_running=8, max_tokens_per_step=32)
    out = Collector()
    prompts = _prompts(8, lo=10, hi=30, seed=2)
    for i, p in enumerate(prompts):
        engine.add(str(i), p, SamplingParams(max_tokens=15), out(str(i)))
    _drain(engine)
    assert engine.stats().preemptions > 0
    for i, p in enumerate(prompts):
        assert out.tokens[str(i)] == _alone(model, p, 15), f"request {i}"
    assert engine.stats().blocks_used == 0


def test_shared_prefix_is_prefilled_once_and_outputs_are_unchanged():
    model = _model("tiny-v3")
    engine = _engine(model, block_size=4)
    out = Collector()
    system = _prompts(1, 14, 14, seed=3)[0]  # 3 full blocks of 4 + 2 tokens
    suffixes = _prompts(3, 2, 9, seed=4)
    engine.add("first", system + suffixes[0], SamplingParams(max_tokens=4), out("first"))
    _drain(engine)
    for i, s in enumerate(suffixes[1:]):
        engine.add(str(i), system + s, SamplingParams(max_tokens=4), out(str(i)))
    _drain(engine)
    s = engine.stats()
    assert s.prefix_cache_hit_tokens == 2 * 12  # the system prompt's 3 full blocks, for each later request
    assert s.prefix_cache_queried_tokens == sum(len(system) + len(x) for x in suffixes)
    assert out.final["0"].cached_prompt_tokens == 12 and out.final["first"].cached_prompt_tokens == 0
    for rid, suffix in zip(["first", "0", "1"], suffixes):
        assert out.tokens[rid] == _alone(model, system + suffix, 4)
    assert s.blocks_used == 0 and s.blocks_free == engine.pool.num_blocks


def test_long_prompt_is_chunked_between_running_decodes():
    """A 60-token prompt under an 8-token budget takes 8 steps; the stream already running gets a token in
    every one of them."""
    model = _model("tiny-mixtral")
    engine = _engine(model, max_running=4, max_tokens_per_step=8)
    out = Collector()
    short, long = _prompts(1, 5, 5, seed=5)[0], _prompts(1, 60, 60, seed=6)[0]
    engine.add("short", short, SamplingParams(max_tokens=20), out("short"))
    engine.step()  # the short prompt's prefill
    engine.add("long", long, SamplingParams(max_tokens=3), out("long"))
    steps = 0
    while "long" not in out.tokens:
        before = len(out.tokens["short"])
        engine.step()
        steps += 1
        assert len(out.tokens["short"]) == before + 1  # never stalled by the prefill
    assert steps == 9  # 59 prompt tokens at 7 per step besides the decode, then the last chunk
    _drain(engine)
    assert out.tokens["long"] == _alone(model, long, 3) and out.tokens["short"] == _alone(model, short, 20)


@pytest.mark.parametrize("preset,absorb", [("tiny-v2", True), ("tiny-v2", False), ("tiny-v3", True),
                                           ("tiny-v3", None), ("tiny-mixtral", None)])
@torch.no_grad()
def test_paged_forward_equals_contiguous_cache(preset, absorb):
    """Logits of the paged step (shuffled block tables, decodes batched with a chunk) against the contiguous
    ModelCache path at every step, with MLA's absorbed / naive form forced alike on both."""
    model = _model(preset)
    for block in model.layers:
        if absorb is not None:
            block.attn.absorb = absorb
    pool = CachePool.from_tokens(model.config, 64, block_size=4)
    runner = ModelRunner(model, pool)
    a, b = _prompts(2, 13, 13, seed=7)
    ta, tb = [3, 9, 0, 14], [7, 2, 11, 5]
    cache = model.make_cache(2, 16)
    ref = [model(torch.tensor([a[:6], b[:6]]), cache=cache)[:, -1]]
    ref += [model(torch.tensor([a[t:t + 1], b[t:t + 1]]), cache=cache, start=t)[:, -1] for t in range(6, 13)]
    got = [runner.run([Work(a[:6], 0, ta, True), Work(b[:3], 0, tb, False)])[0]]
    got.append(runner.run([Work(b[3:6], 3, tb, True)])[0])
    got = [torch.stack(got)]
    got += [runner.run([Work(a[t:t + 1], t, ta, True), Work(b[t:t + 1], t, tb, True)]) for t in range(6, 13)]
    torch.testing.assert_close(torch.stack(got), torch.stack(ref), atol=2e-5, rtol=0)


def test_decompressed_mla_layout_gives_the_same_tokens():
    model = _model("tiny-v3")
    prompts = _prompts(4, seed=8)
    out = Collector()
    pool = CachePool.from_tokens(model.config, 256, block_size=4, layout="decompressed")
    engine = Engine(model, pool, max_running=8, max_tokens_per_step=16)
    for i, p in enumerate(prompts):
        engine.add(str(i), p, SamplingParams(max_tokens=5), out(str(i)))
    _drain(engine)
    assert [out.tokens[str(i)] for i in range(4)] == [_alone(model, p, 5) for p in prompts]


def test_threaded_engine_serves_concurrent_submitters_and_aborts_free_blocks():
    model = _model("tiny-v2")
    loop = ThreadedEngine.from_model(model, cache_memory="4MiB", block_size=4, max_running=8, max_tokens_per_step=32)
    out = Collector()
    prompts = _prompts(12, seed=9)
    threads = [threading.Thread(target=loop.submit, args=(str(i), p, SamplingParams(max_tokens=6), out(str(i))))
               for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    loop.submit("long", prompts[0], SamplingParams(max_tokens=200, ignore_eos=True), out("long"))
    for t in threads:
        t.join()
    deadline = time.time() + 30
    while len(out.tokens.get("long", [])) < 3 and time.time() < deadline:
        time.sleep(0.01)
    loop.abort("long")
    loop.abort("unknown-id")  # ignored
    deadline = time.time() + 30
    while (len(out.final) < 13 or loop.stats().blocks_used) and time.time() < deadline:
        time.sleep(0.01)
    assert out.final["long"].finish_reason == "abort" and len(out.tokens["long"]) < 200
    for i, p in enumerate(prompts):
        assert out.tokens[str(i)] == _alone(model, p, 6)
    assert loop.stats().blocks_used == 0 and loop.stats().running == 0
    loop.shutdown()
    with pytest.raises(EngineOverloaded, match="shutting down"):
        loop.submit("late", prompts[0], SamplingParams(max_tokens=1), out("late"))


def test_seeded_sampling_is_independent_of_concurrency():
    """A seeded request draws the same tokens alone, beside other sampled requests, and as dsmoe.generate
    with that seed."""
    model = _model("tiny-v3")
    prompt = _prompts(1, 9, 9, seed=10)[0]
    params = SamplingParams(max_tokens=8, temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    alone = Collector()
    engine = _engine(model)
    engine.add("x", prompt, params, alone("x"))
    _drain(engine)
    crowd = Collector()
    engine.add("noise0", prompt, SamplingParams(max_tokens=8, temperature=1.0), crowd("noise0"))
    engine.add("x", prompt, params, crowd("x"))
    for i, p in enumerate(_prompts(3, seed=11)):
        engine.add(f"n{i}", p, SamplingParams(max_tokens=8, temperature=1.0, seed=i), crowd(f"n{i}"))
    _drain(engine)
    reference = _alone(model, prompt, 8, temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    assert alone.tokens["x"] == crowd.tokens["x"] == reference


def test_eos_stops_a_request_unless_ignored():
    model = _model("tiny-mixtral")
    prompt = _prompts(1, 6, 6, seed=12)[0]
    greedy = _alone(model, prompt, 6)
    out = Collector()
    engine = _engine(model)
    engine.add("stop", prompt, SamplingParams(max_tokens=6, eos_token_ids=(greedy[2],)), out("stop"))
    engine.add("ignore", prompt, SamplingParams(max_tokens=6, eos_token_ids=(greedy[2],), ignore_eos=True),
               out("ignore"))
    _drain(engine)
    assert out.tokens["stop"] == greedy[:greedy.index(greedy[2]) + 1] and out.final["stop"].finish_reason == "stop"
    assert out.tokens["ignore"] == greedy and out.final["ignore"].finish_reason == "length"


def test_a_failing_request_fails_alone():
    """One request's callback raises: it ends with finish_reason "error" and the message; the others are
    exact. A failing model step fails that step's requests only; the next request is served."""
    model = _model("tiny-v3")
    engine = _engine(model, max_running=8, max_tokens_per_step=16)
    out = Collector()
    prompts = _prompts(4, seed=13)
    finals = {}

    def explode(o: RequestOutput) -> None:
        if o.finished:
            finals["bad"] = o
            return
        raise RuntimeError("client went wrong")

    engine.add("bad", prompts[0], SamplingParams(max_tokens=5), explode)
    for i, p in enumerate(prompts[1:]):
        engine.add(str(i), p, SamplingParams(max_tokens=5), out(str(i)))
    _drain(engine)
    assert finals["bad"].finish_reason == "error" and "client went wrong" in finals["bad"].error
    for i, p in enumerate(prompts[1:]):
        assert out.tokens[str(i)] == _alone(model, p, 5)
    real_run = engine.runner.run
    engine.runner.run = lambda work, **kw: (_ for _ in ()).throw(RuntimeError("device lost"))
    engine.add("doomed", prompts[1], SamplingParams(max_tokens=3), out("doomed"))
    _drain(engine)
    assert out.final["doomed"].finish_reason == "error" and "device lost" in out.final["doomed"].error
    engine.runner.run = real_run
    engine.add("after", prompts[2], SamplingParams(max_tokens=3), out("after"))
    _drain(engine)
    assert out.tokens["after"] == _alone(model, prompts[2], 3) and engine.stats().blocks_used == 0


def test_requests_beyond_the_context_or_the_pool_are_rejected_naming_the_field():
    model = _model("tiny-v3", max_position_embeddings=32)
    engine = _engine(model, tokens=24, block_size=4, max_waiting=2)
    out = Collector()
    ok = SamplingParams(max_tokens=4)
    cases = [([1] * 33, ok, "prompt"), ([1] * 30, SamplingParams(max_tokens=3), "max_tokens"),
             ([1] * 20, SamplingParams(max_tokens=6), "max_tokens"),  # 25 positions > the pool's 24
             ([], ok, "prompt"), ([1, 4096], ok, "prompt"), ([1], SamplingParams(max_tokens=0), "max_tokens"),
             ([1], SamplingParams(max_tokens=2, temperature=-1.0), "temperature"),
             ([1], SamplingParams(max_tokens=2, top_p=0.0), "top_p"),
             ([1], SamplingParams(max_tokens=2, speculative=True), "speculative")]  # no MTP engine
    for prompt, params, field in cases:
        with pytest.raises(RequestRejected) as e:
            engine.add("r", prompt, params, out("r"))
        assert e.value.field == field
    # an exactly full context is served: 20 + 12 = 32 positions; the last token is never cached (31 <= 32)
    big = _engine(model, tokens=32, block_size=4)
    prompt = _prompts(1, 20, 20, seed=14, vocab=4096)[0]
    big.add("full", prompt, SamplingParams(max_tokens=12), out("full"))
    _drain(big)
    assert out.tokens["full"] == _alone(model, prompt, 12)
    engine.add("a", [1], ok, out("a"))
    engine.add("b", [2], ok, out("b"))
    with pytest.raises(EngineOverloaded, match="waiting queue is full"):
        engine.add("c", [3], ok, out("c"))
    with pytest.raises(RequestRejected, match="already"):
        engine.add("a", [1], ok, out("a"))


def test_models_the_engine_cannot_run_are_refused_when_it_is_built():
    model = _model("tiny-mixtral")
    config = copy.copy(model.config)
    config.extra = {**config.extra, "sliding_window": 16}
    model.config = config
    with pytest.raises(ValueError, match="sliding-window"):
        _engine(model)
    model = _model("tiny-v3")
    model.layers[1].attn = nn.Identity()
    with pytest.raises(ValueError, match="layer 1"):
        _engine(model)


def test_shutdown_drains_or_aborts_what_is_queued():
    model = _model("tiny-v1")
    prompts = _prompts(3, seed=15)
    for drain in (True, False):
        loop = ThreadedEngine.from_model(model, cache_tokens=512, block_size=4, max_running=1, max_tokens_per_step=8)
        out = Collector()
        for i, p in enumerate(prompts):
            loop.submit(str(i), p, SamplingParams(max_tokens=40), out(str(i)))
        loop.shutdown(drain=drain)
        assert len(out.final) == 3 and loop.stats().blocks_used == 0
        if drain:
            assert all(out.tokens[str(i)] == _alone(model, p, 40) for i, p in enumerate(prompts))
        else:  # max_running=1: the later two never started
            assert {out.final[str(i)].finish_reason for i in (1, 2)} == {"abort"}


def test_speculative_requests_decode_plain_greedy_tokens_with_the_mtp_drafts_of_generate():
    """MTP speculative decoding in the engine: the tokens equal plain greedy decoding alone; every draft is
    the MTP module's guess computed without the engine (contiguous forward of the main model and the MTP
    module over the final sequence); as many drafts are accepted as dsmoe.generate(speculative=True)
    accepts on each prompt alone. The MTP input projection is biased towards the next token's embedding and
    the head tied to the embedding, so that drafts are sometimes right."""
    model = _model("tiny-v3")
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
    prompts = _prompts(5, 2, 30, seed=16)
    accepted = 0
    for i, p in enumerate(prompts):
        speculative = i != 2  # one plain request in the same batches
        engine.add(str(i), p, SamplingParams(max_tokens=12, speculative=speculative), out(str(i)))
        if speculative:
            stats = dsmoe.GenerationStats()
            dsmoe.generate(model, [p], 12, speculative=True, stats=stats)
            accepted += stats.accepted
    _drain(engine)
    for i, p in enumerate(prompts):
        assert out.tokens[str(i)] == _alone(model, p, 12), f"request {i}"
    assert engine.accepted == accepted > 0 and engine.drafted > accepted
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
    model = _model("tiny-mixtral")
    prompts = _prompts(3, 3, 12, seed=17)
    refs = {str(i): _alone(model, p, 14) for i, p in enumerate(prompts)}

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
    _drain(engine)
    assert {rid: out.tokens[rid] for rid in refs} == refs
    assert engine.accepted > 0 and engine.drafted > engine.accepted and 2 in sizes
    assert (engine.stats().preemptions > 0) == (pool_tokens < 100) and engine.stats().blocks_used == 0

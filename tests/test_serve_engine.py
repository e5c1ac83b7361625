"""The serving engine: every request's tokens equal dsmoe.generate on that prompt alone (the reference),
whatever else runs: concurrency, chunked prefill, preemption, prefix-cache hits; the paged forward against
the contiguous cache; aborts, seeded sampling, errors and rejections."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from serve_helpers import Collector, drain, generate_alone, make_engine, make_prompts, tiny_model
from torch import nn

import dsmoe
from dsmoe.serve.blocks import CachePool
from dsmoe.serve.engine import Engine
from dsmoe.serve.loop import ThreadedEngine
from dsmoe.serve.protocol import EngineOverloaded, RequestOutput, RequestRejected, SamplingParams
from dsmoe.serve.runner import ModelRunner, Work

MLA_AND_GQA = ["tiny-v2", "tiny-v3", "tiny-v1", "tiny-mixtral"]


@pytest.mark.parametrize("preset", MLA_AND_GQA)
def test_concurrent_greedy_requests_equal_generate_alone(preset):
    """Many requests of different lengths, admitted while others decode, prompts chunked under a small
    token budget: each one's tokens equal dsmoe.generate on its prompt alone (fp32)."""
    model = tiny_model(preset)
    engine = make_engine(model, max_running=6, max_tokens_per_step=16)
    out = Collector()
    prompts = make_prompts(10)
    lengths = [3 + i % 5 for i in range(10)]
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        engine.add(str(i), p, SamplingParams(max_tokens=n), out(str(i)))
    drain(engine)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        assert out.tokens[str(i)] == generate_alone(model, p, n), f"request {i}"
        assert out.final[str(i)].finish_reason == "length" and out.final[str(i)].prompt_tokens == len(p)
    s = engine.stats()
    assert s.blocks_used == 0 and s.generated_tokens == sum(lengths) and s.prompt_tokens == sum(map(len, prompts))


@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-mixtral"])
def test_preemption_keeps_outputs_exact(preset):
    """A pool of 12 blocks of 4 for 8 requests of up to 45 positions: the youngest are preempted and
    recomputed; nothing fails and every output is still exact."""
    model = tiny_model(preset)
    engine = make_engine(model, tokens=48, max_running=8, max_tokens_per_step=32)
    out = Collector()
    prompts = make_prompts(8, lo=10, hi=30, seed=2)
    for i, p in enumerate(prompts):
        engine.add(str(i), p, SamplingParams(max_tokens=15), out(str(i)))
    drain(engine)
    assert engine.stats().preemptions > 0
    for i, p in enumerate(prompts):
        assert out.tokens[str(i)] == generate_alone(model, p, 15), f"request {i}"
    assert engine.stats().blocks_used == 0


def test_shared_prefix_is_prefilled_once_and_outputs_are_unchanged():
    model = tiny_model("tiny-v3")
    engine = make_engine(model, block_size=4)
    out = Collector()
    system = make_prompts(1, 14, 14, seed=3)[0]  # 3 full blocks of 4 + 2 tokens
    suffixes = make_prompts(3, 2, 9, seed=4)
    engine.add("first", system + suffixes[0], SamplingParams(max_tokens=4), out("first"))
    drain(engine)
    for i, s in enumerate(suffixes[1:]):
        engine.add(str(i), system + s, SamplingParams(max_tokens=4), out(str(i)))
    drain(engine)
    s = engine.stats()
    assert s.prefix_cache_hit_tokens == 2 * 12  # the system prompt's 3 full blocks, for each later request
    assert s.prefix_cache_queried_tokens == sum(len(system) + len(x) for x in suffixes)
    assert out.final["0"].cached_prompt_tokens == 12 and out.final["first"].cached_prompt_tokens == 0
    for rid, suffix in zip(["first", "0", "1"], suffixes):
        assert out.tokens[rid] == generate_alone(model, system + suffix, 4)
    assert s.blocks_used == 0 and s.blocks_free == engine.pool.num_blocks


def test_long_prompt_is_chunked_between_running_decodes():
    """A 60-token prompt under an 8-token budget takes 8 steps; the stream already running gets a token in
    every one of them."""
    model = tiny_model("tiny-mixtral")
    engine = make_engine(model, max_running=4, max_tokens_per_step=8)
    out = Collector()
    short, long = make_prompts(1, 5, 5, seed=5)[0], make_prompts(1, 60, 60, seed=6)[0]
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
    drain(engine)
    assert out.tokens["long"] == generate_alone(model, long, 3)
    assert out.tokens["short"] == generate_alone(model, short, 20)


@pytest.mark.parametrize("preset,absorb", [("tiny-v2", True), ("tiny-v2", False), ("tiny-v3", True),
                                           ("tiny-v3", None), ("tiny-mixtral", None)])
@torch.no_grad()
def test_paged_forward_equals_contiguous_cache(preset, absorb):
    """Logits of the paged step (shuffled block tables, decodes batched with a chunk) against the contiguous
    ModelCache path at every step, with MLA's absorbed / naive form forced alike on both."""
    model = tiny_model(preset)
    for block in model.layers:
        if absorb is not None:
            block.attn.absorb = absorb
    pool = CachePool.from_tokens(model.config, 64, block_size=4)
    runner = ModelRunner(model, pool)
    a, b = make_prompts(2, 13, 13, seed=7)
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
    model = tiny_model("tiny-v3")
    prompts = make_prompts(4, seed=8)
    out = Collector()
    pool = CachePool.from_tokens(model.config, 256, block_size=4, layout="decompressed")
    engine = Engine(model, pool, max_running=8, max_tokens_per_step=16)
    for i, p in enumerate(prompts):
        engine.add(str(i), p, SamplingParams(max_tokens=5), out(str(i)))
    drain(engine)
    assert [out.tokens[str(i)] for i in range(4)] == [generate_alone(model, p, 5) for p in prompts]


def test_threaded_engine_serves_concurrent_submitters_and_aborts_free_blocks():
    model = tiny_model("tiny-v2")
    loop = ThreadedEngine.from_model(model, cache_memory="4MiB", block_size=4, max_running=8, max_tokens_per_step=32)
    out = Collector()
    prompts = make_prompts(12, seed=9)
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
        assert out.tokens[str(i)] == generate_alone(model, p, 6)
    assert loop.stats().blocks_used == 0 and loop.stats().running == 0
    loop.shutdown()
    with pytest.raises(EngineOverloaded, match="shutting down"):
        loop.submit("late", prompts[0], SamplingParams(max_tokens=1), out("late"))


def test_seeded_sampling_is_independent_of_concurrency():
    """A seeded request draws the same tokens alone, beside other sampled requests, and as dsmoe.generate
    with that seed."""
    model = tiny_model("tiny-v3")
    prompt = make_prompts(1, 9, 9, seed=10)[0]
    params = SamplingParams(max_tokens=8, temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    alone = Collector()
    engine = make_engine(model)
    engine.add("x", prompt, params, alone("x"))
    drain(engine)
    crowd = Collector()
    engine.add("noise0", prompt, SamplingParams(max_tokens=8, temperature=1.0), crowd("noise0"))
    engine.add("x", prompt, params, crowd("x"))
    for i, p in enumerate(make_prompts(3, seed=11)):
        engine.add(f"n{i}", p, SamplingParams(max_tokens=8, temperature=1.0, seed=i), crowd(f"n{i}"))
    drain(engine)
    reference = generate_alone(model, prompt, 8, temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    assert alone.tokens["x"] == crowd.tokens["x"] == reference


def test_eos_stops_a_request_unless_ignored():
    model = tiny_model("tiny-mixtral")
    prompt = make_prompts(1, 6, 6, seed=12)[0]
    greedy = generate_alone(model, prompt, 6)
    out = Collector()
    engine = make_engine(model)
    engine.add("stop", prompt, SamplingParams(max_tokens=6, eos_token_ids=(greedy[2],)), out("stop"))
    engine.add("ignore", prompt, SamplingParams(max_tokens=6, eos_token_ids=(greedy[2],), ignore_eos=True),
               out("ignore"))
    drain(engine)
    assert out.tokens["stop"] == greedy[:greedy.index(greedy[2]) + 1] and out.final["stop"].finish_reason == "stop"
    assert out.tokens["ignore"] == greedy and out.final["ignore"].finish_reason == "length"


def test_a_failing_request_fails_alone():
    """One request's callback raises: it ends with finish_reason "error" and the message; the others are
    exact. A failing model step fails that step's requests only; the next request is served."""
    model = tiny_model("tiny-v3")
    engine = make_engine(model, max_running=8, max_tokens_per_step=16)
    out = Collector()
    prompts = make_prompts(4, seed=13)
    finals = {}

    def explode(o: RequestOutput) -> None:
        if o.finished:
            finals["bad"] = o
            return
        raise RuntimeError("client went wrong")

    engine.add("bad", prompts[0], SamplingParams(max_tokens=5), explode)
    for i, p in enumerate(prompts[1:]):
        engine.add(str(i), p, SamplingParams(max_tokens=5), out(str(i)))
    drain(engine)
    assert finals["bad"].finish_reason == "error" and "client went wrong" in finals["bad"].error
    for i, p in enumerate(prompts[1:]):
        assert out.tokens[str(i)] == generate_alone(model, p, 5)
    real_run = engine.runner.run
    engine.runner.run = lambda work, **kw: (_ for _ in ()).throw(RuntimeError("device lost"))
    engine.add("doomed", prompts[1], SamplingParams(max_tokens=3), out("doomed"))
    drain(engine)
    assert out.final["doomed"].finish_reason == "error" and "device lost" in out.final["doomed"].error
    engine.runner.run = real_run
    engine.add("after", prompts[2], SamplingParams(max_tokens=3), out("after"))
    drain(engine)
    assert out.tokens["after"] == generate_alone(model, prompts[2], 3) and engine.stats().blocks_used == 0


def test_requests_beyond_the_context_or_the_pool_are_rejected_naming_the_field():
    model = tiny_model("tiny-v3", max_position_embeddings=32)
    engine = make_engine(model, tokens=24, block_size=4, max_waiting=2)
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
    big = make_engine(model, tokens=32, block_size=4)
    prompt = make_prompts(1, 20, 20, seed=14, vocab=4096)[0]
    big.add("full", prompt, SamplingParams(max_tokens=12), out("full"))
    drain(big)
    assert out.tokens["full"] == generate_alone(model, prompt, 12)
    engine.add("a", [1], ok, out("a"))
    engine.add("b", [2], ok, out("b"))
    with pytest.raises(EngineOverloaded, match="waiting queue is full"):
        engine.add("c", [3], ok, out("c"))
    with pytest.raises(RequestRejected, match="already"):
        engine.add("a", [1], ok, out("a"))


def _with_window(model: dsmoe.Transformer, window: int) -> dsmoe.Transformer:
    """The model with config.json's `sliding_window` set (as a checkpoint's config would carry it)."""
    config = copy.copy(model.config)
    config.extra = {**config.extra, "sliding_window": window}
    model.config = config
    return model


def test_sliding_window_attention_equals_transformers(tmp_path):
    """Mixtral with a 6-token window: every query sees only the last 6 positions, in decodes and in chunks of
    prompts; greedy tokens equal transformers' MixtralForCausalLM generate with the same window and weights."""
    pytest.importorskip("transformers")
    from hf_models import build_hf_model

    ref = build_hf_model("mixtral")
    ref.save_pretrained(tmp_path)
    model = _with_window(dsmoe.load_pretrained(tmp_path, dtype=torch.float32), 6)
    ref.config.sliding_window = 6
    engine = make_engine(model, block_size=4, max_running=4, max_tokens_per_step=8)  # prompts in chunks
    out = Collector()
    prompts = make_prompts(5, 3, 20, seed=18, vocab=96)
    for i, p in enumerate(prompts):
        engine.add(str(i), p, SamplingParams(max_tokens=10), out(str(i)))
    drain(engine)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            expected = ref.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, pad_token_id=0)
            assert out.tokens[str(i)] == expected[0, len(p):].tolist(), f"request {i}"


def test_models_the_engine_cannot_run_are_refused_when_it_is_built():
    with pytest.raises(ValueError, match="sliding-window attention for GQA models only"):
        make_engine(_with_window(tiny_model("tiny-v3"), 16))
    model = tiny_model("tiny-v3")
    model.layers[1].attn = nn.Identity()
    with pytest.raises(ValueError, match="layer 1"):
        make_engine(model)


def test_shutdown_drains_or_aborts_what_is_queued():
    model = tiny_model("tiny-v1")
    prompts = make_prompts(3, seed=15)
    for drain_first in (True, False):
        loop = ThreadedEngine.from_model(model, cache_tokens=512, block_size=4, max_running=1, max_tokens_per_step=8)
        out = Collector()
        for i, p in enumerate(prompts):
            loop.submit(str(i), p, SamplingParams(max_tokens=40), out(str(i)))
        loop.shutdown(drain=drain_first)
        assert len(out.final) == 3 and loop.stats().blocks_used == 0
        if drain_first:
            assert all(out.tokens[str(i)] == generate_alone(model, p, 40) for i, p in enumerate(prompts))
        else:  # max_running=1: the later two never started
            assert {out.final[str(i)].finish_reason for i in (1, 2)} == {"abort"}


def test_threaded_engine_under_concurrent_submits_and_aborts():
    """Four client threads submit 24 requests and abort every third one at once, while the engine preempts
    in a small pool: every request gets exactly one final event, the others are exact, the pool ends empty."""
    model = tiny_model("tiny-v3")
    loop = ThreadedEngine.from_model(model, cache_tokens=96, block_size=4, max_running=6, max_tokens_per_step=24)
    out = Collector()
    prompts = make_prompts(24, 2, 20, seed=19)

    def client(k: int) -> None:
        for i in range(k, 24, 4):
            loop.submit(str(i), prompts[i], SamplingParams(max_tokens=6), out(str(i)))
            if i % 3 == 0:
                loop.abort(str(i))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deadline = time.time() + 60
    while len(out.final) < 24 and time.time() < deadline:
        time.sleep(0.01)
    loop.shutdown()
    assert len(out.final) == 24  # Collector asserts no event after a final one
    reasons = {rid: o.finish_reason for rid, o in out.final.items()}
    # an aborted request could only finish first if its client thread stalled for 6 engine steps
    assert sum(r == "abort" for r in reasons.values()) >= 6
    for i, p in enumerate(prompts):
        assert reasons[str(i)] in (("abort", "length") if i % 3 == 0 else ("length",)), f"request {i}"
        if reasons[str(i)] == "length":
            assert out.tokens[str(i)] == generate_alone(model, p, 6), f"request {i}"
    assert loop.stats().blocks_used == 0 and loop.stats().running == loop.stats().waiting == 0

"""`dsmoe serve` end to end on a tiny DeepSeek-V3-shaped checkpoint: the continuous-batching engine behind
a real uvicorn server, talked to with the official openai client; every text is checked against
dsmoe.generate on that prompt alone, decoded by the tokenizer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from serve_harness import free_port, running, sse
from tiny_assets import build_tokenizer

import dsmoe
from dsmoe.serve.api import create_app
from dsmoe.serve.assets import load_text_assets
from dsmoe.serve.engines import make_engine

TEXT = "def add(a, b):\n    return a + b\nfor i in range(10):\n    print(i)\nclass Point:\n    pass\n" * 2
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
            "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\\n\\n' }}{% else %}"
            "{{ 'Assistant: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("served")
    tok = build_tokenizer(path)
    torch.manual_seed(0)
    config = dsmoe.get_preset("tiny-v3").replace(vocab_size=tok.get_vocab_size(), num_hidden_layers=2,
                                                 initializer_range=0.08, max_position_embeddings=256)
    dsmoe.save_pretrained(dsmoe.Transformer(config), path)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "chat_template": TEMPLATE}))
    return path


@pytest.fixture(scope="module")
def served(model_dir):
    """(base URL, model, tokenizer, engine) for the module's tests: the objects `dsmoe serve` builds."""
    model = dsmoe.load_pretrained(model_dir)
    assets = load_text_assets(model_dir, model.config)
    engine, kind = make_engine(model, cache_bytes=8 << 20, max_running=16, max_waiting=64)
    assert "continuous batching" in kind
    app = create_app(engine, assets.tokenizer, "tiny", chat_template=assets.chat_template,
                     eos_token_ids=assets.eos_token_ids, sampling_defaults=assets.sampling_defaults,
                     vocab_size=model.config.vocab_size)
    with running(app) as url:
        yield url, model, assets.tokenizer, engine
    engine.shutdown(drain=False)


def _alone(model, tok, ids, n, **kw):
    """dsmoe.generate on this prompt alone -> (text, completion tokens, finish_reason)."""
    eos = tok.token_to_id("<|endoftext|>")
    new = dsmoe.generate(model, [ids], n, eos_token_id=eos, **kw)[0][len(ids):]
    hit = bool(new) and new[-1] == eos
    return tok.decode(new[:-1] if hit else new), len(new), "stop" if hit else "length"


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_completions_and_chat_match_generate(served):
    url, model, tok, _ = served
    client = _client(url)
    prompt = "def add(a, b):\n"
    text, n, reason = _alone(model, tok, tok.encode(prompt).ids, 20)
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    assert (out.choices[0].text, out.usage.completion_tokens, out.choices[0].finish_reason) == (text, n, reason)
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage == out.usage
    # a stop string on real output: cut where it starts, finish_reason stop
    if len(text) > 6:
        stop = text[3:6]
        cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, stop=stop)
        assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    # chat: the template renders the prompt; the answer is generate() on those ids
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "for i in"}]
    rendered = "<|endoftext|>You write Python.\n\nUser: for i in\n\nAssistant:"
    text, n, reason = _alone(model, tok, tok.encode(rendered, add_special_tokens=False).ids, 16)
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert chat.choices[0].message.content == text and chat.usage.completion_tokens == n
    streamed = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                                   stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text
    assert streamed[-1].choices[0].finish_reason == reason == chat.choices[0].finish_reason


def test_32_concurrent_requests_equal_generate_alone(served):
    url, model, tok, _ = served
    client = _client(url)
    prompts = [TEXT[i % 3 * 30: i % 3 * 30 + 5 + i] for i in range(32)]
    lengths = [4 + (7 * i) % 17 for i in range(32)]
    results: dict[int, object] = {}

    def call(i):
        try:
            results[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i],
                                                   temperature=0)
        except Exception as err:  # reported below
            results[i] = err

    threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(32):
        text, n, _ = _alone(model, tok, tok.encode(prompts[i]).ids, lengths[i])
        assert (results[i].choices[0].text, results[i].usage.completion_tokens) == (text, n), i


def test_small_cache_preempts_and_stays_exact(model_dir, served):
    """A pool of 12 blocks of 16 tokens for 8 sequences of ~50 positions: sequences are preempted and
    recomputed, and every answer is still generate() alone."""
    from dsmoe.serve.loop import ThreadedEngine

    model = served[1]  # the module's model (its own engine stays idle meanwhile)
    assets = load_text_assets(model_dir, model.config)
    engine = ThreadedEngine.from_model(model, cache_tokens=12 * 16, block_size=16, max_running=8)
    app = create_app(engine, assets.tokenizer, "tiny", eos_token_ids=assets.eos_token_ids,
                     sampling_defaults=assets.sampling_defaults)
    prompts = [TEXT[i * 7: i * 7 + 20] for i in range(8)]
    results: dict = {}
    with running(app) as url:
        client = _client(url)
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, client.completions.create(
            model="tiny", prompt=prompts[i], max_tokens=40, temperature=0, extra_body={"ignore_eos": True}))) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = httpx.get(url + "/metrics").text
    engine.shutdown()
    assert float(metrics.split("\ndsmoe_preemptions_total ")[1].split()[0]) > 0
    for i in range(8):
        ids = assets.tokenizer.encode(prompts[i]).ids
        new = dsmoe.generate(model, [ids], 40)[0][len(ids):]
        assert results[i].choices[0].text == assets.tokenizer.decode(new), i


def test_serial_fallback_engine(model_dir, served):
    """The fallback for models the paged engine cannot run: the same answers, one request at a time."""
    from dsmoe.serve.serial import SerialEngine

    _, model, tok, _ = served
    # room for all three clients in the queue: on a busy machine they can all arrive before the first runs
    engine = SerialEngine(model, max_waiting=3)
    app = create_app(engine, tok, "tiny", eos_token_ids=[tok.token_to_id("<|endoftext|>")])
    prompts = ["def add", "for i in", "class Po"]
    results: dict = {}
    with running(app) as url:
        client = _client(url)
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, client.completions.create(
            model="tiny", prompt=prompts[i], max_tokens=12, temperature=0))) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # the queue: one running, max_waiting queued, then EngineOverloaded; aborts end both with "abort"
    from dsmoe.serve.protocol import EngineOverloaded, SamplingParams

    engine.shutdown(drain=True)
    engine = SerialEngine(model, max_waiting=2)
    events: dict = {"a": [], "b": []}
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    engine.submit("a", [5, 6], params, events["a"].append)
    deadline = time.time() + 10
    while not events["a"] and time.time() < deadline:
        time.sleep(0.005)
    engine.submit("b", [5], params, events["b"].append)
    engine.submit("b2", [5], params, lambda out: None)
    with pytest.raises(EngineOverloaded):
        engine.submit("c", [5], params, lambda out: None)
    engine.abort("b")
    engine.abort("a")
    while not (events["a"] and events["a"][-1].finished) and time.time() < deadline:
        time.sleep(0.005)
    assert [e.finish_reason for e in events["b"]] == ["abort"]
    assert events["a"][-1].finish_reason == "abort" and 0 < len(events["a"]) < 200
    engine.shutdown(drain=False)
    for i in range(3):
        text, n, _ = _alone(model, tok, tok.encode(prompts[i]).ids, 12)
        assert (results[i].choices[0].text, results[i].usage.completion_tokens) == (text, n)


def test_seeded_sample_ignores_concurrent_requests(served):
    client = _client(served[0])
    body = {"model": "tiny", "prompt": "class Point:", "max_tokens": 12, "temperature": 1.0, "seed": 1234}
    alone = client.completions.create(**body).choices[0].text
    others: list = []
    threads = [threading.Thread(target=lambda i=i: others.append(client.completions.create(
        model="tiny", prompt="for i", max_tokens=20, temperature=1.0, seed=i))) for i in range(4)]
    for t in threads:
        t.start()
    together = client.completions.create(**body).choices[0].text
    for t in threads:
        t.join()
    assert together == alone and len(others) == 4
    # n choices: choice j is the request seeded seed + j
    three = client.completions.create(**body, n=3)
    assert three.choices[0].text == alone and [c.index for c in three.choices] == [0, 1, 2]
    for j in (1, 2):
        assert three.choices[j].text == client.completions.create(**{**body, "seed": 1234 + j}).choices[0].text
    assert len({c.text for c in three.choices}) > 1


def test_prefix_hits_and_disconnect_free_blocks(served):
    url, model, tok, engine = served
    client = _client(url)
    system = TEXT[:120]

    def counter(name):
        for line in httpx.get(url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(name)

    hits = counter("dsmoe_prefix_cache_hits_total")
    texts = [client.completions.create(model="tiny", prompt=system + q, max_tokens=6, temperature=0).choices[0].text
             for q in ("x = 1", "y = 2")]
    assert counter("dsmoe_prefix_cache_hits_total") > hits
    for q, text in zip(("x = 1", "y = 2"), texts):
        assert text == _alone(model, tok, tok.encode(system + q).ids, 6)[0]
    # a client that goes away mid-stream: its sequence stops, its blocks come back (steps slowed down so
    # that the 200 tokens cannot all be generated before the client leaves)
    step = engine.engine.step
    engine.engine.step = lambda: (time.sleep(0.01), step())[1]
    generated = counter("dsmoe_generation_tokens_total")
    with httpx.stream("POST", url + "/v1/completions", json={"model": "tiny", "prompt": "def", "max_tokens": 200,
                                                             "temperature": 0, "ignore_eos": True,
                                                             "stream": True}, timeout=60) as r:
        lines = r.iter_lines()  # kept: a dropped iterator closes the response (a disconnect already)
        assert next(lines).startswith("data: ")
        assert counter("dsmoe_requests_running") == 1 and counter("dsmoe_cache_blocks_used") > 0
    deadline = time.time() + 10
    while counter("dsmoe_requests_running") and time.time() < deadline:
        time.sleep(0.05)
    engine.engine.step = step
    assert counter("dsmoe_requests_running") == 0 and counter("dsmoe_requests_waiting") == 0
    assert counter("dsmoe_generation_tokens_total") - generated < 100
    # idle prefix-cache blocks count as free (reusable): nothing is held once no request runs
    assert counter("dsmoe_cache_blocks_used") == 0


def test_cli_serves_and_exits_0_on_sigterm(model_dir):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "dsmoe", "serve", "--model", str(model_dir), "--port", str(port),
                             "--cache-memory", "4MiB", "--api-key", "k"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.1)
        name = model_dir.name
        assert httpx.post(url + "/v1/completions", json={"model": name, "prompt": "x"}).status_code == 401
        with httpx.stream("POST", url + "/v1/completions", headers={"Authorization": "Bearer k"}, timeout=60, json={
                "model": name, "prompt": "def", "max_tokens": 60, "temperature": 0, "ignore_eos": True,
                "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = sse(lines)  # the stream in flight finishes cleanly
        assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err and "continuous batching" in err
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("args,message", [
    (["--model", "{dir}/nope"], "no such model directory"),
    (["--model", "{dir}", "--port", "0"], "port"),
    (["--model", "{dir}", "--cache-memory", "lots"], "--cache-memory"),
    (["--model", "{dir}", "--max-running", "-1"], "--max-running"),
    (["--model", "{dir}", "--api-key", " "], "--api-key"),
])
def test_cli_errors_are_one_line(model_dir, capsys, args, message):
    from dsmoe.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["serve", *[a.format(dir=model_dir) for a in args]])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsmoe: error:") and message in lines[0], err


def test_generate_chat_renders_like_the_server(model_dir, served, capsys):
    from dsmoe.cli import main

    _, model, tok, _ = served
    assert main(["generate", "--model", str(model_dir), "--prompt", "for i in", "--system", "You write Python.",
                 "--chat", "--max-new-tokens", "10"]) == 0
    rendered = "<|endoftext|>You write Python.\n\nUser: for i in\n\nAssistant:"
    text, _, _ = _alone(model, tok, tok.encode(rendered, add_special_tokens=False).ids, 10)
    assert capsys.readouterr().out == text + "\n"
    (model_dir / "tokenizer_config.json").rename(model_dir / "moved.json")
    try:
        with pytest.raises(SystemExit):
            main(["generate", "--model", str(model_dir), "--prompt", "x", "--chat"])
        assert "no chat template" in capsys.readouterr().err
    finally:
        (model_dir / "moved.json").rename(model_dir / "tokenizer_config.json")


def test_a_train_run_directory_serves_as_it_is(tmp_path, served):
    """`dsmoe train`'s run layout (current -> step-N, top-level symlinks): its tokenizer, EOS <|endoftext|>."""
    from dsmoe.train.checkpoint import save_checkpoint

    _, model, tok, _ = served
    out = tmp_path / "run"
    save_checkpoint(out, model, tok.to_str(), {"step": 3})
    loaded = dsmoe.load_pretrained(out)
    assets = load_text_assets(out, loaded.config)
    assert assets.eos_token_ids == (tok.token_to_id("<|endoftext|>"),) and assets.chat_template is None
    engine, _ = make_engine(loaded, cache_bytes=1 << 20, max_running=4, max_waiting=4)
    app = create_app(engine, assets.tokenizer, "run", eos_token_ids=assets.eos_token_ids,
                     sampling_defaults=assets.sampling_defaults, vocab_size=loaded.config.vocab_size)
    with running(app) as url:
        client = _client(url)
        out_text = client.completions.create(model="run", prompt="def add", max_tokens=10, temperature=0)
        assert out_text.choices[0].text == _alone(model, tok, tok.encode("def add").ids, 10)[0]
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client.chat.completions.create(model="run", messages=[{"role": "user", "content": "x"}])
    engine.shutdown()


def test_speculative_greedy_equals_plain_greedy(model_dir, served):
    """--speculative: greedy requests are drafted by the MTP module, and answer exactly as plain greedy."""
    _, model, tok, _ = served
    assert model.mtp  # tiny-v3 has an MTP module
    engine, kind = make_engine(model, cache_bytes=4 << 20, max_running=8, speculative=True)
    assert "speculative" in kind
    app = create_app(engine, tok, "tiny", eos_token_ids=[tok.token_to_id("<|endoftext|>")], speculative=True)
    with running(app) as url:
        client = _client(url)
        for prompt in ("def add(a, b):\n", "for i in range"):
            out = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
            text, n, _ = _alone(model, tok, tok.encode(prompt).ids, 16)
            assert (out.choices[0].text, out.usage.completion_tokens) == (text, n)
        sampled = client.completions.create(model="tiny", prompt="x", max_tokens=4, temperature=1.0, seed=3)
        assert sampled.usage.completion_tokens >= 1  # sampling is served too, without drafting
        metrics = httpx.get(url + "/metrics").text
    drafted = float(metrics.split("\ndsmoe_speculative_drafted_total ")[1].split()[0])
    assert drafted == engine.engine.drafted > 0
    engine.shutdown()


def test_a_model_the_paged_engine_cannot_run_is_served_serially(served):
    """DeepSeek-V3.2 (sparse attention) is not in the paged engine yet: `dsmoe serve` falls back to the serial
    engine, and the answers are still generate() alone."""
    _, _, tok, _ = served
    torch.manual_seed(0)
    model = dsmoe.Transformer(dsmoe.get_preset("tiny-v3.2").replace(vocab_size=tok.get_vocab_size(),
                                                                    num_hidden_layers=2)).eval()
    engine, kind = make_engine(model, cache_bytes=1 << 20)
    assert kind.startswith("serial engine") and "deepseek_v32" in kind
    app = create_app(engine, tok, "v32", eos_token_ids=[tok.token_to_id("<|endoftext|>")])
    with running(app) as url:
        out = _client(url).completions.create(model="v32", prompt="def add", max_tokens=8, temperature=0)
    engine.shutdown()
    text, n, _ = _alone(model, tok, tok.encode("def add").ids, 8)
    assert (out.choices[0].text, out.usage.completion_tokens) == (text, n)

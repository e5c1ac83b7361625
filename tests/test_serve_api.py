"""The HTTP layer's wire contract, against a scripted engine (tests/fake_engine.py) on a real uvicorn server:
stop strings across tokens, UTF-8 held back, stream == non-stream, usage, refused options, bad input,
overload, disconnects and engine failures. Text is checked against tokenizers' own decode of the ids."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from chat_templates import MIXTRAL_INSTRUCT
from fake_engine import ScriptedEngine
from serve_harness import running, sse
from tiny_assets import build_tokenizer

from dsmoe.serve.api import create_app
from dsmoe.serve.chat import ChatTemplate

TEXT = "def add(a, b):\n    return a + b\nfor i in range(10):\n    print(i)\n"
UNICODE = "print('é 你好 🙂 ü')\n"
MODEL = "tiny"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def _app(tok, engine, **kw):
    kw.setdefault("chat_template", ChatTemplate("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                                                "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"))
    kw.setdefault("sampling_defaults", {"temperature": 0.0})
    return create_app(engine, tok, MODEL, vocab_size=tok.get_vocab_size(), **kw)


def _client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


_HTTP: dict[str, httpx.Client] = {}


def _post(url, path, body, **kw):
    """POST over one kept-alive connection per server (new connections are slow on a busy machine)."""
    client = _HTTP.get(url)
    if client is None:
        client = _HTTP[url] = httpx.Client(timeout=30)
    return client.post(url + path, json=body, **kw)


def test_stream_equals_non_stream_and_utf8_is_held_back(tok):
    ids = tok.encode(TEXT + UNICODE).ids
    assert len(ids) > len(tok.encode(TEXT).ids) + len(UNICODE)  # multi-byte characters span several tokens
    engine = ScriptedEngine(lambda prompt, p: ids, max_context=256)
    with running(_app(tok, engine)) as url:
        client = _client(url)
        full = client.completions.create(model=MODEL, prompt="def", max_tokens=200, temperature=0)
        expected = tok.decode(ids)
        assert full.choices[0].text == expected and full.choices[0].finish_reason == "stop"
        assert full.usage.completion_tokens == len(ids) and full.usage.prompt_tokens == len(tok.encode("def").ids)
        with httpx.stream("POST", url + "/v1/completions", json={
                "model": MODEL, "prompt": "def", "max_tokens": 200, "stream": True,
                "stream_options": {"include_usage": True}}, timeout=30) as r:
            events = sse(r)
        assert events[-1] == "[DONE]"
        pieces = [c["choices"][0]["text"] for c in events[:-2]]
        assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == expected
        assert [c["choices"][0]["finish_reason"] for c in events[:-2]][-1] == "stop"
        assert events[-2]["choices"] == [] and events[-2]["usage"] == full.usage.model_dump(exclude_none=True)
        assert all(c["usage"] is None for c in events[:-2])
        # chat, with the official client, streamed and not
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=12)
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=12, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert chat.choices[0].message.content == tok.decode(ids[:12]) and chat.choices[0].finish_reason == "length"
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
        assert chunks[-1].usage == chat.usage and chat.usage.completion_tokens == 12
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        rendered = "user: hi\nassistant:"
        assert engine.submitted[-1][1] == tok.encode(rendered, add_special_tokens=False).ids
    engine.shutdown()


def test_stop_string_across_tokens_is_cut_and_never_streamed(tok):
    ids = tok.encode(TEXT).ids
    pieces = [tok.decode([i]) for i in ids]
    # a stop string made of the end of one token and the start of the next, first occurring at that seam
    k = next(k for k in range(1, len(ids)) if len(pieces[k - 1]) >= 1 and len(pieces[k]) >= 2
             and TEXT.find(pieces[k - 1][-1] + pieces[k][:2]) == len("".join(pieces[:k])) - 1)
    stop = pieces[k - 1][-1] + pieces[k][:2]
    expected = TEXT[:TEXT.find(stop)]
    engine = ScriptedEngine(lambda prompt, p: ids + [5] * 50, max_context=256, tick=0.002)
    with running(_app(tok, engine)) as url:
        client = _client(url)
        full = client.completions.create(model=MODEL, prompt="x", max_tokens=100, stop=[stop, "never"])
        assert full.choices[0].text == expected and full.choices[0].finish_reason == "stop"
        assert full.usage.completion_tokens == k + 1  # counted through the token that completed it
        streamed = list(client.completions.create(model=MODEL, prompt="x", max_tokens=100, stop=stop, stream=True))
        assert "".join(c.choices[0].text for c in streamed) == expected
        assert streamed[-1].choices[0].finish_reason == "stop"
        time.sleep(0.05)
        assert len(engine.aborted) == 2  # the engine stopped generating for both
        # EOS ends with "stop" and is no text; max_tokens ends with "length"
        eos_engine_ids = ids[:3] + [0]
        engine.script = lambda prompt, p: eos_engine_ids + ids
        app_eos = _app(tok, engine, eos_token_ids=[0])
    with running(app_eos) as url:
        out = _client(url).completions.create(model=MODEL, prompt="x", max_tokens=50)
        assert out.choices[0].text == tok.decode(ids[:3]) and out.choices[0].finish_reason == "stop"
        assert out.usage.completion_tokens == 4
    engine.shutdown()


REFUSED = [("n", 17), ("logprobs", 1), ("echo", True), ("logit_bias", {"5": 1}), ("best_of", 3),
           ("presence_penalty", 0.5), ("frequency_penalty", -1), ("suffix", "x"), ("wat", 1)]
CHAT_REFUSED = [("n", 0), ("logprobs", True), ("top_logprobs", 2), ("tools", [{"type": "function"}]),
                ("response_format", {"type": "json_object"})]
BAD = [  # (path, body change, status, param)
    ("/v1/completions", {"model": "other"}, 400, "model"),
    ("/v1/completions", {"model": None}, 400, "model"),
    ("/v1/completions", {"prompt": None}, 400, "prompt"),
    ("/v1/completions", {"prompt": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [99999]}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"max_tokens": 1000}, 400, "max_tokens"),
    ("/v1/completions", {"temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"seed": 1.5}, 400, "seed"),
    ("/v1/completions", {"stop": [1]}, 400, "stop"),
    ("/v1/completions", {"stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]"),
]


def test_bad_input_and_refused_options_are_400_naming_the_field(tok):
    ids = tok.encode(TEXT).ids
    engine = ScriptedEngine(lambda prompt, p: ids, max_context=64)
    with running(_app(tok, engine)) as url:
        base = {"/v1/completions": {"model": MODEL, "prompt": "def", "max_tokens": 4},
                "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                         "max_tokens": 4}}
        cases = [("/v1/completions", {k: v}, 400, k) for k, v in REFUSED]
        cases += [("/v1/chat/completions", {k: v}, 400, k) for k, v in CHAT_REFUSED] + BAD
        for path, change, status, param in cases:
            r = _post(url, path, {**base[path], **change})
            assert r.status_code == status, (change, r.text)
            error = r.json()["error"]
            assert error["param"] == param and param.split("[")[0].split(".")[0] in error["message"], error
            assert set(error) == {"message", "type", "param", "code"}
            # the next good request succeeds
            assert _post(url, path, base[path]).status_code == 200
        # defaults of unimplemented options are accepted, not refused
        ok = {"n": 1, "logprobs": None, "echo": False, "logit_bias": {}, "presence_penalty": 0, "user": "u"}
        assert _post(url, "/v1/completions", {**base["/v1/completions"], **ok}).status_code == 200
        r = httpx.post(url + "/v1/completions", content=b'{"model": "tiny", "prompt": ', timeout=30)
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        # the context: prompt + max_tokens == 64 is served, one more token is a 400
        prompt = list(range(10, 10 + 60))
        full = _post(url, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 4})
        assert full.status_code == 200 and full.json()["usage"]["prompt_tokens"] == 60
        over = _post(url, "/v1/completions", {"model": MODEL, "prompt": prompt + [10], "max_tokens": 4})
        assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens"
        assert _post(url, "/v1/completions", {"model": MODEL, "prompt": list(range(64))}).json()["error"][
            "param"] == "prompt"
        # a list of prompts: one choice each; token-id lists too
        for prompts in (["a", "b c"], [[5, 6], [7]]):
            many = _post(url, "/v1/completions", {"model": MODEL, "prompt": prompts, "max_tokens": 3}).json()
            assert [c["index"] for c in many["choices"]] == [0, 1]
            assert all(c["text"] == tok.decode(ids[:3]) for c in many["choices"])
            assert many["usage"]["completion_tokens"] == 6
        assert engine.submitted[-2][1] == [5, 6] and engine.submitted[-1][1] == [7]
        # n choices per prompt, in OpenAI's order (prompt-major); usage counts each prompt once
        many = _post(url, "/v1/completions", {"model": MODEL, "prompt": [[5, 6], [7]], "max_tokens": 2, "n": 2}).json()
        assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
        assert [s[1] for s in engine.submitted[-4:]] == [[5, 6], [5, 6], [7], [7]]
        assert many["usage"]["prompt_tokens"] == 3 and many["usage"]["completion_tokens"] == 8
        with httpx.stream("POST", url + "/v1/chat/completions", json={**base["/v1/chat/completions"], "n": 2,
                                                                      "stream": True}, timeout=30) as r:
            chunks = sse(r)[:-1]
        for index in (0, 1):
            mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
            assert mine[0]["delta"] == {"role": "assistant", "content": ""} and mine[-1]["finish_reason"] == "length"
            assert "".join(c["delta"].get("content", "") for c in mine) == tok.decode(ids[:4])
        mixed = _post(url, "/v1/completions", {"model": MODEL, "prompt": ["a", [5, 6]], "max_tokens": 3})
        assert mixed.status_code == 400 and mixed.json()["error"]["param"] == "prompt"
        # a model without a chat template refuses chat with a 400
    with running(_app(tok, engine, chat_template=None)) as url:
        r = _post(url, "/v1/chat/completions", base["/v1/chat/completions"])
        assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
    # a template that refuses the conversation (its raise_exception): a 400 with its words
    app = _app(tok, engine, chat_template=ChatTemplate(MIXTRAL_INSTRUCT, {"bos_token": "<s>", "eos_token": "</s>"}))
    with running(app) as url:
        r = _post(url, "/v1/chat/completions", {**base["/v1/chat/completions"], "messages": [
            {"role": "system", "content": "x"}, {"role": "user", "content": "y"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert "Conversation roles must alternate" in r.json()["error"]["message"]
        assert _post(url, "/v1/chat/completions", base["/v1/chat/completions"]).status_code == 200
        # shutting down (SIGTERM in dsmoe serve): new requests are refused with a 503, /health says so
        app.state.draining = True
        assert _post(url, "/v1/completions", base["/v1/completions"]).status_code == 503
        assert httpx.get(url + "/health").status_code == 503
    engine.shutdown()


def test_api_key_overload_and_per_request_failures(tok):
    ids = tok.encode(TEXT).ids * 4  # > 30 tokens: each request streams for 0.3 s at least
    engine = ScriptedEngine(lambda prompt, p: ids, max_context=256, tick=0.01, max_running=1, max_waiting=1,
                            raise_at_step=lambda prompt: prompt == [7])
    body = {"model": MODEL, "prompt": "def", "max_tokens": 30}
    with running(_app(tok, engine, api_key="sekrit")) as url:
        assert _post(url, "/v1/completions", body).status_code == 401
        assert _post(url, "/v1/completions", body, headers={"Authorization": "Bearer nope"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            _client(url, "wrong").models.list()
        client = _client(url, "sekrit")
        assert [m.id for m in client.models.list().data] == [MODEL]
        assert httpx.get(url + "/health").status_code == 200  # no key needed
        # one running, one waiting: the third is a 429 with Retry-After
        results = {}

        def call(name, **kw):
            try:
                results[name] = client.completions.create(**{**body, **kw})
            except openai.APIStatusError as err:
                results[name] = err

        threads = [threading.Thread(target=call, args=(n,)) for n in ("a", "b")]
        deadline = time.time() + 20
        for t, running_, waiting in zip(threads, (1, 1), (0, 1)):
            t.start()  # a is admitted before b is queued
            while not (len(engine.running) == running_ and len(engine.waiting) == waiting) and time.time() < deadline:
                time.sleep(0.002)
        r = _post(url, "/v1/completions", body, headers={"Authorization": "Bearer sekrit"})
        assert r.status_code == 429 and r.headers["Retry-After"] == "3" and r.json()["error"]["code"] == "queue_full"
        for t in threads:
            t.join()
        assert all(results[n].choices[0].text == tok.decode(ids[:30]) for n in ("a", "b"))
        # an engine failure for one request: a 500 with its message; the others are served
        engine.max_running, engine.max_waiting = 2, 4
        threads = [threading.Thread(target=call, args=(n,), kwargs=kw)
                   for n, kw in (("ok", {}), ("bad", {"prompt": [7]}))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert isinstance(results["bad"], openai.InternalServerError)
        assert "injected engine failure" in results["bad"].message
        assert results["ok"].choices[0].text == tok.decode(ids[:30])
        assert client.completions.create(**{**body, "max_tokens": 5}).choices[0].finish_reason == "length"
    engine.shutdown()


def test_disconnect_mid_stream_aborts_and_frees_blocks(tok):
    ids = tok.encode(TEXT).ids * 4
    engine = ScriptedEngine(lambda prompt, p: ids, max_context=512, tick=0.02)
    with running(_app(tok, engine)) as url:
        with httpx.stream("POST", url + "/v1/completions", json={"model": MODEL, "prompt": "def", "max_tokens": 200,
                                                                  "stream": True}, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            during = httpx.get(url + "/metrics").text
        deadline = time.time() + 5
        while engine.stats().running and time.time() < deadline:
            time.sleep(0.02)
        assert len(engine.aborted) == 1 and engine.stats().blocks_used == 0
        assert "dsmoe_requests_running 1" in during and "dsmoe_cache_blocks_used 0" not in during
        metrics = httpx.get(url + "/metrics").text
        assert "dsmoe_requests_running 0" in metrics and "dsmoe_cache_blocks_used 0" in metrics
        # the same for a non-streaming request whose client gives up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 200}, timeout=1.0)
        deadline = time.time() + 5
        while len(engine.aborted) < 2 and time.time() < deadline:
            time.sleep(0.02)
        assert len(engine.aborted) == 2 and engine.stats().running == 0
        ttft = [line for line in metrics.splitlines() if line.startswith("dsmoe_time_to_first_token_seconds_count")]
        assert ttft == ["dsmoe_time_to_first_token_seconds_count 1"]
        assert "# TYPE dsmoe_time_per_output_token_seconds histogram" in metrics
    engine.shutdown()


def test_sse_lines_are_well_formed(tok):
    ids = tok.encode(TEXT).ids
    engine = ScriptedEngine(lambda prompt, p: ids, max_context=256)
    with running(_app(tok, engine)) as url:
        r = httpx.post(url + "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 5, "stream": True}, timeout=30)
        assert r.headers["content-type"].startswith("text/event-stream")
        blocks = r.text.split("\n\n")
        assert blocks[-1] == "" and blocks[-2] == "data: [DONE]"
        chunks = [json.loads(b[len("data: "):]) for b in blocks[:-2]]
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    engine.shutdown()


def test_defaults_come_from_generation_config(tmp_path, tok):
    from dsmoe.checkpoint.generation_config import GenerationConfig, write_generation_config
    from dsmoe.presets import get_preset
    from dsmoe.serve.assets import load_text_assets

    build_tokenizer(tmp_path)
    config = get_preset("tiny-v3").replace(eos_token_id=9)
    assert load_text_assets(tmp_path, config).eos_token_ids == (9,)  # config.json's when no generation_config
    assert load_text_assets(tmp_path, config.replace(eos_token_id=None)).eos_token_ids == (0,)  # <|endoftext|>
    write_generation_config(tmp_path, GenerationConfig(eos_token_id=[5, 7], do_sample=True, temperature=0.7,
                                                       top_p=0.9, top_k=20, max_new_tokens=11))
    assets = load_text_assets(tmp_path, config)
    assert assets.eos_token_ids == (5, 7) and assets.default_max_tokens == 11
    engine = ScriptedEngine(lambda prompt, p: [3] * 100, max_context=64)
    with running(_app(tok, engine, eos_token_ids=assets.eos_token_ids, sampling_defaults=assets.sampling_defaults,
                      default_max_tokens=assets.default_max_tokens)) as url:
        client = _client(url)
        client.completions.create(model=MODEL, prompt="def")
        p = engine.submitted[-1][2]
        assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.eos_token_ids) == (11, 0.7, 0.9, 20, (5, 7))
        client.completions.create(model=MODEL, prompt="def", max_tokens=3, temperature=0, top_p=1, seed=4)
        p = engine.submitted[-1][2]
        assert (p.max_tokens, p.temperature, p.top_p, p.seed) == (3, 0.0, None, 4)
    with running(_app(tok, engine)) as url:  # no generation_config: OpenAI's defaults
        client = _client(url)
        client.completions.create(model=MODEL, prompt="def")
        assert engine.submitted[-1][2].max_tokens == 16
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        prompt_len = len(engine.submitted[-1][1])
        assert engine.submitted[-1][2].max_tokens == 64 - prompt_len  # chat: what fits
    engine.shutdown()

"""The lm-evaluation-harness adapter: each request type against transformers on the same checkpoint, and a
small local multiple-choice task run by lm_eval itself. Skipped when lm_eval is not installed (the `eval`
extra; CI installs it with the test extra)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from train_assets import hf_checkpoint

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402

from dsmoe.lm_eval_adapter import DsmoeLM  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    corpus = tmp_path_factory.mktemp("corpus")
    (corpus / "json.py").write_text(inspect.getsource(json))
    return hf_checkpoint(tmp_path_factory.mktemp("model"), "v2-lite-noqlora", corpus)


@pytest.fixture(scope="module")
def oracle(model_dir):
    from tokenizers import Tokenizer

    return (transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval(),
            Tokenizer.from_file(str(model_dir / "tokenizer.json")))


def _request(kind: str, *args) -> Instance:
    return Instance(kind, {}, tuple(args), 0)


def _hf_logprob(model, ids: list[int], scored_from: int) -> tuple[float, bool]:
    with torch.no_grad():
        log_p = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    rows = range(scored_from - 1, len(ids) - 1)
    total = sum(float(log_p[r, ids[r + 1]]) for r in rows)
    return total, all(int(log_p[r].argmax()) == ids[r + 1] for r in rows)


PAIRS = [("def dumps(obj", ", skipkeys=False"), ("import", " json"), ("", "class JSONDecoder")]


def test_loglikelihood_and_rolling_equal_transformers(model_dir, oracle):
    ref, tok = oracle
    lm = DsmoeLM(pretrained=str(model_dir))
    got = lm.loglikelihood([_request("loglikelihood", c, x) for c, x in PAIRS])
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got):
        ctx = tok.encode(context, add_special_tokens=False).ids or [0]  # empty context: the BOS id
        ids = ctx + tok.encode(context + continuation, add_special_tokens=False).ids[len(ctx) if context else 0:]
        expected, expected_greedy = _hf_logprob(ref, ids, len(ctx))
        assert logprob == pytest.approx(expected, rel=1e-4) and greedy == expected_greedy
    text = inspect.getsource(json)[:400]
    (rolling,) = DsmoeLM(pretrained=str(model_dir), max_length=16).loglikelihood_rolling([_request("loglikelihood_rolling", text)])
    ids = [0, *tok.encode(text, add_special_tokens=False).ids]  # BOS, then every token scored once
    expected = 0.0
    with torch.no_grad():  # windows of 16: the first scores 15 tokens, each next one 15 more
        end = 1
        while end < len(ids):
            new_end = min(len(ids), 16 if end == 1 else end + 15)
            begin = max(0, new_end - 16)
            log_p = torch.log_softmax(ref(torch.tensor([ids[begin:new_end]])).logits[0].double(), -1)
            expected += sum(float(log_p[t - 1 - begin, ids[t]]) for t in range(end, new_end))
            end = new_end
    assert rolling == pytest.approx(expected, rel=1e-4)


def test_generate_until_is_greedy_and_stops(model_dir, oracle):
    ref, tok = oracle
    lm = DsmoeLM(pretrained=str(model_dir))
    context = "def loads(s"
    (text,) = lm.generate_until([_request("generate_until", context, {"until": [], "max_gen_toks": 8})])
    ids = tok.encode(context, add_special_tokens=False).ids
    with torch.no_grad():
        hf = ref.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=1, pad_token_id=1)
    assert text == tok.decode(hf[0, len(ids):].tolist(), skip_special_tokens=True)
    if len(text) > 2:
        stop = text[1:3]
        (cut,) = lm.generate_until([_request("generate_until", context, {"until": [stop], "max_gen_toks": 8})])
        assert cut == text[:text.index(stop)]


def test_a_local_multiple_choice_task_through_lm_eval(model_dir, oracle, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    ref, tok = oracle
    docs = [{"question": "import", "choices": [" json", " os", " sys"], "answer": 0},
            {"question": "def dumps(obj,", "choices": [" skipkeys", " indent", " x"], "answer": 1},
            {"question": "class JSON", "choices": ["Decoder", "Encoder"], "answer": 1}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "task.yaml").write_text(
        "task: dsmoe_local_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n")
    results = lm_eval.simple_evaluate(model=DsmoeLM(pretrained=str(model_dir)), tasks=["dsmoe_local_mc"],
                                      task_manager=TaskManager(include_path=str(tmp_path)))
    acc = results["results"]["dsmoe_local_mc"]["acc,none"]
    hits = 0
    for doc in docs:  # the oracle's choice: transformers' highest log-likelihood
        ctx = tok.encode(doc["question"], add_special_tokens=False).ids
        scores = [_hf_logprob(ref, ctx + tok.encode(doc["question"] + c, add_special_tokens=False).ids[len(ctx):],
                              len(ctx))[0] for c in doc["choices"]]
        hits += scores.index(max(scores)) == doc["answer"]
    assert acc == pytest.approx(hits / len(docs))

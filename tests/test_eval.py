"""`dsmoe eval`: perplexity equals transformers' on the same weights and tokens; expert load and MTP figures."""

from __future__ import annotations

import inspect
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from train_assets import hf_checkpoint

import dsmoe
from dsmoe.presets import get_preset
from dsmoe.train.text_eval import evaluate_tokens, windows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for module in (json, inspect, subprocess):
        (folder / f"{module.__name__}.py").write_text(inspect.getsource(module))
    return folder


def _eval(capsys, *args: str) -> tuple[int, str, str]:
    """`dsmoe eval` in this process: (exit status, stdout, stderr)."""
    from dsmoe.cli import main

    capsys.readouterr()
    try:
        code = main(["eval", *args])
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("seq_len,stride", [(12, 12), (16, 5)])
def test_windows_score_every_token_once(seq_len, stride):
    plan = windows(50, seq_len, stride)
    scored = [t for begin, end, first in plan for t in range(first, end)]
    assert scored == list(range(1, 50))
    assert all(end - begin <= seq_len and begin < first for begin, end, first in plan)
    assert all(end - first <= stride for _, end, first in plan[1:])


@pytest.mark.parametrize("case", ["v2-lite-noqlora", "mixtral"])
def test_perplexity_equals_transformers(case, corpus, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    model_dir = hf_checkpoint(tmp_path / "model", case, corpus)
    text = tmp_path / "held_out.txt"
    text.write_text(inspect.getsource(json.decoder)[:3000])
    seq_len, stride = 32, 12
    code, stdout, stderr = _eval(capsys, "--model", str(model_dir), "--data", str(text), "--seq-len", str(seq_len),
                                 "--stride", str(stride), "--json")
    assert code == 0, stderr
    got = json.loads(stdout)

    # The oracle: transformers' logits over the same windows of the same tokens (BOS + text + EOS).
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = torch.tensor([0, *tok.encode(text.read_text(), add_special_tokens=False).ids, 1])
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nll, count, end = 0.0, 0, 0
    with torch.no_grad():
        while end < len(ids):  # each token t >= 1 scored once, with the seq_len - 1 tokens before it at most
            first, end = end if end else 1, min(end + stride if end else seq_len, len(ids))
            begin = max(0, end - seq_len)
            log_p = torch.log_softmax(ref(ids[begin:end].unsqueeze(0)).logits[0].double(), -1)
            for t in range(first, end):
                nll -= float(log_p[t - 1 - begin, ids[t]])
                count += 1
    assert got["tokens"] == count == len(ids) - 1
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.read_bytes()), rel=1e-4)
    # Every scored position routes top-k tokens in every MoE layer.
    top_k = ref.config.num_experts_per_tok
    assert [sum(load) for load in got["expert_load"]] == [count * top_k] * len(got["expert_load"])
    assert len(got["max_vio"]) == len(got["dead_experts"]) == len(got["expert_load"]) > 0
    assert "mtp_acceptance" not in got


def test_mtp_acceptance_matches_a_direct_count(tmp_path):
    """One window over the whole text: depth-1 drafts compared with the main model's greedy tokens, counted
    here from a plain forward of the model and its MTP module."""
    torch.manual_seed(0)
    model = dsmoe.Transformer(get_preset("tiny-v3").replace(vocab_size=64, num_hidden_layers=2)).eval()
    ids = torch.randint(0, 64, (40,))
    result = evaluate_tokens(model, ids, n_bytes=40, seq_len=40)
    with torch.no_grad():
        h = model.hidden_states(ids[None])
        greedy = model(ids[None])[0].argmax(-1)
        mtp = model.mtp[0]
        x = mtp.eh_proj(torch.cat((mtp.enorm(model.embed(ids[None, 1:])), mtp.hnorm(h[:, :-1])), -1))
        x = mtp.block(x, model.rope(torch.arange(39), x.dtype))
        draft = model.head(mtp.norm(x))[0].argmax(-1)  # row i predicts token i + 2
    assert result.mtp_drafts == [38]
    assert result.mtp_accepted == [int((draft[:38] == greedy[1:39]).sum())]
    assert result.mtp_correct == [int((draft[:38] == ids[2:]).sum())]


def test_eval_errors_are_one_line(tmp_path, corpus, capsys):
    code, _, stderr = _eval(capsys, "--model", str(tmp_path / "missing"), "--data", str(corpus))
    assert code == 2 and stderr.startswith("dsmoe: error: --model") and stderr.count("\n") == 1, stderr

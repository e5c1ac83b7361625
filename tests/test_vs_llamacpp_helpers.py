"""Smoke test of the llama.cpp comparison's pure helpers (benchmarks/llamacpp.py, benchmarks/vs_llamacpp.py).

The benchmark itself needs a llama.cpp build and minutes of CPU: it is not run here."""

import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

llamacpp = pytest.importorskip("llamacpp")
vs = pytest.importorskip("vs_llamacpp")


def test_routing_keys_added_only_where_missing_and_only_for_v3():
    v3 = {"model_type": "deepseek_v3", "n_group": 8}
    assert llamacpp.add_routing_keys(v3) == {"model_type": "deepseek_v3", "n_group": 8,
                                             "scoring_func": "sigmoid", "topk_method": "noaux_tc"}
    own = {"model_type": "deepseek_v3", "scoring_func": "softmax"}
    assert llamacpp.add_routing_keys(own)["scoring_func"] == "softmax"
    assert "scoring_func" not in llamacpp.add_routing_keys({"model_type": "deepseek_v2"})


def test_patch_config_rewrites_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    llamacpp.patch_config(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["topk_method"] == "noaux_tc"


def test_bpe_tokenizer_has_the_model_vocab_and_round_trips_bytes(tmp_path):
    from tokenizers import Tokenizer

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "eos_token_id": 1}))
    llamacpp.write_bpe_tokenizer(tmp_path, 1024)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == 1024
    text = "the quick brown fox, café 🚀 \n\t x"
    assert tok.decode(tok.encode(text).ids) == text
    assert len(tok.encode("abc").ids) < 3  # merges apply
    assert "eos_token_id" not in json.loads((tmp_path / "config.json").read_text())


def test_bench_args():
    assert vs.bench_args("prefill", 512, 32) == ["-p", "512", "-n", "0"]
    assert vs.bench_args("decode@2048", 512, 32) == ["-p", "0", "-n", "32", "-d", "2048"]


def test_compare_logprobs_against_hand_computed_kl():
    steps = [{"top_logprobs": [{"id": 3, "logprob": math.log(0.75)}, {"id": 5, "logprob": math.log(0.25)}]}]
    ours = [{3: math.log(0.5), 5: math.log(0.5)}]
    got = vs.compare_logprobs(steps, ours)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert got["kl_top_mean"] == pytest.approx(kl) and got["kl_top_max"] == pytest.approx(kl)
    assert got["max_abs_logprob_diff"] == pytest.approx(math.log(2))  # the 0.25 vs 0.5 entry
    assert vs.common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2

"""`dsmoe.bench` in a tiny configuration: the result structure, and dsmoe agreeing with transformers."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from dsmoe import cli  # noqa: E402
from dsmoe.bench import IMPLS, TARGETS, BenchConfig, run_bench  # noqa: E402

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
            first_k_dense_replace=1, n_group=4, topk_group=2, max_position_embeddings=64, initializer_range=0.1)


def tiny(**overrides) -> BenchConfig:
    return BenchConfig(**{"dtypes": ("fp32",), "batch_size": 2, "seq_len": 16, "decode_shapes": ((1, 8), (2, 12)),
                          "new_tokens": 3, "repeats": 1, "matmul_size": 64, "matmul_repeats": 1, "model": TINY,
                          "bandwidth_mebibytes": 4,
                          **overrides})


def test_bench_structure_and_parity():
    calls = []
    result = run_bench(tiny(), lambda what, done, total: calls.append((done, total)))
    json.dumps(result)  # serialisable as is
    assert calls and calls[-1][0] == calls[-1][1]  # progress reaches its total
    kinds = [(r["measurement"], r["shape"]) for r in result["rows"]]
    assert kinds == [("forward", "2x16"), ("train", "2x16"), ("decode", "1x8+3"), ("decode", "2x12+3")]
    for r in result["rows"]:
        for name in IMPLS:
            assert r[name]["tokens_per_s"] > 0 and len(r[name]["times_s"]) == 1
        assert r["ratio"] == pytest.approx(r["dsmoe"]["tokens_per_s"] / r["transformers"]["tokens_per_s"])
    fwd = result["rows"][0]
    assert 0 < fwd["dsmoe_peak_fraction"] and result["matmul_peak_flops"]["fp32"] > 0
    for kind in ("forward", "train", "decode"):
        assert result["experts_implementation"]["fp32"][kind]["chosen"] in ("grouped_mm", "eager")
    assert all(r["transformers_experts_implementation"] in ("grouped_mm", "eager") for r in result["rows"])
    parity = result["parity"]["fp32"]
    # at most one position may differ (a routing near-tie flipping on the last bit); the rest agree to fp32
    assert parity["forward_positions_differing"] <= 1 and parity["forward_positions"] == 32
    assert parity["forward_argmax_agree_fraction"] >= 31 / 32
    assert parity["decode_1x8_tokens_equal"] and parity["decode_2x12_tokens_equal"]
    assert parity["train_loss"]["dsmoe"] == pytest.approx(parity["train_loss"]["transformers"], rel=1e-5)
    assert {t["target"].split()[0] for t in result["targets"]} == {"forward", "train", "decode"}
    # ceilings: transformers' time against FLOPs at the matmul peak / bytes at the memory bandwidth
    peak, flops = result["matmul_peak_flops"]["fp32"], result["model"]["forward_flops"]
    rows = {r["measurement"] + r["shape"]: r for r in result["rows"]}
    assert rows["forward2x16"]["ceiling"] == pytest.approx(rows["forward2x16"]["transformers"]["seconds"] * peak / flops)
    assert rows["train2x16"]["ceiling"] == pytest.approx(rows["train2x16"]["transformers"]["seconds"] * peak / flops / 3)
    assert result["memory_bandwidth_bytes_per_s"] > 0
    for r in result["rows"][2:]:
        assert r["ceiling"] == pytest.approx(r["transformers"]["seconds"] * r["step_bandwidth_bytes_per_s"]
                                             / (3 * r["step_bytes"]))  # 3 new tokens
    for t in result["targets"]:
        if "ceiling" in t:
            assert t["reachable"] == (t["ceiling"] >= TARGETS[t["target"].split()[0]])


def test_decode_step_bytes_is_activated_weights_plus_cache():
    """Closed form for the tiny V3 shape: every matmul weight one token uses (2 layers: one dense, one MoE
    with 3 of 8 experts plus a shared one; MLA projections; router; output head), and the latent cache."""
    from dsmoe.bench import decode_step_bytes
    from dsmoe.calc import arch_stats
    from dsmoe.config import ModelConfig

    cfg = ModelConfig.from_hf(dict(TINY, model_type="deepseek_v3"))
    D, V, I_dense, I_moe, C, R, H, N, Vh, Q = 64, 96, 96, 32, 16, 8, 4, 16, 12, 24
    attention = D * Q + Q * H * (N + R) + D * (C + R) + C * H * (N + Vh) + H * Vh * D
    ffn_dense, ffn_moe = 3 * D * I_dense, (3 + 1) * 3 * D * I_moe + 8 * D
    weights = 2 * attention + ffn_dense + ffn_moe + D * V
    cache = 2 * (C + R) * 5 * 7  # layers x (C + R) x batch x context
    assert decode_step_bytes(arch_stats(cfg), batch=5, context=7, element_size=4) == 4 * (weights + cache)


def test_cli_bench_json(monkeypatch, capsys):
    monkeypatch.setattr("dsmoe.bench.BenchConfig.quick", classmethod(lambda cls, **kw: tiny(**kw)))
    assert cli.main(["bench", "--quick", "--json", "--seq-len", "8", "--batch-size", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["seq_len"] == 8 and out["rows"][0]["shape"] == "1x8"


def test_cli_bench_without_transformers(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--quick"])
    assert exit_.value.code == 2
    assert "dsmoe bench needs transformers: pip install -e .[test]" in capsys.readouterr().err

"""The architecture calculator against real module trees, the published headline figures, and the CLI.

Parameter counts are checked against models built on the meta device (no memory, milliseconds):
transformers' own classes where they exist (V2, V2-Lite, V3, Mixtral), our Transformer otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dsmoe.calc import arch_stats, attention_flops_per_token, format_count
from dsmoe.model import Block, Transformer
from dsmoe.model.layers import RMSNorm
from dsmoe.model.moe import MoE
from dsmoe.presets import PUBLISHED, TINY, get_preset

transformers = pytest.importorskip("transformers")

HF_FAMILY = {"deepseek-v2": "DeepseekV2", "deepseek-v2-lite": "DeepseekV2", "deepseek-v3": "DeepseekV3",
             "deepseek-v3.2": "DeepseekV32", "mixtral-8x7b": "Mixtral"}


def _meta_hf_model(config, family: str) -> nn.Module:
    d = config.to_hf()
    if family == "DeepseekV3":
        d["num_nextn_predict_layers"] = 0  # transformers 5.23 builds no MTP module either way (see below)
    hf_config = getattr(transformers, f"{family}Config")(**d)
    with torch.device("meta"):
        return getattr(transformers, f"{family}ForCausalLM")(hf_config)


def _hf_counts(model: nn.Module, config) -> tuple[int, int]:
    """(total, activated) from the module tree: activated drops, per MoE layer, the experts a token skips."""
    total = sum(p.numel() for p in model.parameters())
    unused = 0
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            per_expert = sum(p.numel() for p in experts.parameters()) // experts.num_experts
            unused += (experts.num_experts - config.num_experts_per_tok) * per_expert
    return total, total - unused


def _ours_counts(config) -> tuple[int, int]:
    with torch.device("meta"):
        model = Transformer(config)
    # The main model's modules only (an MTP module, when the model grows one, is not in total_params);
    # keyed by identity so a tied head counts once.
    params = {id(p): p for part in (model.embed, model.layers, model.norm, model.head) for p in part.parameters()}
    total = sum(p.numel() for p in params.values())
    unused = sum((config.n_routed_experts - config.num_experts_per_tok) * block.ffn.experts.w1[0].numel() * 3
                 for block in model.layers if isinstance(block.ffn, MoE))
    return total, total - unused


@pytest.mark.parametrize("name", list(HF_FAMILY))
def test_counts_match_transformers(name: str) -> None:
    config = get_preset(name)
    total, activated = _hf_counts(_meta_hf_model(config, HF_FAMILY[name]), config)
    stats = arch_stats(config)
    assert stats.total_params == total
    assert stats.activated_params == activated


def test_transformers_builds_no_mtp_for_v3() -> None:
    """So comparing total_params (which excludes MTP) with transformers' V3 is like for like."""
    config = get_preset("tiny-v3")
    hf_config = transformers.DeepseekV3Config(**config.to_hf())
    assert hf_config.num_nextn_predict_layers == 1
    with torch.device("meta"):
        model = transformers.DeepseekV3ForCausalLM(hf_config)
    assert len(model.model.layers) == config.num_hidden_layers
    assert sum(p.numel() for p in model.parameters()) == arch_stats(config).total_params


# Variants that exercise every switch of the counting: biases, no query compression, tied head,
# MoE layer frequency, dense-first-k, no shared experts, a fully dense model, explicit head_dim.
VARIANTS = {
    **{name: (name, {}) for name in TINY if name != "tiny-v4"},  # V4: tests/test_v4_calc.py
    "deepseek-moe-16b": ("deepseek-moe-16b", {}),
    **{name: (name, {}) for name in HF_FAMILY},
    "v3-bias-noqlora": ("tiny-v3", dict(attention_bias=True, q_lora_rank=None)),
    "v2-bias-tied": ("tiny-v2", dict(attention_bias=True, tie_word_embeddings=True)),
    "v1-freq2-dense2": ("tiny-v1", dict(moe_layer_freq=2, first_k_dense_replace=2, attention_bias=True)),
    "v1-noshared-gqa": ("tiny-v1", dict(n_shared_experts=0, num_key_value_heads=2, head_dim=48)),
    "v1-dense": ("tiny-v1", dict(n_routed_experts=None)),
    "mixtral-tied": ("tiny-mixtral", dict(tie_word_embeddings=True)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_counts_match_our_model(variant: str) -> None:
    preset, changes = VARIANTS[variant]
    config = get_preset(preset).replace(**changes)
    total, activated = _ours_counts(config)
    stats = arch_stats(config)
    assert stats.total_params == total
    assert stats.activated_params == activated
    assert sum(s.total_params for s in stats.layers) + stats.embedding_params + stats.head_params \
        + config.hidden_size == total


@pytest.mark.parametrize("changes", [{}, dict(attention_bias=True, q_lora_rank=None)])
def test_bias_variants_match_transformers(changes: dict) -> None:
    for preset, family in (("tiny-v2", "DeepseekV2"), ("tiny-v3", "DeepseekV3")):
        config = get_preset(preset).replace(**changes)
        total, activated = _hf_counts(_meta_hf_model(config, family), config)
        assert (arch_stats(config).total_params, arch_stats(config).activated_params) == (total, activated)


@pytest.mark.parametrize("name", ["tiny-v3", "deepseek-v3"])
def test_mtp_params_match_a_built_module(name: str) -> None:
    """enorm, hnorm, eh_proj, one MoE block (index num_hidden_layers: the checkpoint's layer 61), head norm."""
    config = get_preset(name)
    dim = config.hidden_size
    with torch.device("meta"):
        module = nn.ModuleDict(dict(enorm=RMSNorm(dim), hnorm=RMSNorm(dim), eh_proj=nn.Linear(2 * dim, dim, bias=False),
                                    block=Block(config, config.num_hidden_layers), norm=RMSNorm(dim)))
    assert config.is_moe_layer(config.num_hidden_layers)
    per_module = sum(p.numel() for p in module.parameters())
    stats = arch_stats(config)
    assert stats.mtp_params == config.num_nextn_predict_layers * per_module
    with torch.device("meta"):
        model = Transformer(config)
    if hasattr(model, "mtp"):  # the model's own MTP modules, when it builds them
        assert sum(p.numel() for p in model.mtp.parameters()) == stats.mtp_params
    # One correction-bias buffer per MoE layer, the MTP block's included.
    n_bias = (stats.num_moe_layers + config.num_nextn_predict_layers) * config.n_routed_experts
    assert stats.router_bias_numel == n_bias
    assert stats.checkpoint_numel == (stats.total_params + stats.mtp_params + n_bias
                                      + config.num_nextn_predict_layers * 2 * config.vocab_size * dim)


def test_router_bias_buffers_match_transformers() -> None:
    config = get_preset("deepseek-v3")
    model = _meta_hf_model(config, "DeepseekV3")
    buffers = sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    stats = arch_stats(config)
    assert stats.router_bias_numel == buffers + config.num_nextn_predict_layers * config.n_routed_experts


# Published figures (papers / model cards). DeepSeek-V2-Lite's "2.4B activated" leaves the embedding
# out (2.45B without, 2.66B with it); the others count it.
HEADLINE = {
    "deepseek-moe-16b": (16.4e9, 2.8e9, "activated_params"),
    "deepseek-v2": (236e9, 21e9, "activated_params"),
    "deepseek-v2-lite": (15.7e9, 2.4e9, "activated_nonembedding_params"),
    "deepseek-v3": (671e9, 37e9, "activated_params"),
    "mixtral-8x7b": (46.7e9, 12.9e9, "activated_params"),
    "deepseek-v4-flash": (284e9, 13e9, "activated_nonembedding_params"),
}


@pytest.mark.parametrize("name", list(HEADLINE))
def test_published_headline_figures(name: str) -> None:
    total, activated, field = HEADLINE[name]
    stats = arch_stats(get_preset(name))
    assert stats.total_params == pytest.approx(total, rel=0.01)
    assert getattr(stats, field) == pytest.approx(activated, rel=0.025)
    if name == "deepseek-v3":
        assert 670e9 <= stats.total_params <= 672e9
        assert 36.5e9 <= stats.activated_params <= 38e9


def test_kv_cache_figures() -> None:
    """V2 Table 1: MLA caches (d_c + d_h^R) per layer = 512 + 64; GQA caches 2 * n_kv * d_h per layer."""
    v3, v2 = arch_stats(get_preset("deepseek-v3")), arch_stats(get_preset("deepseek-v2"))
    assert v3.kv_cache_per_token == 576 * 61 and v3.kv_cache_bytes_per_token == 2 * 576 * 61
    assert v3.mha_kv_cache_per_token == 2 * 128 * 128 * 61
    assert v2.kv_cache_per_token == 576 * 60
    # Table 1: MLA = (d_c + d_h^R) l = 4.5 d_h l against MHA's 2 n_h d_h l (n_h = 128): 2.25 GQA groups
    assert v2.kv_cache_per_token / 60 == 2.25 * 2 * 128 and v2.kv_cache_ratio == pytest.approx(128 / 2.25)
    # Appendix (MLA vs MHA): the small MoE (V2-Lite's shape: 27 layers, 16 heads) caches 15.6K vs 110.6K
    lite = arch_stats(get_preset("deepseek-v2-lite"))
    assert round(lite.kv_cache_per_token / 100) == 156 and round(lite.mha_kv_cache_per_token / 100) == 1106
    mixtral = arch_stats(get_preset("mixtral-8x7b"))
    assert mixtral.kv_cache_per_token == 2 * 8 * 128 * 32 and mixtral.mha_kv_cache_per_token == 2 * 32 * 128 * 32
    assert mixtral.kv_cache_ratio == 4.0
    v1 = arch_stats(get_preset("deepseek-moe-16b"))
    assert v1.kv_cache_per_token == v1.mha_kv_cache_per_token == 2 * 16 * 128 * 28
    # V2's "KV cache reduced by 93.3%" is against DeepSeek 67B (GQA, 8 kv heads of 128, 95 layers, bf16)
    # with V2's cache quantised to 6 bits per element on average.
    assert 1 - (v2.kv_cache_per_token * 6 / 8) / (2 * 8 * 128 * 95 * 2) == pytest.approx(0.933, abs=5e-4)


@pytest.mark.parametrize("name", [n for n in TINY if n != "tiny-v4"])  # V4: tests/test_v4_calc.py
def test_matmul_flops_match_flop_counter(name: str) -> None:
    """Every aten.mm of a real forward (router, experts actually run, head) over T tokens = T x ours."""
    config = get_preset(name)
    T = 32
    if config.uses_dsa:  # a top-k below T, so the indexer runs (its projections are in the matmul count)
        config = config.replace(index_topk=T // 4)
    torch.manual_seed(0)
    model = Transformer(config)
    for block in model.layers:
        block.attn.absorb = False  # DSA: the masked form, whose attention is SDPA (told apart below)
    # The routed experts run as grouped GEMMs (x (P, D) by a (E, D, N) stack), which the counter has no
    # formula for: each of the P rows is one (D x N) product.
    grouped = ({torch.ops.aten._grouped_mm: lambda a, b, *args, **kwargs: 2 * a[0] * a[1] * b[-1]}
               if hasattr(torch.ops.aten, "_grouped_mm") else {})
    with FlopCounterMode(display=False, custom_mapping=grouped) as counter, torch.no_grad():
        model(torch.randint(0, config.vocab_size, (1, T)))
    counts = counter.get_flop_counts()["Global"]
    mm = sum(v for op, v in counts.items() if "attention" not in str(op))
    stats = arch_stats(config, context=T)
    # DSA's index scores are matmuls too: every one of the T queries scores all T keys (masked after)
    assert mm == T * stats.matmul_flops_per_token + T * stats.indexer_flops_per_token
    assert stats.flops_per_token == stats.matmul_flops_per_token + attention_flops_per_token(config, T)


def test_flops_attention_term() -> None:
    v3 = get_preset("deepseek-v3")
    assert attention_flops_per_token(v3, 4096) == 2 * 128 * (192 + 128) * 4096 * 61
    mixtral = get_preset("mixtral-8x7b")
    assert attention_flops_per_token(mixtral, 1000) == 2 * 32 * 128 * 2 * 1000 * 32
    with pytest.raises(ValueError, match="context"):
        arch_stats(v3, context=0)


def test_format_count() -> None:
    assert format_count(671_026_404_352) == "671.0B"
    assert format_count(2.4e9) == "2.4B"
    assert format_count(35_136) == "35.1K"
    assert format_count(12) == "12"


# ---------------------------------------------------------------------------------------------- CLI

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsmoe", *args], capture_output=True, text=True, timeout=60)


def test_cli_json() -> None:
    result = _cli("info", "deepseek-v3", "--json", "--seq-len", "1024")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    for key in ("total_params", "activated_params", "mtp_params", "kv_cache_per_token", "kv_cache_bytes_per_token",
                "mha_kv_cache_per_token", "flops_per_token", "layers"):
        assert key in out
    assert out["total_params"] == arch_stats(get_preset("deepseek-v3")).total_params
    assert out["context_length"] == 1024


def test_cli_unknown_preset_subprocess() -> None:
    result = _cli("info", "no-such-model")
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsmoe: error: "), result.stderr
    assert "Traceback" not in result.stderr


# The rest in process: every `python -m dsmoe` pays a torch import (~1.3 s).

def test_cli_table_and_config_dir(tmp_path, capsys) -> None:
    from dsmoe.cli import main

    get_preset("deepseek-v2-lite").save(tmp_path, style="hub")
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "15.7B" in out and "KV cache" in out and "MHA equivalent" in out


def test_cli_json_in_process(capsys) -> None:
    from dsmoe.cli import main

    assert main(["info", "mixtral-8x7b", "--json"]) == 0
    activated = json.loads(capsys.readouterr().out)["activated_params"]
    assert activated == arch_stats(get_preset("mixtral-8x7b")).activated_params


@pytest.mark.parametrize("case", ["unknown-preset", "missing-dir", "bad-json", "not-an-object", "invalid-config",
                                  "bad-seq-len", "no-command"])
def test_cli_errors_are_one_line(case: str, tmp_path, capsys) -> None:
    from dsmoe.cli import main

    if case == "unknown-preset":
        args = ["info", "no-such-model"]
    elif case == "missing-dir":
        args = ["info", str(tmp_path)]  # exists, but no config.json
    elif case == "bad-seq-len":
        args = ["info", "tiny-v1", "--seq-len", "0"]
    elif case == "no-command":
        args = []
    else:
        text = {"bad-json": "{", "not-an-object": "[1, 2]",
                "invalid-config": json.dumps({"model_type": "deepseek_v3", "hidden_size": -1})}[case]
        (tmp_path / "config.json").write_text(text)
        args = ["info", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsmoe: error: "), captured.err


def test_v32_figures() -> None:
    """V3.2 = V3 + one lightning indexer per layer: the Hub's "685B" (checkpoint: MTP layer included), the
    indexer's key in the KV cache, and the report's cost argument at 128K: sparse attention reads 2048 keys."""
    v3, v32 = get_preset("deepseek-v3"), get_preset("deepseek-v3.2")
    s3, s32 = arch_stats(v3, context=131072), arch_stats(v32, context=131072)
    indexer = 1536 * 64 * 128 + 7168 * 128 + 2 * 128 + 7168 * 64
    assert s32.total_params - s3.total_params == 61 * indexer
    assert s32.activated_params - s3.activated_params == 61 * indexer
    assert s32.checkpoint_numel == pytest.approx(685e9, rel=0.005)
    assert s32.kv_cache_per_token == (512 + 64 + 128) * 61
    assert s32.dense_attention_flops_per_token == s3.attention_flops_per_token
    assert s32.attention_flops_per_token == (2 * 128 * (192 + 128) * 2048 + 2 * 64 * 129 * 131072) * 61
    assert attention_flops_per_token(v32, 1000) == attention_flops_per_token(v3, 1000) + 2 * 64 * 129 * 1000 * 61


def test_every_published_preset_is_headlined() -> None:
    # V3.2: test_v32_figures; V4-Pro's "1.6T" is rounded past 1%: tests/test_v4_calc.py
    assert set(HEADLINE) | {"deepseek-v3.2", "deepseek-v4-pro"} == set(PUBLISHED)

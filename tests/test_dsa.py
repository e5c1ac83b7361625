"""DeepSeek-V3.2 sparse attention: parity with transformers' DeepseekV32ForCausalLM on random weights (below and
above index_topk, checkpoints both ways, FP8, greedy generate), cached decode = full forward (left padding too),
the gathered absorbed form = the masked naive form, and config validation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsmoe
from dsmoe.bench import spread_norms_and_router_biases
from dsmoe.checkpoint.fp8 import dequantize_blockwise, quantize_blockwise
from dsmoe.config import ModelConfig
from dsmoe.model.dsa import LightningIndexer, select_topk

transformers = pytest.importorskip("transformers")

TOPK = 6
V32 = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
           num_attention_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=16,
           n_routed_experts=8, num_experts_per_tok=3, first_k_dense_replace=1, max_position_embeddings=128,
           initializer_range=0.1, q_lora_rank=24, n_shared_experts=1, n_group=4, topk_group=2,
           index_n_heads=8, index_head_dim=16, index_topk=TOPK)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random transformers V3.2 model saved once for the module; norms (k_norm's bias too) and router
    biases spread so that every tensor matters."""
    torch.manual_seed(0)
    ref = spread_norms_and_router_biases(transformers.DeepseekV32ForCausalLM(transformers.DeepseekV32Config(**V32)))
    path = tmp_path_factory.mktemp("v32") / "hf"
    ref.eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ref(hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def model(hf_dir):
    return dsmoe.load_pretrained(hf_dir, dtype=torch.float32)


def _ids(T: int, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V32["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def _set(model, absorb=None, dense=False):
    for block in model.layers:
        block.attn.absorb, block.attn.indexer.dense = absorb, dense


@pytest.mark.parametrize("T", [TOPK - 1, TOPK, 4 * TOPK])
def test_logits_match_transformers_below_and_above_topk(model, ref, T):
    ids = _ids(T)
    with torch.no_grad():
        expected = ref(ids).logits
        for absorb in (None, True, False):  # automatic choice, gathered absorbed, masked naive
            _set(model, absorb)
            torch.testing.assert_close(model(ids), expected, atol=1e-4, rtol=0)
        _set(model)
        if T > TOPK:  # the selection matters: attending to every key gives other logits
            _set(model, dense=True)
            assert (model(ids) - expected).abs().max() > 0.1
            _set(model)


def test_export_loads_in_transformers(model, ref, tmp_path):
    dsmoe.save_pretrained(model, tmp_path, max_shard_size="40KB")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "deepseek_v32" and saved["architectures"] == ["DeepseekV32ForCausalLM"]
    assert (saved["index_n_heads"], saved["index_head_dim"], saved["index_topk"]) == (8, 16, TOPK)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is type(ref)
    ids = _ids(3 * TOPK)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)


def test_greedy_tokens_match_transformers_generate(model, ref):
    ids = _ids(4)  # 4 prompt tokens + 14 new ones: decode crosses index_topk
    expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=14, do_sample=False,
                            pad_token_id=0)
    assert dsmoe.generate(model, ids, 14).tolist() == expected.tolist()


@pytest.mark.parametrize("absorb", [None, True, False])
def test_cached_decode_equals_full_forward_at_every_step(model, absorb):
    ids = _ids(4 * TOPK)
    _set(model, absorb)
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(2, ids.shape[1])
        prefill = 3
        steps = [model(ids[:, :prefill], cache=cache)]
        for t in range(prefill, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], cache=cache, start=t))
    _set(model)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)
    assert cache.layers[0].index_keys.shape == (2, ids.shape[1], V32["index_head_dim"])


def test_left_padded_batch_decodes_each_prompt_as_alone(model):
    prompts = [_ids(3, 1, seed=5)[0].tolist(), _ids(2 * TOPK, 1, seed=6)[0].tolist()]
    batched = dsmoe.generate(model, prompts, 10)
    alone = [dsmoe.generate(model, [p], 10)[0] for p in prompts]
    assert batched == alone


def test_gathered_sparse_attention_equals_masked_form_with_gradients():
    """The O(T*k) gathered absorbed form against the masked naive twin, values and gradients, on a fresh model
    (index_topk 4, 20 tokens) with the indexer's selection forced sparse."""
    torch.manual_seed(0)
    config = dsmoe.get_preset("tiny-v3.2").replace(num_hidden_layers=2, index_topk=4, vocab_size=64)
    model = dsmoe.Transformer(config)
    ids = torch.randint(0, 64, (2, 20))
    grads = []
    for absorb in (True, False):
        model.zero_grad()
        _set(model, absorb)
        logits = model(ids)
        logits.square().mean().backward()
        grads.append((logits.detach(), model.layers[1].attn.wkv_b.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-4, rtol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-5, rtol=1e-3)


def test_indexer_scores_against_the_formula():
    """I[t, s] = sum_j w[t, j] ReLU(scale q[t, j].k[s]) with w = weights_proj(x) / sqrt(H_I), loop by loop;
    hidden keys score -inf and are picked only after every visible one."""
    torch.manual_seed(0)
    config = ModelConfig(model_type="deepseek_v32", hidden_size=32, q_lora_rank=16, num_attention_heads=2,
                         index_n_heads=3, index_head_dim=20, qk_rope_head_dim=8, index_topk=3)
    indexer = LightningIndexer(config)
    x, q_lat = torch.randn(1, 5, 32), torch.randn(1, 5, 16)
    cos, sin = torch.ones(5, 4), torch.zeros(5, 4)  # position 0 everywhere: rope is the identity
    keys = indexer.key(x, cos, sin)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None]
    got = indexer.scores(x, q_lat, cos, sin, keys, mask)
    q = indexer.wq_b(q_lat).view(1, 5, 3, 20)
    w = indexer.weights_proj(x) / 3 ** 0.5
    k = torch.nn.functional.layer_norm(indexer.wk(x), (20,), indexer.k_norm.weight, indexer.k_norm.bias, 1e-6)
    for t in range(5):
        for s in range(5):
            want = sum(w[0, t, j] * torch.relu(q[0, t, j] @ k[0, s] / 20 ** 0.5) for j in range(3))
            if s > t:
                assert got[0, t, s] == float("-inf")
            else:
                torch.testing.assert_close(got[0, t, s], want, atol=1e-5, rtol=1e-5)
    indices, valid = select_topk(got, 3)
    assert valid[0, 0].tolist() == [True, False, False] and valid[0, 4].all()
    assert set(indices[0, 1, :2].tolist()) == {0, 1}


def _quantizable(name: str, t: torch.Tensor) -> bool:
    # As in the published weights: linear layers FP8 (the indexer's wq_b and wk too); embeddings, head, norms,
    # router and the indexer's weights_proj are not.
    return (t.ndim == 2 and "embed" not in name and "lm_head" not in name and not name.endswith("mlp.gate.weight")
            and "weights_proj" not in name)


def test_fp8_checkpoint_with_indexer_weights(hf_dir, tmp_path):
    state = load_file(hf_dir / "model.safetensors")
    fp8, plain = {}, {}
    for name, t in state.items():
        if _quantizable(name, t):
            q, s = quantize_blockwise(t, (16, 16))
            fp8[name], fp8[name + "_scale_inv"] = q, s
            plain[name] = dequantize_blockwise(q, s, torch.float32, (16, 16))
        else:
            fp8[name] = plain[name] = t
    assert any(".indexer.wq_b.weight_scale_inv" in n for n in fp8)
    config = json.loads((hf_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [16, 16]}
    for sub, tensors, cfg in (("fp8", fp8, config), ("plain", plain, json.loads((hf_dir / "config.json").read_text()))):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text(json.dumps(cfg))
        save_file(tensors, str(tmp_path / sub / "model.safetensors"), metadata={"format": "pt"})
    model = dsmoe.load_pretrained(tmp_path / "fp8", dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    ids = _ids(3 * TOPK)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-4, rtol=0)


def test_bf16_load_keeps_weights_proj_fp32(hf_dir):
    model = dsmoe.load_pretrained(hf_dir, dtype=torch.bfloat16)
    indexer = model.layers[0].attn.indexer
    assert indexer.weights_proj.weight.dtype == torch.float32 and indexer.wq_b.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(_ids(3 * TOPK))).all()


@pytest.mark.parametrize("change, culprit", [
    (dict(index_topk=0), "index_topk"), (dict(index_n_heads=-1), "index_n_heads"),
    (dict(index_head_dim=4), "index_head_dim"), (dict(q_lora_rank=None), "q_lora_rank"),
    (dict(rope_interleave=False), "rope_interleave"), (dict(index_topk="8"), "index_topk")])
def test_config_errors_name_the_field(change, culprit):
    base = dict(model_type="deepseek_v32", q_lora_rank=16, qk_rope_head_dim=8, index_head_dim=16)
    with pytest.raises(ValueError, match=f"ModelConfig.{culprit}"):
        ModelConfig(**{**base, **change})


def test_config_json_round_trip_and_layer_type_lists(hf_dir):
    raw = json.loads((hf_dir / "config.json").read_text())
    config = ModelConfig.from_hf(raw)
    assert (config.index_n_heads, config.index_head_dim, config.index_topk) == (8, 16, TOPK)
    # transformers' per-layer lists are kept for the round trip (checked against first_k_dense_replace)
    assert config.to_hf()["mlp_layer_types"] == raw["mlp_layer_types"]
    assert "index_topk" not in ModelConfig().to_hf()  # only V3.2 configs carry the indexer fields
    with pytest.raises(ValueError, match="ModelConfig.mlp_layer_types"):
        ModelConfig.from_hf({**raw, "mlp_layer_types": ["sparse"] * 3})


def test_yarn_rope_reaches_the_indexer_as_in_transformers(tmp_path):
    """With YaRN (cos/sin amplitude != 1: mscale 0.707 vs mscale_all_dim 1.0) the indexer's rotate-half rope uses
    MLA's scaled cos/sin, as transformers does; 40 tokens, past the original 32 positions."""
    from hf_models import YARN

    torch.manual_seed(0)
    ref = spread_norms_and_router_biases(transformers.DeepseekV32ForCausalLM(
        transformers.DeepseekV32Config(**V32, rope_parameters=YARN)).eval())
    ref.save_pretrained(tmp_path)
    model = dsmoe.load_pretrained(tmp_path, dtype=torch.float32)
    ids = _ids(40)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-4, rtol=0)


def test_sparse_decode_reads_only_the_selected_latent_rows(model, monkeypatch):
    """After a prefill of 4 x index_topk tokens, every cached latent row that the indexer did not select for the
    next token is set to NaN: the absorbed decode step gives the same, finite logits."""
    import dsmoe.model.dsa as dsa

    ids = _ids(4 * TOPK + 1)
    T = ids.shape[1] - 1
    picked = []
    real_select = dsa.select_topk
    monkeypatch.setattr(dsa, "select_topk", lambda scores, k: picked.append(real_select(scores, k)) or picked[-1])
    _set(model, absorb=True)
    with torch.no_grad():
        cache = model.make_cache(2, T + 1)
        model(ids[:, :T], cache=cache)
        picked.clear()
        expected = model(ids[:, T:], cache=cache, start=T)
        assert len(picked) == len(model.layers)
        for layer, (indices, valid) in zip(cache.layers, picked):
            assert indices.shape == (2, 1, TOPK) and valid.all()
            keep = torch.zeros(2, T + 1, dtype=torch.bool).scatter_(1, indices[:, 0], True)
            layer.latent[~keep] = float("nan")
        got = model(ids[:, T:], cache=cache, start=T)
    _set(model)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_chunked_scoring_and_attention_match_transformers(model, ref, monkeypatch):
    """Long contexts score the indexer and run the gathered attention in chunks of queries: force chunks of a
    few queries on a short input."""
    import dsmoe.model.dsa as dsa

    monkeypatch.setattr(dsa, "_CHUNK_ELEMENTS", 500)
    ids = _ids(4 * TOPK)
    _set(model, absorb=True)
    with torch.no_grad():
        got = model(ids)
    _set(model)
    with torch.no_grad():
        torch.testing.assert_close(got, ref(ids).logits, atol=1e-4, rtol=0)

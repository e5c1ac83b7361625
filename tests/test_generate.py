"""Caches, absorbed MLA, generation, MTP speculative decoding."""

from __future__ import annotations

import pytest
import torch
from hf_models import build_hf_model

import dsmoe
from dsmoe.generate import GenerationStats, generate
from dsmoe.presets import get_preset

TINY = ["tiny-v1", "tiny-v2", "tiny-v3", "tiny-mixtral"]


def _model(preset: str, seed: int = 0, **changes) -> dsmoe.Transformer:
    torch.manual_seed(seed)
    config = get_preset(preset).replace(initializer_range=0.08, num_hidden_layers=3, **changes)
    model = dsmoe.Transformer(config).eval()
    for moe in model.moe_layers():
        if moe.gate.bias is not None:
            moe.gate.bias.uniform_(-0.05, 0.05)
    return model


def _ids(vocab: int, shape=(2, 14), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", TINY)
@torch.no_grad()
def test_cached_decode_equals_full_forward_at_every_step(preset, device):
    model = _model(preset).to(device)
    ids = _ids(model.config.vocab_size).to(device)
    full = model(ids)
    cache = model.make_cache(2, 32)
    chunks = [model(ids[:, :4], cache=cache)]
    chunks += [model(ids[:, t:t + 1], cache=cache, start=t) for t in range(4, ids.shape[1])]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=2e-5, rtol=0)


@pytest.mark.parametrize("preset,absorb", [("tiny-v1", None), ("tiny-mixtral", None), ("tiny-v2", False),
                                           ("tiny-v2", True), ("tiny-v3", False), ("tiny-v3", True)])
@torch.no_grad()
def test_multi_token_chunks_after_a_cache_equal_full_forward(preset, absorb, device):
    """Chunks of several tokens over a non-empty cache (chunked prefill, speculative verification): the
    causal mask then sits at the last T of S key slots, which SDPA's own is_causal does not do."""
    model = _model(preset).to(device)
    for block in model.layers:
        if absorb is not None:  # MLA: force one form (GQA presets have none)
            block.attn.absorb = absorb
    ids = _ids(model.config.vocab_size).to(device)
    cache = model.make_cache(2, 32)
    chunks = [model(ids[:, a:b], cache=cache, start=a) for a, b in ((0, 4), (4, 9), (9, 10), (10, 14))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), model(ids), atol=2e-5, rtol=0)


@pytest.mark.parametrize("preset,q_lora", [("tiny-v2", 64), ("tiny-v2", None), ("tiny-v3", 64)])
@torch.no_grad()
def test_absorbed_mla_equals_naive(preset, q_lora):
    model = _model(preset, q_lora_rank=q_lora)
    ids = _ids(model.config.vocab_size)
    outputs = {}
    for absorb in (False, True):
        for block in model.layers:
            block.attn.absorb = absorb
        cache = model.make_cache(2, 32)
        steps = [model(ids[:, :6], cache=cache)]  # a multi-token chunk through the cache too
        steps += [model(ids[:, t:t + 1], cache=cache, start=t) for t in range(6, ids.shape[1])]
        outputs[absorb] = torch.cat(steps, dim=1)
    torch.testing.assert_close(outputs[True], outputs[False], atol=2e-5, rtol=0)
    torch.testing.assert_close(outputs[True], model(ids), atol=2e-5, rtol=0)


@pytest.mark.parametrize("preset", TINY)
def test_cache_bytes_equal_the_formula(preset):
    model = _model(preset)
    c = model.config
    per_token = ((c.kv_lora_rank + c.qk_rope_head_dim) if c.uses_mla else 2 * c.kv_heads * c.gqa_head_dim)
    cache = model.make_cache(3, 100)
    assert cache.nbytes() == 3 * 100 * per_token * c.num_hidden_layers * 4  # fp32 model
    from dsmoe.calc import arch_stats

    assert arch_stats(c).kv_cache_per_token == per_token * c.num_hidden_layers


@pytest.mark.parametrize("case", ["v2-qlora-greedy", "v2-lite-noqlora", "v3-yarn-groups", "mixtral"])
def test_greedy_generate_equals_transformers(case, tmp_path, device):
    ref = build_hf_model(case)
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    ref.save_pretrained(tmp_path)
    model = dsmoe.load_pretrained(tmp_path, dtype=torch.float32, device=device)
    prompt = _ids(ref.config.vocab_size, (2, 7))
    with torch.no_grad():
        # explicit mask: otherwise generate() masks every prompt token equal to pad_token_id
        expected = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                do_sample=False, min_new_tokens=16)
    got = generate(model, prompt, 16)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("preset", ["tiny-v1", "tiny-v3", "tiny-mixtral"])
def test_batched_prompts_of_different_lengths_equal_one_by_one(preset, device):
    model = _model(preset).to(device)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
    batched = generate(model, prompts, 10)
    assert batched == [generate(model, [p], 10)[0] for p in prompts]
    assert [len(row) for row in batched] == [len(p) + 10 for p in prompts]


@pytest.mark.parametrize("preset,changes", [("tiny-v1", {}), ("tiny-v3", {}), ("tiny-v3.2", {}),
                                            ("tiny-mixtral", dict(sliding_window=6)), ("tiny-v4", {})])
def test_chunked_prefill_equals_one_forward(preset, changes, device):
    # The prompt written into the cache 5 positions at a time (after cached ones: a causal mask, a rolling
    # sliding-window cache, DSA's indexer keys) gives the same tokens; a V4 model prefills in one forward.
    if preset == "tiny-v4":  # its layer_types fix the depth
        torch.manual_seed(0)
        model = dsmoe.Transformer(get_preset(preset).replace(initializer_range=0.08)).eval().to(device)
    else:
        model = _model(preset, **changes).to(device)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [10, 11, 12, 13], list(range(20, 31))]
    assert generate(model, prompts, 6, prefill_chunk=5) == generate(model, prompts, 6)
    one = torch.tensor([prompts[0]])
    assert torch.equal(generate(model, one, 6, prefill_chunk=4), generate(model, one, 6))


def test_eos_stops_rows_and_pads(device):
    model = _model("tiny-v3").to(device)
    prompts = torch.tensor([[5, 6, 7], [8, 9, 10]])
    free = generate(model, prompts, 8)
    eos = int(free[0, 5])  # the third token row 0 produces
    out = generate(model, prompts, 8, eos_token_id=eos)
    row0 = out[0, 3:].tolist()
    first = row0.index(eos)
    assert row0[: first + 1] == free[0, 3:3 + first + 1].tolist()
    assert all(t == eos for t in row0[first:])
    as_lists = generate(model, prompts.tolist(), 8, eos_token_id=eos)
    assert as_lists[0] == prompts[0].tolist() + row0[: first + 1]


def test_sampling_is_seeded_and_filters(device):
    model = _model("tiny-mixtral").to(device)
    prompt = torch.tensor([[1, 2, 3, 4]])
    a = generate(model, prompt, 10, temperature=1.0, top_p=0.9, seed=7)
    assert torch.equal(a, generate(model, prompt, 10, temperature=1.0, top_p=0.9, seed=7))
    greedy = generate(model, prompt, 10)
    assert torch.equal(generate(model, prompt, 10, temperature=0.7, top_k=1, seed=1), greedy)
    assert torch.equal(generate(model, prompt, 10, temperature=0.7, top_p=1e-6, seed=1), greedy)
    hot = [generate(model, prompt, 10, temperature=5.0, seed=s) for s in range(3)]
    assert not all(torch.equal(hot[0], h) for h in hot[1:])


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"), (dict(max_new_tokens=5000), "max_position_embeddings"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=float("nan")), "top_p"), (dict(eos_token_id=1.5), "eos_token_id"),
    (dict(eos_token_id="1"), "eos_token_id"), (dict(prefill_chunk=0), "prefill_chunk"),
    (dict(prefill_chunk=2.0), "prefill_chunk"),
])
def test_bad_generation_arguments(kwargs, match):
    model = _model("tiny-v1")
    args = dict(max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(model, torch.tensor([[1, 2]]), **args)


def test_speculative_equals_plain_greedy_with_random_drafter():
    model = _model("tiny-v3")
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]])
    stats = GenerationStats()
    spec = generate(model, prompt, 20, speculative=True, stats=stats)
    assert torch.equal(spec, generate(model, prompt, 20))
    assert stats.drafted > 0 and 0 <= stats.acceptance_rate <= 1


def test_speculative_accepts_a_perfect_drafter():
    """With both norms zeroed every logit is 0, so main model and drafter both pick token 0: every draft
    is accepted and each verify step emits two tokens."""
    model = _model("tiny-v3")
    with torch.no_grad():
        model.norm.weight.zero_()
        model.mtp[0].norm.weight.zero_()
    prompt = torch.tensor([[5, 6, 7]])
    stats = GenerationStats()
    spec = generate(model, prompt, 11, speculative=True, stats=stats)
    assert torch.equal(spec, generate(model, prompt, 11))
    assert stats.acceptance_rate == 1.0 and stats.drafted == 5


def test_tiny_temperature_samples_the_greedy_token():
    """logits / 1e-45 overflows to inf - inf = NaN unless the best logit is subtracted first."""
    model = _model("tiny-mixtral")
    prompt = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(generate(model, prompt, 6, temperature=1e-45, seed=0), generate(model, prompt, 6))


def test_empty_eos_list_means_no_early_stop():
    model = _model("tiny-v1")
    prompt = torch.tensor([[1, 2, 3]])
    assert torch.equal(generate(model, prompt, 5, eos_token_id=[]), generate(model, prompt, 5))
    assert generate(model, prompt.tolist(), 5, eos_token_id=[]) == generate(model, prompt, 5).tolist()


def test_float_prompts_are_rejected_not_truncated():
    model = _model("tiny-v1")
    with pytest.raises(ValueError, match="integer tensor"):
        generate(model, torch.tensor([[1.7, 2.9]]), 2)
    with pytest.raises(ValueError, match="prompt 0 holds 1.7"):
        generate(model, [[1.7, 2.9]], 2)
    small = torch.tensor([[1, 2, 3]], dtype=torch.int16)  # any integer dtype is fine
    assert torch.equal(generate(model, small, 2), generate(model, small.long(), 2))


def test_speculative_may_fill_every_position():
    """Speculative decoding needs no spare cache slot: prompt + new tokens may reach max_position_embeddings."""
    model = _model("tiny-v3", max_position_embeddings=24)
    prompt = torch.tensor([[5, 6, 7]])
    assert torch.equal(generate(model, prompt, 21, speculative=True), generate(model, prompt, 21))


def test_speculative_needs_mtp_and_greedy():
    model = _model("tiny-v1")
    with pytest.raises(ValueError, match="MTP"):
        generate(model, torch.tensor([[1, 2]]), 4, speculative=True)
    with pytest.raises(ValueError, match="greedy"):
        generate(_model("tiny-v3"), torch.tensor([[1, 2]]), 4, speculative=True, temperature=1.0)


def test_mtp_weights_round_trip_in_hub_layout(tmp_path):
    model = _model("tiny-v3")
    dsmoe.save_pretrained(model, tmp_path)
    from safetensors import safe_open

    L = model.config.num_hidden_layers
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for suffix in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                   "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_b_proj.weight",
                   "mlp.experts.0.gate_proj.weight", "mlp.gate.e_score_correction_bias"):
        assert f"model.layers.{L}.{suffix}" in names
    loaded = dsmoe.load_pretrained(tmp_path, dtype=torch.float32)
    assert len(loaded.mtp) == 1
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # transformers ignores the MTP layer and still loads the main model.
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, model(ids), atol=1e-4, rtol=0)

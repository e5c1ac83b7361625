"""Sliding-window attention (Mixtral configs with `sliding_window`): parity with transformers' Mixtral on the
same random weights for sequences longer than the window, in the full forward, the rolling-cache decode, chunked
prefill and batched generation with left padding."""

from __future__ import annotations

import pytest
import torch
from hf_models import CASES

import dsmoe
from dsmoe.model.attention import sliding_window_mask
from dsmoe.model.cache import KVCache, RollingKVCache

transformers = pytest.importorskip("transformers")

WINDOW = 5


def _hf_mixtral(tmp_path, window=WINDOW):
    from dsmoe.bench import spread_norms_and_router_biases

    torch.manual_seed(0)
    config = transformers.MixtralConfig(**{**CASES["mixtral"][1], "sliding_window": window})
    ref = spread_norms_and_router_biases(transformers.MixtralForCausalLM(config).eval())
    ref.save_pretrained(tmp_path)
    return ref


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("swa")
    ref = _hf_mixtral(path)
    model = dsmoe.load_pretrained(path, dtype=torch.float32)
    return ref, model


def _ids(n=2, length=17, seed=1):
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def test_mask_rule_matches_brute_force():
    q, k = torch.arange(3, 9), torch.arange(9)
    got = sliding_window_mask(q, k, 4)
    want = torch.tensor([[0 <= q_ - k_ < 4 for k_ in k.tolist()] for q_ in q.tolist()])
    assert torch.equal(got, want)
    assert torch.equal(sliding_window_mask(q, k, None), k[None, :] <= q[:, None])
    # batched positions broadcast: (B, T) x (B, S) -> (B, T, S)
    assert sliding_window_mask(q.expand(2, -1), k.expand(2, -1), 4).shape == (2, 6, 9)


def test_full_forward_parity_longer_than_window(pair):
    ref, model = pair
    assert model.config.sliding_window == WINDOW
    ids = _ids()
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # the window matters: without it, positions past the window differ
    full = dsmoe.Transformer(model.config.replace(sliding_window=None)).eval()
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (full(ids)[:, WINDOW:] - expected[:, WINDOW:]).abs().max() > 1e-2
        torch.testing.assert_close(full(ids)[:, :WINDOW], expected[:, :WINDOW], atol=1e-4, rtol=0)


def test_rolling_cache_decode_and_chunked_prefill_match_full_forward(pair):
    _, model = pair
    ids = _ids(length=16)
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(2, 16)
        assert all(isinstance(layer, RollingKVCache) for layer in cache.layers)
        # memory is bounded by the window, not the capacity
        assert cache.nbytes() == sum(2 * layer.k.numel() * 4 for layer in cache.layers)
        assert cache.layers[0].k.shape[2] == WINDOW
        steps = [model(ids[:, :7], cache)]  # a prefill longer than the window
        steps += [model(ids[:, 7:10], cache, start=7)]  # a multi-token step reads the ring before overwriting it
        steps += [model(ids[:, t:t + 1], cache, start=t) for t in range(10, 16)]  # decode
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    # a window at least as long as the cache keeps the plain cache
    assert isinstance(model.make_cache(1, WINDOW).layers[0], KVCache)


def test_rolling_cache_refuses_out_of_order_writes():
    cache = RollingKVCache(1, 3, 1, 2, torch.float32)
    cache.update(0, torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))
    with pytest.raises(ValueError, match="written in order: expected start 4"):
        cache.update(2, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))


def test_greedy_generate_matches_transformers(pair):
    ref, model = pair
    prompt = _ids(n=1, length=4, seed=3)
    expected = ref.generate(prompt, max_new_tokens=14, do_sample=False, pad_token_id=0, eos_token_id=None)
    got = dsmoe.generate(model, prompt, max_new_tokens=14)
    assert got.tolist() == expected.tolist()


def test_batched_left_padded_generation_matches_transformers_and_each_prompt_alone(pair):
    ref, model = pair
    prompts = [_ids(1, 3, seed=4)[0].tolist(), _ids(1, 9, seed=5)[0].tolist()]
    batched = dsmoe.generate(model, prompts, max_new_tokens=10)
    alone = [dsmoe.generate(model, [p], max_new_tokens=10)[0] for p in prompts]
    assert batched == alone
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = ref.generate(ids, attention_mask=attention_mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                       eos_token_id=None)
    assert batched == [p + out[i, width:].tolist() for i, p in enumerate(prompts)]

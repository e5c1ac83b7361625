"""KernelDecodeStep (dsmoe.kernel_step): decode steps through the CPU kernels against the eager step."""

from __future__ import annotations

import pytest
import torch

import dsmoe
from dsmoe.kernel_step import KernelDecodeStep, MLAStepPlan
from dsmoe.ops.cpu_kernels import cpu_kernels, kernels
from dsmoe.presets import get_preset

pytestmark = pytest.mark.skipif(kernels() is None, reason="CPU kernels unavailable")


def _model(preset: str, dtype=torch.float32, **overrides) -> dsmoe.Transformer:
    torch.manual_seed(0)
    config = get_preset(preset).replace(initializer_range=0.08, num_hidden_layers=2, **overrides)
    return dsmoe.Transformer(config).to(dtype).eval()


def _steps(model, prompts, steps, fast, whole=True):
    """Per-step logits (B, steps, V) of greedy decoding after left-padded prompts, by either step; whole=False:
    the kernel step of an MLA model without its one-call operator (the layer pieces, decode_layers)."""
    from dsmoe.generate import _batch_prompts

    ids, pad = _batch_prompts(prompts)
    B, T = ids.shape
    cache = model.make_cache(B, T + steps)
    seen = []
    with torch.no_grad(), cpu_kernels(fast):
        logits = model(ids, cache=cache, pad=pad)[:, -1]
        step = KernelDecodeStep(model, cache, pad) if fast else None
        if fast and not whole:
            assert step.plan is not None
            step.plan = None
        for s in range(steps):
            seen.append(logits.float())
            token = logits.argmax(-1)
            logits = (step(token, T + s) if fast else
                      model(token[:, None], cache=cache, start=T + s, pad=pad, check=False)[:, -1])
    return torch.stack(seen, dim=1)


@pytest.mark.parametrize("preset", ["tiny-v1", "tiny-v2", "tiny-v3", "tiny-mixtral"])
def test_kernel_step_equals_eager_step(preset):
    model = _model(preset, **({"sliding_window": None} if preset == "tiny-mixtral" else {}))
    gen = torch.Generator().manual_seed(1)
    for lengths in ([7], [4, 9, 6]):  # batch 1; batch 3 with left padding
        prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
        fast, slow = _steps(model, prompts, 6, True), _steps(model, prompts, 6, False)
        torch.testing.assert_close(fast, slow, atol=5e-5, rtol=0)
        assert torch.equal(fast.argmax(-1), slow.argmax(-1))


def test_kernel_step_without_q_lora_and_in_bf16():
    prompts = [[1, 2, 3, 4, 5]]
    for model in (_model("tiny-v2", q_lora_rank=None),  # V2-Lite's plain query projection
                  _model("tiny-v3", attention_bias=True)):  # biases: the per-layer path, not the one-call step
        torch.testing.assert_close(_steps(model, prompts, 4, True), _steps(model, prompts, 4, False), atol=5e-5,
                                   rtol=0)
    assert not MLAStepPlan.applies(model)
    model = _model("tiny-v3", torch.bfloat16)
    fast, slow = _steps(model, prompts, 2, True), _steps(model, prompts, 2, False)
    kl = torch.nn.functional.kl_div(fast.log_softmax(-1), slow.log_softmax(-1), log_target=True, reduction="batchmean")
    assert kl.item() < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset,overrides", [("tiny-v3", {}), ("tiny-v2", {"q_lora_rank": None}),
                                              ("tiny-v3", {"n_shared_experts": 0, "first_k_dense_replace": 0})])
def test_whole_step_equals_its_pieces_bitwise(preset, overrides, dtype):
    """The one-call step computes what the layer pieces compute, in the same order and with the same bf16
    roundings: equal bit for bit (dense and MoE layers, V2's and V3's routers, with and without q-LoRA, padded
    rows, and more than 128 keys so that the keys are split across threads)."""
    model = _model(preset, dtype, **overrides)
    gen = torch.Generator().manual_seed(4)
    threads = torch.get_num_threads()
    try:
        for lengths, n_threads in (([150], threads), ([140, 9, 133], threads), ([140, 9, 133], 1)):
            torch.set_num_threads(n_threads)  # one thread: no key split, no row shares
            prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
            whole, pieces = _steps(model, prompts, 5, True), _steps(model, prompts, 5, True, whole=False)
            assert torch.equal(whole, pieces)
    finally:
        torch.set_num_threads(threads)


def test_supports_and_generate_uses_it():
    model = _model("tiny-v3")
    assert KernelDecodeStep.supports(model, model.make_cache(8, 16), 8)
    assert not KernelDecodeStep.supports(model, model.make_cache(9, 16), 9)  # more rows than the kernels take
    with torch.no_grad(), cpu_kernels(False):
        assert not KernelDecodeStep.supports(model, model.make_cache(1, 16), 1)
    windowed = _model("tiny-mixtral", sliding_window=4)
    assert not KernelDecodeStep.supports(windowed, windowed.make_cache(1, 16), 1)  # a rolling cache
    with pytest.raises(ValueError, match="KernelDecodeStep covers"):
        KernelDecodeStep(windowed, windowed.make_cache(1, 16))
    # dsmoe.generate decodes through it by default on the CPU; the tokens are the eager step's
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    fast = dsmoe.generate(model, prompts, 6)
    with cpu_kernels(False):
        assert dsmoe.generate(model, prompts, 6) == fast


@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-v1"])
def test_paged_decode_through_kernels_equals_module_path(preset):
    """The serving engine's decode-only steps (dsmoe.kernel_step.paged_decode_hidden_states) give the hidden states
    of the module path (dsmoe.model.paged.paged_hidden_states) over the same paged cache, sequences of different
    lengths (a key mask) included."""
    from dsmoe.kernel_step import paged_decode_hidden_states
    from dsmoe.model.paged import PagedBatch, paged_hidden_states
    from dsmoe.serve.blocks import CachePool

    model = _model(preset, **({"sliding_window": None} if preset == "tiny-mixtral" else {}))
    P, lens = 4, [5, 9, 3]
    pool = CachePool(model.config, 16, P, torch.float32)
    tables, next_block, ids = [], 0, []
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n in lens:  # prefill each sequence's first n - 1 tokens through the module path
            blocks = list(range(next_block, next_block + -(-n // P)))
            next_block += len(blocks)
            tables.append(blocks)
            toks = torch.randint(0, model.config.vocab_size, (n,), generator=gen)
            ids.append(int(toks[-1]))
            pos = torch.arange(n - 1)
            from dsmoe.model.paged import Chunk
            meta = PagedBatch(pos, torch.tensor([blocks[p // P] * P + p % P for p in pos.tolist()]),
                              chunks=(Chunk(0, n - 1, torch.tensor(blocks), n - 1),)).with_masks()
            paged_hidden_states(model, toks[:-1], meta, pool.layers)
        width = max(map(len, tables))
        meta = PagedBatch(torch.tensor([n - 1 for n in lens]),
                          torch.tensor([t[(n - 1) // P] * P + (n - 1) % P for t, n in zip(tables, lens)]),
                          decode_rows=torch.arange(len(lens)),
                          decode_tables=torch.tensor([t + [t[0]] * (width - len(t)) for t in tables]),
                          decode_lens=torch.tensor(lens)).with_masks()
        snapshot = [tuple(t.clone() for t in layer) for layer in pool.layers]

        def restore():  # every path writes the same slots again
            for layer, saved in zip(pool.layers, snapshot):
                for t, s in zip(layer, saved):
                    t.copy_(s)

        fast = paged_decode_hidden_states(model, torch.tensor(ids), meta, pool.layers)
        restore()
        plan = MLAStepPlan(model) if MLAStepPlan.applies(model) else None  # the whole step in one call (MLA)
        whole = paged_decode_hidden_states(model, torch.tensor(ids), meta, pool.layers, plan)
        restore()
        with cpu_kernels(False):
            slow = paged_hidden_states(model, torch.tensor(ids), meta, pool.layers)
    assert fast is not None and whole is not None
    assert (plan is not None) == (preset == "tiny-v3")
    torch.testing.assert_close(fast, slow, atol=2e-5, rtol=0)
    torch.testing.assert_close(whole, slow, atol=2e-5, rtol=0)
    if plan is not None:  # the one-call step reads the pool in place through the block tables: same bits
        assert torch.equal(whole, fast)


def test_step_plan_follows_the_model_to_another_dtype():
    """MLAStepPlan keeps its operands on the C++ side; after model.to(...) replaced the tensors (the router's bias
    buffer included) it flattens them again: its logits are a fresh plan's, also after the bias changed in place."""
    model = _model("tiny-v3")
    plan = MLAStepPlan(model)
    ops = kernels()
    ids, positions = torch.tensor([5]), torch.tensor([0])
    with torch.no_grad():
        before = plan.logits(ops, ids, positions, [model.make_cache(1, 4).layers[i].latent for i in range(2)], 0)
        model.to(torch.bfloat16)
        caches = [model.make_cache(1, 4).layers[i].latent for i in range(2)]
        after = plan.logits(ops, ids, positions, caches, 0)
        fresh = MLAStepPlan(model).logits(ops, ids, positions, [c.zero_() for c in caches], 0)
        assert torch.equal(after, fresh)
        torch.testing.assert_close(after, before, atol=0.1, rtol=0.05)  # the same model, rounded to bf16
        model.layers[1].ffn.gate.bias.add_(torch.linspace(-0.5, 0.5, model.config.n_routed_experts))  # in place
        after = plan.logits(ops, ids, positions, [c.zero_() for c in caches], 0)
        fresh = MLAStepPlan(model).logits(ops, ids, positions, [c.zero_() for c in caches], 0)
        assert torch.equal(after, fresh)
    assert before.dtype == after.dtype == torch.float32


def test_whole_step_refuses_inputs_outside_its_buffers():
    """Slots, block tables and keys that would read or write outside the paged pool, and too few rope positions,
    are errors that name the culprit (the C++ would otherwise touch memory it does not own)."""
    model = _model("tiny-v3")
    plan, ops = MLAStepPlan(model), kernels()
    W = model.config.kv_lora_rank + model.config.qk_rope_head_dim
    NB, P = 4, 4
    pools = [torch.zeros(NB, P, W) for _ in model.layers]
    one, zero = torch.tensor([5]), torch.tensor([0])
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="slot 16 is outside the pool of 16"):
            plan.hidden(ops, one, zero, pools, 0, torch.tensor([NB * P]), torch.tensor([[0]]), 1)
        with pytest.raises(RuntimeError, match="block table names block 4 of 4"):
            plan.hidden(ops, one, zero, pools, 0, zero, torch.tensor([[NB]]), 1)
        with pytest.raises(RuntimeError, match="24 keys but the block tables cover 4"):
            plan.hidden(ops, one, zero, pools, 0, zero, torch.tensor([[0]]), 6 * P)
        with pytest.raises(RuntimeError, match="1 rope positions for 3 rows"):
            cache = model.make_cache(3, 8)
            plan.hidden(ops, torch.tensor([5, 6, 7]), zero, [c.latent for c in cache.layers[:2]], 0)
        with pytest.raises(RuntimeError, match="layer 1's cache"):
            plan.hidden(ops, one, zero, [pools[0], torch.zeros(NB + 1, P, W)], 0, zero, torch.tensor([[0]]), 1)

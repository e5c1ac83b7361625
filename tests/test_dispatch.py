"""Reference expert loop vs sorted dispatch: same outputs and gradients, directly and inside whole models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsmoe import ModelConfig, Transformer
from dsmoe.ops import dispatch
from dsmoe.ops.dispatch import DISPATCH, expert_loop, sorted_dispatch
from dsmoe.presets import PRESETS

TINY = ["tiny-v1", "tiny-v2", "tiny-v3", "tiny-mixtral"]


def naive(x, indices, weights, w1, w2, w3):
    """Ground truth, one (token, slot) at a time, all in fp32."""
    x, w1, w2, w3 = x.float(), w1.float(), w2.float(), w3.float()
    out = torch.zeros_like(x)
    for t in range(indices.shape[0]):
        for k in range(indices.shape[1]):
            e = int(indices[t, k])
            h = F.silu(w1[e] @ x[t]) * (w3[e] @ x[t])
            out[t] += weights[t, k].float() * (w2[e] @ h)
    return out


def _inputs(T=24, D=16, I=24, E=8, K=2, allowed=None, dtype=torch.float32, seed=0):
    """Random tokens and weights; each token picks K distinct experts among `allowed` (default: all)."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.arange(E) if allowed is None else torch.as_tensor(allowed)
    picks = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:K]] for _ in range(T)]) \
        if T else torch.zeros(0, K, dtype=torch.long)
    x = torch.randn(T, D, generator=g).to(dtype)
    weights = torch.rand(T, K, generator=g)  # fp32, as the router gives
    w1 = (torch.randn(E, I, D, generator=g) * D ** -0.5).to(dtype)
    w2 = (torch.randn(E, D, I, generator=g) * I ** -0.5).to(dtype)
    w3 = (torch.randn(E, I, D, generator=g) * D ** -0.5).to(dtype)
    return x, picks, weights, w1, w2, w3


CASES = {
    "all-experts": dict(),
    "empty-experts": dict(allowed=[1, 4, 5, 7]),  # experts 0, 2, 3, 6 get no tokens (incl. the first)
    "last-empty": dict(allowed=[0, 1, 2]),  # trailing experts empty
    "one-expert": dict(K=1, allowed=[5]),  # everything on one expert
    "top1": dict(K=1),
    "top4-many-tokens": dict(T=97, K=4, E=16),
    "single-token": dict(T=1, K=3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dispatch_paths_agree_fp32(case):
    args = _inputs(**CASES[case])
    truth = naive(*args)
    a, b = expert_loop(*args), sorted_dispatch(*args)
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == args[0].shape
    torch.testing.assert_close(a, truth, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, truth, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the two combine paths
def test_dispatch_no_tokens(dtype):
    args = _inputs(T=0, dtype=dtype)
    for fn in (expert_loop, sorted_dispatch):
        out = fn(*args)
        assert out.shape == (0, 16) and out.dtype == dtype


def test_dispatch_duplicate_slots():
    """The contract is per (token, slot): an expert picked twice by one token counts twice."""
    x, _, weights, w1, w2, w3 = _inputs(T=6, K=2)
    idx = torch.tensor([[3, 3], [0, 3], [3, 0], [7, 7], [1, 2], [2, 1]])
    truth = naive(x, idx, weights, w1, w2, w3)
    torch.testing.assert_close(expert_loop(x, idx, weights, w1, w2, w3), truth, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sorted_dispatch(x, idx, weights, w1, w2, w3), truth, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["all-experts", "empty-experts", "top4-many-tokens"])
def test_dispatch_gradients_agree(case):
    base = _inputs(**CASES[case])
    grads = []
    for fn in (expert_loop, sorted_dispatch):
        args = [t.clone().requires_grad_(t.is_floating_point()) for t in base]
        out = fn(*args)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([args[i].grad for i in (0, 2, 3, 4, 5)])  # x, weights, w1, w2, w3
    for ga, gb, name in zip(*grads, ("x", "weights", "w1", "w2", "w3")):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6, msg=name)
    if case == "empty-experts":
        w1_grad = grads[1][2]
        assert w1_grad[[0, 2, 3, 6]].abs().max() == 0  # unused experts get zero gradient, not garbage


def test_dispatch_gradients_agree_bf16():
    """The bf16 training path (gates cast to bf16, unsort-and-sum combine) against the fp32 loop."""
    base = _inputs(**CASES["top4-many-tokens"])
    grads = {}
    for name, fn, dtype in (("loop fp32", expert_loop, torch.float32), ("sorted bf16", sorted_dispatch, torch.bfloat16)):
        # router weights stay fp32 (as the router gives them); tokens and expert weights in `dtype`
        args = [t.detach().to(torch.float32 if i == 2 else dtype).requires_grad_() if t.is_floating_point() else t
                for i, t in enumerate(base)]
        out = fn(*args)
        assert out.dtype == dtype
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[name] = [args[i].grad.float() for i in (0, 2, 3, 4, 5)]
    for ga, gb, name in zip(grads["loop fp32"], grads["sorted bf16"], ("x", "weights", "w1", "w2", "w3")):
        torch.testing.assert_close(gb, ga, rtol=3e-2, atol=3e-2 * ga.abs().max().item(), msg=name)


@pytest.mark.parametrize("case", ["all-experts", "empty-experts", "top4-many-tokens", "single-token"])
def test_dispatch_bf16(case):
    args = _inputs(**CASES[case], dtype=torch.bfloat16)
    truth = naive(*args)
    a, b = expert_loop(*args), sorted_dispatch(*args)
    assert a.dtype == b.dtype == torch.bfloat16
    scale = truth.abs().max()
    # bf16 has an 8-bit mantissa: ~0.4% relative per rounding, a few roundings deep.
    torch.testing.assert_close(a.float(), truth, rtol=2e-2, atol=2e-2 * scale)
    torch.testing.assert_close(b.float(), truth, rtol=2e-2, atol=2e-2 * scale)
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2 * scale)


def test_dispatch_table():
    assert DISPATCH["loop"] is expert_loop and DISPATCH["sorted"] is sorted_dispatch


# ------------------------------------------------------------------------------------------- whole models


def _model(name: str) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**PRESETS[name], "num_hidden_layers": 3, "initializer_range": 0.06})
    model = Transformer(cfg)
    if cfg.topk_method == "noaux_tc":  # a non-zero correction bias, so selection != weighting
        for moe in model.moe_layers():
            moe.gate.bias.copy_(torch.randn_like(moe.gate.bias) * 0.05)
    return model


def _logits_and_grads(model: Transformer, ids: torch.Tensor, mode: str):
    model.set_dispatch(mode)
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", TINY)
def test_model_loop_and_sorted_agree(name):
    model = _model(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_grads = _logits_and_grads(model, ids, "loop")
    routes = [moe.last_routing.indices.clone() for moe in model.moe_layers()]
    logits, grads = _logits_and_grads(model, ids, "sorted")
    assert all(moe.dispatch == "sorted" for moe in model.moe_layers())
    for moe, r in zip(model.moe_layers(), routes, strict=True):
        assert torch.equal(moe.last_routing.indices, r)
        assert r.unique().numel() >= model.config.n_routed_experts // 2  # routing is not degenerate
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    expert_grads = [n for n in grads if ".experts." in n]
    assert expert_grads, "no routed-expert parameter got a gradient"
    for n in grads:
        scale = ref_grads[n].abs().max().clamp_min(1e-12)
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-5 * scale, msg=n)


def _graph_nodes(fn) -> set[str]:
    seen, stack, names = set(), [fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize("grouped", [True, False])
def test_sorted_dispatch_backward_has_no_per_expert_slices(grouped, monkeypatch):
    """Slicing or indexing a stacked tensor per expert (xs[lo:hi], w1[e]) gives a backward that allocates
    a zero tensor the size of the whole stack per expert: quadratic in E (training steps 4.6x slower at
    64 experts for w1[e], ~10x for xs[lo:hi]). split / unbind have one-shot backwards; grouped GEMMs none."""
    if not grouped:
        monkeypatch.setattr(dispatch, "_GROUPED_MM", None)
    args = [t.requires_grad_(t.is_floating_point()) for t in _inputs(T=40, E=8, K=2)]
    names = _graph_nodes(sorted_dispatch(*args).grad_fn)
    if not grouped:
        assert "SplitWithSizesBackward0" in names and "UnbindBackward0" in names
    assert not names & {"SliceBackward0", "SelectBackward0"}, names


@pytest.mark.skipif(dispatch._GROUPED_MM is None, reason="this torch has no grouped GEMM")
@pytest.mark.parametrize("case", ["all-experts", "empty-experts", "one-expert", "top4-many-tokens"])
@pytest.mark.parametrize("mode", ["fp32", "bf16", "bf16-autocast"])
def test_grouped_gemms_equal_the_per_expert_loop(case, mode, monkeypatch):
    """The grouped-GEMM experts against the one-matmul-per-expert fallback: the same bits on the CPU, forward
    and every gradient, in fp32, bf16, and bf16 autocast over fp32 weights (grouped_mm is not autocast-aware)."""
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    base = _inputs(**CASES[case], dtype=dtype)
    keep = torch.rand(base[1].shape, generator=torch.Generator().manual_seed(3)) > 0.25
    results = []
    for grouped in (True, False):
        monkeypatch.setattr(dispatch, "_GROUPED_MM", dispatch._GROUPED_MM if grouped else None)
        for mask in (None, keep):
            args = [t.clone().requires_grad_(t.is_floating_point()) for t in base]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16-autocast"):
                assert dispatch.grouped_mm_usable(args[0], args[3]) == grouped
                out = sorted_dispatch(*args, keep=mask)
            (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            results.append([out.detach()] + [args[i].grad for i in (0, 2, 3, 4, 5)])
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16-autocast"):
                results[-1].append(sorted_dispatch(*args, keep=mask))
    for g, l in zip(results[:2], results[2:]):
        for a, b, name in zip(g, l, ("out", "x", "weights", "w1", "w2", "w3", "no-grad out")):
            # Equal up to the summation order inside one matmul (the weight gradients' GEMMs are laid out
            # differently): one rounding step of the result's dtype, relative to its largest entry.
            assert a.dtype == b.dtype
            eps = torch.finfo(a.dtype).eps * float(b.abs().max())
            assert float((a - b).abs().max()) <= eps, f"{name}: {(a.float() - b.float()).abs().max()}"


def test_grouped_gemms_need_16_byte_rows():
    x, _, _, w1, _, _ = _inputs(D=16, I=24, dtype=torch.bfloat16)
    assert dispatch.grouped_mm_usable(x, w1) == (dispatch._GROUPED_MM is not None)
    x, _, _, w1, _, _ = _inputs(D=12, I=24, dtype=torch.bfloat16)  # 24-byte rows
    assert not dispatch.grouped_mm_usable(x, w1)
    assert not dispatch.grouped_mm_usable(x.double(), w1.double())


@pytest.mark.parametrize("name,norm,expected_sum", [
    ("tiny-v2", True, 1.0),     # DeepSeek-V2's gate: renormalise OR scale
    ("tiny-v2", False, None),   # not renormalised: scores x scaling
    ("tiny-v3", True, 16.0),    # DeepSeek-V3's gate: renormalise, then scale
])
def test_gate_weights_follow_each_reference_gate(name, norm, expected_sum):
    from dsmoe.model.moe import Router

    config = ModelConfig(**{**PRESETS[name], "norm_topk_prob": norm, "routed_scaling_factor": 16.0,
                            "num_experts_per_tok": 3})
    torch.manual_seed(0)
    router = Router(config)
    torch.nn.init.normal_(router.weight)
    r = router(torch.randn(5, config.hidden_size))
    if expected_sum is None:
        torch.testing.assert_close(r.weights, 16.0 * r.scores.gather(1, r.indices))
    else:
        torch.testing.assert_close(r.weights.sum(dim=-1), torch.full((5,), expected_sum))

"""Balance losses, load metrics, the V3 bias update and capacity dropping (dsmoe.train.balance).

Each loss is checked three ways: a closed-form value worked out by hand on a 4-token / 4-expert / top-2
example, a naive Python-loop twin on random routings, and its gradient (through the scores only).
"""

from __future__ import annotations

import math

import pytest
import torch

import dsmoe
from dsmoe.train.balance import (
    communication_balance_loss,
    device_balance_loss,
    expert_balance_loss,
    expert_load,
    load_metrics,
    mixtral_balance_loss,
    sequence_balance_loss,
    update_routing_bias,
)

# ------------------------------------------------------------------------------------ hand-made routing
# T = 4 tokens, N = 4 experts, K = 2. Rows are softmax-like (each sums to 1).
SCORES = torch.tensor([
    [0.40, 0.30, 0.20, 0.10],  # t0 picks 0, 1
    [0.10, 0.50, 0.30, 0.10],  # t1 picks 1, 2
    [0.25, 0.25, 0.25, 0.25],  # t2 picks 0, 3
    [0.60, 0.10, 0.10, 0.20],  # t3 picks 0, 3
])
INDICES = torch.tensor([[0, 1], [1, 2], [0, 3], [0, 3]])
# counts: e0 = 3, e1 = 2, e2 = 1, e3 = 2 (sum = T*K = 8)
# P_i = column means: e0 = 1.35/4, e1 = 1.15/4, e2 = 0.85/4, e3 = 0.65/4
# f_i = N/(K*T) * count_i = 4/(2*4) * count_i


def test_expert_load_hand():
    assert expert_load(INDICES, 4).tolist() == [3, 2, 1, 2]
    assert expert_load(INDICES, 4).dtype == torch.int64


def test_expert_balance_loss_hand():
    expected = 0.1 * (4 / (2 * 4)) * (3 * 1.35 / 4 + 2 * 1.15 / 4 + 1 * 0.85 / 4 + 2 * 0.65 / 4)
    got = expert_balance_loss(SCORES, INDICES, 4, 2, alpha=0.1)
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.10625)


def test_expert_balance_loss_is_one_when_uniform():
    # Uniform softmax scores and perfectly even picks: f_i = 1, P_i = 1/N -> L = alpha.
    scores = torch.full((4, 4), 0.25)
    indices = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert expert_balance_loss(scores, indices, 4, 2, alpha=0.3).item() == pytest.approx(0.3)


def test_mixtral_balance_loss_hand():
    # softmax(log s) = s, since each row of SCORES sums to 1.
    logits = SCORES.log()
    expected = 0.02 * 4 * (3 / 4 * 1.35 / 4 + 2 / 4 * 1.15 / 4 + 1 / 4 * 0.85 / 4 + 2 / 4 * 0.65 / 4)
    got = mixtral_balance_loss(logits, INDICES, 4, 2, coef=0.02)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # It is K times the expert-level loss on the softmax scores.
    assert got.item() == pytest.approx(2 * expert_balance_loss(SCORES, INDICES, 4, 2, alpha=0.02).item(), rel=1e-6)


def test_device_balance_loss_hand():
    # D = 2: device 0 holds experts {0, 1}, device 1 holds {2, 3}.
    # f' = mean of f over the group: (1.5 + 1.0)/2, (0.5 + 1.0)/2; P' = sum of P: (1.35+1.15)/4, (0.85+0.65)/4
    expected = 0.05 * ((1.5 + 1.0) / 2 * (1.35 + 1.15) / 4 + (0.5 + 1.0) / 2 * (0.85 + 0.65) / 4)
    got = device_balance_loss(SCORES, INDICES, 4, 2, n_devices=2, alpha=0.05)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # One device holding everything: f' = mean f = 1, P' = 1.
    assert device_balance_loss(SCORES, INDICES, 4, 2, n_devices=1, alpha=1.0).item() == pytest.approx(1.0)
    # One expert per device: the device loss is the expert loss.
    assert device_balance_loss(SCORES, INDICES, 4, 2, n_devices=4).item() == pytest.approx(
        expert_balance_loss(SCORES, INDICES, 4, 2).item(), rel=1e-6)


def test_communication_balance_loss_hand():
    # Devices reached: t0 -> {0}; t1 -> {0, 1}; t2 -> {0, 1}; t3 -> {0, 1}: device 0 gets 4 tokens, device 1 gets 3.
    # f''_d = D/(M*T) * sent_d; P''_d as in the device loss.
    expected_m2 = 0.02 * (2 / (2 * 4) * 4 * (1.35 + 1.15) / 4 + 2 / (2 * 4) * 3 * (0.85 + 0.65) / 4)
    got = communication_balance_loss(SCORES, INDICES, 4, 2, n_devices=2, max_devices=2, alpha=0.02)
    assert got.item() == pytest.approx(expected_m2, rel=1e-6)
    expected_m1 = 0.02 * (2 / (1 * 4) * 4 * (1.35 + 1.15) / 4 + 2 / (1 * 4) * 3 * (0.85 + 0.65) / 4)
    got = communication_balance_loss(SCORES, INDICES, 4, 2, n_devices=2, max_devices=1, alpha=0.02)
    assert got.item() == pytest.approx(expected_m1, rel=1e-6)


def test_sequence_balance_loss_hand():
    # Sigmoid-like scores: each row is a multiple of the SCORES row, so s' (row-normalised) = SCORES.
    scale = torch.tensor([[2.0], [1.0], [0.5], [1.5]])
    scores = SCORES * scale
    # batch = 2 sequences of 2 tokens: (t0, t1) and (t2, t3); f_i = N/(K*S) * count_i = 4/(2*2) * count_i.
    # seq 0: counts (1, 2, 1, 0), P = ((0.4+0.1)/2, (0.3+0.5)/2, (0.2+0.3)/2, (0.1+0.1)/2)
    seq0 = (4 / (2 * 2)) * (1 * (0.4 + 0.1) / 2 + 2 * (0.3 + 0.5) / 2 + 1 * (0.2 + 0.3) / 2 + 0 * (0.1 + 0.1) / 2)
    # seq 1: counts (2, 0, 0, 2), P = ((0.25+0.6)/2, ..., (0.25+0.2)/2)
    seq1 = (4 / (2 * 2)) * (2 * (0.25 + 0.6) / 2 + 2 * (0.25 + 0.2) / 2)
    expected = 0.0001 * (seq0 + seq1) / 2
    got = sequence_balance_loss(scores, INDICES, batch=2, seq_len=2, n_experts=4, top_k=2, alpha=0.0001)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # One sequence of 4 tokens with normalised scores = the expert-level loss on SCORES.
    one = sequence_balance_loss(scores, INDICES, batch=1, seq_len=4, n_experts=4, top_k=2)
    assert one.item() == pytest.approx(expert_balance_loss(SCORES, INDICES, 4, 2).item(), rel=1e-6)


# ------------------------------------------------------------------------------------ naive loop twins
def naive_f_p(scores, indices, n, k):
    T = scores.shape[0]
    f, p = [], []
    for i in range(n):
        count = sum(1 for t in range(T) for j in range(k) if int(indices[t, j]) == i)
        f.append(n / (k * T) * count)
        p.append(sum(float(scores[t, i]) for t in range(T)) / T)
    return f, p


def naive_expert(scores, indices, n, k, alpha):
    f, p = naive_f_p(scores, indices, n, k)
    return alpha * sum(fi * pi for fi, pi in zip(f, p))


def naive_device(scores, indices, n, k, d, alpha):
    f, p = naive_f_p(scores, indices, n, k)
    g = n // d
    return alpha * sum(sum(f[j] for j in range(e * g, (e + 1) * g)) / g * sum(p[j] for j in range(e * g, (e + 1) * g))
                       for e in range(d))


def naive_comm(scores, indices, n, k, d, m, alpha):
    _, p = naive_f_p(scores, indices, n, k)
    T, g = scores.shape[0], n // d
    total = 0.0
    for e in range(d):
        sent = sum(1 for t in range(T) if any(int(indices[t, j]) // g == e for j in range(k)))
        total += d / (m * T) * sent * sum(p[j] for j in range(e * g, (e + 1) * g))
    return alpha * total


def naive_sequence(scores, indices, b, s, n, k, alpha):
    total = 0.0
    for seq in range(b):
        rows = range(seq * s, (seq + 1) * s)
        norm = torch.stack([scores[t] / scores[t].sum() for t in rows])
        total += naive_expert(norm, indices[seq * s:(seq + 1) * s], n, k, 1.0)
    return alpha * total / b


def random_routing(T, n, k, seed, sigmoid=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, n, generator=g)
    scores = logits.sigmoid() if sigmoid else logits.softmax(-1)
    indices = torch.rand(T, n, generator=g).topk(k, dim=-1).indices  # independent of the scores
    return logits, scores, indices


@pytest.mark.parametrize("seed", range(3))
def test_losses_match_naive_loops(seed):
    n, k, T = 8, 3, 24
    _, scores, indices = random_routing(T, n, k, seed)
    approx = lambda v: pytest.approx(v, rel=1e-5)  # noqa: E731
    assert expert_balance_loss(scores, indices, n, k, 0.01).item() == approx(naive_expert(scores, indices, n, k, 0.01))
    for d in (1, 2, 4, 8):
        assert device_balance_loss(scores, indices, n, k, d, 0.05).item() == approx(
            naive_device(scores, indices, n, k, d, 0.05))
        for m in range(1, d + 1):
            assert communication_balance_loss(scores, indices, n, k, d, m, 0.02).item() == approx(
                naive_comm(scores, indices, n, k, d, m, 0.02))
    _, sig, _ = random_routing(T, n, k, seed + 100, sigmoid=True)
    for b, s in ((1, 24), (3, 8), (24, 1)):
        assert sequence_balance_loss(sig, indices, b, s, n, k, 0.001).item() == approx(
            naive_sequence(sig, indices, b, s, n, k, 0.001))


def test_expert_load_matches_bincount():
    _, _, indices = random_routing(50, 16, 4, 7)
    assert torch.equal(expert_load(indices, 16), torch.bincount(indices.flatten(), minlength=16))


# ------------------------------------------------------------------------------------ gradients
def test_gradient_flows_to_scores_not_counts():
    n, k, T = 8, 2, 12
    _, scores, indices = random_routing(T, n, k, 3)
    scores = scores.clone().requires_grad_(True)
    expert_balance_loss(scores, indices, n, k, alpha=0.1).backward()
    # dL/ds[t,i] = alpha * f_i / T: the counts are constants, so the gradient is the same on every row.
    f = torch.bincount(indices.flatten(), minlength=n).float() * n / (k * T)
    torch.testing.assert_close(scores.grad, (0.1 * f / T).expand(T, n))

    for loss in (device_balance_loss(scores, indices, n, k, 4, 0.1),
                 communication_balance_loss(scores, indices, n, k, 4, 2, 0.1),
                 sequence_balance_loss(scores, indices, 3, 4, n, k, 0.1),
                 mixtral_balance_loss(scores, indices, n, k, 0.1)):
        (grad,) = torch.autograd.grad(loss, scores)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_gradient_reaches_router_weight_not_bias():
    config = dsmoe.get_preset("tiny-v3").replace(num_hidden_layers=2, num_nextn_predict_layers=0)
    model = dsmoe.Transformer(config)
    moe = model.moe_layers()[0]
    model(torch.randint(0, config.vocab_size, (2, 8)))
    r = moe.last_routing
    loss = sequence_balance_loss(r.scores, r.indices, 2, 8, config.n_routed_experts, config.num_experts_per_tok, 1e-4)
    loss.backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    assert not moe.gate.bias.requires_grad



def test_no_grad_forward_keeps_routing_picks_but_not_scores():
    """Generation and evaluation (eval mode, no autograd) must not hold (T, E) fp32 scores and logits per
    layer after a forward."""
    config = dsmoe.get_preset("tiny-v3").replace(num_hidden_layers=2, num_nextn_predict_layers=0)
    model = dsmoe.Transformer(config).eval()
    moe = model.moe_layers()[0]
    ids = torch.randint(0, config.vocab_size, (2, 8))
    with torch.no_grad():
        model(ids)
    r = moe.last_routing
    assert r.scores is None and r.logits is None
    assert r.indices.shape == r.weights.shape == (16, config.num_experts_per_tok)
    model(ids)
    assert moe.last_routing.scores.requires_grad and moe.last_routing.logits.shape == (16, config.n_routed_experts)

# ------------------------------------------------------------------------------------ transformers parity
def test_mixtral_loss_equals_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    n, k = 8, 2
    g = torch.Generator().manual_seed(0)
    for T in (1, 5, 64):
        logits = torch.randn(T, n, generator=g) * 2
        indices = logits.topk(k, dim=-1).indices
        ours = mixtral_balance_loss(logits, indices, n, k)
        theirs = load_balancing_loss_func((logits,), n, k)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    # Several layers are pooled exactly as transformers pools them.
    layers = tuple(torch.randn(40, n, generator=g) for _ in range(3))
    picks = [layer.topk(k, dim=-1).indices for layer in layers]
    ours = mixtral_balance_loss(layers, picks, n, k, coef=0.02)
    torch.testing.assert_close(ours, 0.02 * load_balancing_loss_func(layers, n, k), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------ errors
def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="n_devices"):
        device_balance_loss(SCORES, INDICES, 4, 2, n_devices=3)
    with pytest.raises(ValueError, match="n_devices"):
        communication_balance_loss(SCORES, INDICES, 4, 2, n_devices=3, max_devices=1)
    with pytest.raises(ValueError, match="max_devices"):
        communication_balance_loss(SCORES, INDICES, 4, 2, n_devices=2, max_devices=3)
    with pytest.raises(ValueError, match="max_devices"):
        communication_balance_loss(SCORES, INDICES, 4, 2, n_devices=2, max_devices=0)
    with pytest.raises(ValueError, match="seq_len"):
        sequence_balance_loss(SCORES, INDICES, batch=3, seq_len=2, n_experts=4, top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        expert_balance_loss(SCORES, INDICES, 4, 3)
    with pytest.raises(ValueError, match="n_experts"):
        expert_balance_loss(SCORES, INDICES, 5, 2)
    with pytest.raises(ValueError, match="bias"):
        update_routing_bias(torch.zeros(3), torch.zeros(4))


# ------------------------------------------------------------------------------------ load metrics and bias
def test_load_metrics_hand():
    m = load_metrics(torch.tensor([3, 1, 2, 2]))
    assert m["max_vio"] == pytest.approx((3 - 2) / 2)
    assert m["cv"] == pytest.approx(math.sqrt((1 + 1 + 0 + 0) / 4) / 2)
    assert (m["dead"], m["min"], m["max"]) == (0, 1.0, 3.0)
    m = load_metrics(torch.tensor([4.0, 0.0, 2.0, 2.0]))
    assert m["max_vio"] == pytest.approx((4 - 2) / 2)
    assert m["dead"] == 1
    assert load_metrics(torch.full((8,), 5))["max_vio"] == 0.0
    assert load_metrics(torch.zeros(4))["max_vio"] == 0.0


def test_update_routing_bias_hand():
    g = 0.01
    bias = torch.zeros(4)
    update_routing_bias(bias, torch.tensor([3, 1, 2, 2]), gamma=g)  # mean 2
    torch.testing.assert_close(bias, torch.tensor([-g, +g, 0.0, 0.0]))
    update_routing_bias(bias, torch.tensor([3.0, 1.0, 2.0, 2.0]), gamma=g)
    torch.testing.assert_close(bias, torch.tensor([-2 * g, +2 * g, 0.0, 0.0]))
    # It works on the router's buffer in place, with no autograd history.
    config = dsmoe.get_preset("tiny-v3").replace(num_hidden_layers=2, num_nextn_predict_layers=0)
    gate = dsmoe.Transformer(config).moe_layers()[0].gate
    buffer = gate.bias
    load = torch.arange(config.n_routed_experts)
    update_routing_bias(gate.bias, load)
    assert gate.bias is buffer and gate.bias.grad_fn is None
    assert (gate.bias[:16] > 0).all() and (gate.bias[16:] < 0).all()


# ------------------------------------------------------------------------------------ end to end
def _skewed_tiny_v3():
    torch.manual_seed(0)
    config = dsmoe.get_preset("tiny-v3").replace(num_hidden_layers=2, num_nextn_predict_layers=0)
    model = dsmoe.Transformer(config).eval()
    (moe,) = model.moe_layers()
    with torch.no_grad():
        # A few experts get router rows 20x larger: their sigmoid scores swing to ~0 or ~1 and they win
        # about half of all tokens, while the others hover around 0.5.
        moe.gate.weight[[0, 9, 18, 27]] *= 20.0
    return model, moe


def _maxvio(model, moe, batches):
    """MaxVio of the load summed over the batches, measured through a full forward of the model."""
    load = torch.zeros(model.config.n_routed_experts, dtype=torch.int64)
    with torch.no_grad():
        for batch in batches:
            model(batch)
            load += expert_load(moe.last_routing.indices, model.config.n_routed_experts)
    return load_metrics(load)["max_vio"]


def test_bias_update_lowers_maxvio():
    model, moe = _skewed_tiny_v3()
    n = model.config.n_routed_experts
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, model.config.vocab_size, (4, 32), generator=g) for _ in range(4)]
    # The router's inputs do not depend on its bias (no later MoE layer), so capture them once and let
    # each balancing step run only the router: the same routing a forward would make, at a fraction of the cost.
    inputs = []
    hook = moe.gate.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    before = _maxvio(model, moe, batches)
    hook.remove()
    with torch.no_grad():
        for step in range(80):  # no training: only the bias moves
            routing = moe.gate(inputs[step % len(inputs)])
            update_routing_bias(moe.gate.bias, expert_load(routing.indices, n), gamma=0.01)
    after = _maxvio(model, moe, batches)
    assert before > 1.5, before  # the skew is real
    assert after < before / 2, (before, after)

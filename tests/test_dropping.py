"""Token dropping (capacity factor): the mask against a plain-Python reference, the dispatch paths against
the same model with the dropped pairs' gate weights zeroed, the MoE layer in train / eval mode, training."""

from __future__ import annotations

import math

import pytest
import torch

import dsmoe
from dsmoe.ops.capacity import TokenDropping, capacity_mask, protected_sequences
from dsmoe.ops.dispatch import DISPATCH


# ------------------------------------------------------------------------------------ the mask
def naive_capacity(affinity, indices, n, cf, devices=None, protected=None):
    """Per bin (expert or device), in Python: protected pairs first, then by affinity, ties by token."""
    T, K = indices.shape
    bins = n if devices is None else devices
    per_bin = n // bins
    cap = math.ceil(round(cf * K * T / bins, 9))
    safe = [False] * T if protected is None else protected.tolist()
    keep = torch.zeros(T, K, dtype=torch.bool)
    for b in range(bins):
        pairs = [(t, j) for t in range(T) for j in range(K) if int(indices[t, j]) // per_bin == b]
        pairs.sort(key=lambda p: (not safe[p[0]], -float(affinity[p])))  # stable: ties keep token order
        for rank, (t, j) in enumerate(pairs):
            keep[t, j] = rank < cap or safe[t]
    return keep


def test_capacity_mask_hand():
    # T = 4, K = 2, N = 4, capacity_factor 1 -> C = ceil(1 * 2 * 4 / 4) = 2. Expert 0 is picked 4 times.
    indices = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1]])
    affinity = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.9, 0.1], [0.5, 0.5]])
    keep = capacity_mask(affinity, indices, 4, 1.0)
    # Expert 0 keeps its two best pairs (t2: 0.9, t0: 0.6) and drops t1 (0.3) and t3 (0.5).
    assert keep.tolist() == [[True, True], [False, True], [True, True], [False, True]]
    assert keep.dtype == torch.bool
    # C = ceil(1.5 * 8 / 4) = 3 keeps t3's 0.5 too; a large factor keeps everything.
    assert capacity_mask(affinity, indices, 4, 1.5).tolist() == [[True, True], [False, True], [True, True], [True, True]]
    assert capacity_mask(affinity, indices, 4, 4.0).all()
    # Ties go to the earlier token.
    tied = capacity_mask(torch.full((4, 2), 0.5), indices, 4, 1.0)
    assert tied[:, 0].tolist() == [True, True, False, False]
    # A protected token is served first (t1 displaces t0) and never dropped.
    protected = torch.tensor([False, True, False, False])
    assert capacity_mask(affinity, indices, 4, 1.0, protected=protected)[:, 0].tolist() == [False, True, True, False]
    assert capacity_mask(affinity, indices, 4, 0.25, protected=protected)[1].all()
    # Two devices of experts {0, 1} and {2, 3}: C = ceil(8 / 2) = 4 of the 6 pairs on device 0.
    by_device = capacity_mask(affinity, indices, 4, 1.0, devices=2)
    assert by_device.tolist() == [[True, False], [False, True], [True, True], [True, True]]


@pytest.mark.parametrize("cf", [0.5, 1.0, 1.25, 2.0])
@pytest.mark.parametrize("devices", [None, 2, 4])
@pytest.mark.parametrize("protect", [False, True])
def test_capacity_mask_matches_naive(cf, devices, protect):
    g = torch.Generator().manual_seed(int(cf * 100) + (devices or 0))
    T, n, k = 40, 8, 2
    logits = torch.randn(T, n, generator=g)
    logits[:, 0] += 2.0  # overload expert 0
    indices = logits.topk(k, dim=-1).indices
    affinity = logits.softmax(-1).gather(1, indices)
    affinity[::7] = 0.25  # some ties
    protected = torch.rand(T, generator=g) < 0.2 if protect else None
    keep = capacity_mask(affinity, indices, n, cf, devices=devices, protected=protected)
    assert torch.equal(keep, naive_capacity(affinity, indices, n, cf, devices, protected))
    if not protect:
        bins = indices[keep] // (n // (devices or n))
        assert torch.bincount(bins).max() <= math.ceil(cf * k * T / (devices or n))


def test_bad_dropping_settings_name_the_field():
    with pytest.raises(ValueError, match="capacity_factor"):
        capacity_mask(torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.long), 4, 0.0)
    with pytest.raises(ValueError, match="--capacity-factor"):
        TokenDropping(float("inf"))
    with pytest.raises(ValueError, match="--drop-level"):
        TokenDropping(1.0, level="token")
    with pytest.raises(ValueError, match="--drop-level device needs --devices 2"):
        TokenDropping(1.0, level="device")
    with pytest.raises(ValueError, match="--devices 3 must divide the model's 16"):
        TokenDropping(1.0, level="device", devices=3).check_experts(16)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 1 / 3, 0.5, 1.0])
def test_protected_sequences_are_that_fraction_of_the_run(fraction):
    """Whatever the batch and rank split, sequence n of the run is protected by one rule, and the count up to
    any point is floor(n * fraction): exact over the run, not rounded per (small) batch."""
    ids = torch.arange(1000)
    protected = protected_sequences(ids, fraction)
    assert protected.dtype == torch.bool
    assert int(protected.sum()) == math.floor(1000 * fraction + 1e-9)
    counts = protected.cumsum(0)
    assert all(int(counts[n - 1]) == math.floor(n * fraction + 1e-9) for n in (10, 37, 500))
    # Two ranks of 2 rows each see the same global rule as one process of 4 rows.
    step, B = 7, 4
    one = protected_sequences(step * B + torch.arange(B), fraction)
    assert torch.equal(torch.cat([protected_sequences(step * B + torch.arange(r * 2, r * 2 + 2), fraction)
                                  for r in range(2)]), one)


# ------------------------------------------------------------------------------------ dispatch
def _experts(E=6, D=16, I=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(*shape, generator=g) * 0.3).to(dtype).requires_grad_()
            for shape in ((E, I, D), (E, D, I), (E, I, D))]


def _routing(T=24, E=6, K=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    indices = torch.rand(T, E, generator=g).topk(K, dim=-1).indices
    weights = torch.rand(T, K, generator=g).requires_grad_()
    keep = torch.rand(T, K, generator=g) > 0.3
    keep[0] = False  # a token with every pair dropped
    return indices, weights, keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch_with_dropped_pairs_equals_zeroed_gates(dtype):
    """Dropping a pair = giving it gate weight 0 (for the output and the input / expert gradients)."""
    indices, weights, keep = _routing()
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(2)).to(dtype).requires_grad_()
    ws = _experts(dtype=dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)

    def run(fn, **kw):
        for t in (x, weights, *ws):
            t.grad = None
        out = fn(**kw)
        out.float().square().sum().backward()
        return out.detach().float(), [t.grad.float().clone() for t in (x, *ws)]

    zeroed = lambda: DISPATCH["loop"](x, indices, weights * keep, *ws)  # noqa: E731
    ref, ref_grads = run(zeroed)
    for mode in ("loop", "sorted"):
        out, grads = run(lambda: DISPATCH[mode](x, indices, weights, *ws, keep=keep))
        torch.testing.assert_close(out, ref, **tol)
        for got, want in zip(grads, ref_grads):  # bf16: up to bf16 rounding of the largest entry
            assert float((got - want).abs().max()) <= tol["atol"] * max(1.0, float(want.abs().max())), mode
    assert float(out[0].abs().max()) == 0.0  # every pair of token 0 dropped
    with torch.no_grad():  # nothing dropped = no mask at all, bit for bit
        assert torch.equal(DISPATCH["sorted"](x, indices, weights, *ws, keep=torch.ones_like(keep)),
                           DISPATCH["sorted"](x, indices, weights, *ws))
    with torch.no_grad():  # the in-place no-autograd path, and a single token
        torch.testing.assert_close(DISPATCH["sorted"](x, indices, weights, *ws, keep=keep).float(), ref, **tol)
        one = DISPATCH["sorted"](x[3:4], indices[3:4], weights[3:4], *ws, keep=torch.tensor([[False, True]]))
        torch.testing.assert_close(one.float(), DISPATCH["loop"](x[3:4], indices[3:4], weights[3:4] * torch.tensor(
            [[0.0, 1.0]]), *ws).float(), **tol)


# ------------------------------------------------------------------------------------ the MoE layer
def test_moe_drops_in_train_mode_only():
    torch.manual_seed(0)
    config = dsmoe.get_preset("tiny-v3").replace(num_hidden_layers=2, num_nextn_predict_layers=0)
    model = dsmoe.Transformer(config)
    moe = model.moe_layers()[0]
    x = torch.randn(4, 10, config.hidden_size)
    with torch.no_grad():
        plain = moe.train()(x)
        moe.token_dropping = TokenDropping(0.5)
        moe.protected_rows = torch.tensor([False, True, False, False])
        dropped = moe(x)
        routing = moe.last_routing
        keep = routing.keep
        # Independent reference: the routing's picks with the dropped pairs' gates zeroed, no dropping.
        flat = x.reshape(-1, config.hidden_size)
        e = moe.experts
        want = DISPATCH["loop"](flat, routing.indices, routing.weights * keep, e.w1, e.w2, e.w3)
        want = want + moe.shared_experts(flat)
        assert 0.3 < 1 - keep.float().mean() < 0.7  # a capacity factor of 0.5 drops about half the pairs
        assert keep[10:20].all()  # the protected sequence's 10 tokens
        torch.testing.assert_close(dropped, want.view_as(x), atol=1e-6, rtol=1e-5)
        assert not torch.allclose(dropped, plain)
        assert torch.equal(moe.eval()(x), plain)  # inference never drops
        assert moe.last_routing.keep is None
        moe.train()
        moe.protected_rows = torch.ones(3, dtype=torch.bool)
        with pytest.raises(ValueError, match=r"protected_rows has shape \(3,\), but the input \(4, 10, 128\)"):
            moe(x)


def test_model_level_switch_for_custom_training_loops():
    torch.manual_seed(0)
    model = dsmoe.Transformer(dsmoe.get_preset("tiny-v2").replace(num_hidden_layers=2)).train()
    ids = torch.randint(0, model.config.vocab_size, (4, 12))
    with torch.no_grad():
        plain = model(ids)
        model.set_token_dropping(TokenDropping(0.5, level="device", devices=4), protected_sequences(torch.arange(4), 0.25))
        dropped = model(ids)
        assert all(moe.last_routing.keep is not None for moe in model.moe_layers())
        assert not torch.allclose(dropped, plain)
        # the protected row (sequence 3: floor(4 * 0.25) > floor(3 * 0.25)) drops nothing: the same logits up to
        # the summation order of matmuls over other row sets
        torch.testing.assert_close(dropped[3], plain[3], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(dropped[:3], plain[:3], atol=1e-3)
        model.set_token_dropping(None)
        assert torch.equal(model(ids), plain)
    with pytest.raises(ValueError, match="--devices 3 must divide the model's 16"):
        model.set_token_dropping(TokenDropping(1.0, level="device", devices=3))


# ------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import inspect
    import json

    folder = tmp_path_factory.mktemp("corpus")
    for module in (json, inspect, pytest):
        (folder / f"{module.__name__}.py").write_text(inspect.getsource(module))
    return folder


def test_training_with_dropping_reports_the_dropped_share(corpus, tmp_path, monkeypatch):
    from dsmoe.train.loop import TrainConfig, TrainingError, train
    from dsmoe.train.metrics import read_metrics

    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "cache"))
    small = dict(preset="tiny-v2", steps=3, batch_size=4, seq_len=16, eval_every=3, eval_batches=1, vocab_size=300,
                 data=corpus)
    runs = {}
    for name, extra in (("none", {}), ("huge", dict(capacity_factor=100.0)),
                        ("device", dict(capacity_factor=1.0, drop_level="device")),
                        ("expert", dict(capacity_factor=0.5)),
                        ("protected", dict(capacity_factor=0.5, drop_protect=1.0))):
        train(TrainConfig(out=tmp_path / name, **small, **extra))
        runs[name] = read_metrics(tmp_path / name / "metrics.jsonl")
    assert "dropped" not in runs["none"][0]
    # A capacity no expert reaches drops nothing: the same run, loss for loss.
    assert [r["dropped"] for r in runs["huge"]] == [0.0] * 3
    assert [r["loss"] for r in runs["huge"]] == [r["loss"] for r in runs["none"]]
    assert all(0 < r["dropped"] < 0.3 for r in runs["device"])  # V2's setting: 4 devices at capacity 1.0
    assert all(0.3 < r["dropped"] < 0.7 for r in runs["expert"])
    assert runs["expert"][0]["loss"] != runs["none"][0]["loss"]
    assert all(math.isfinite(r["loss"]) for r in runs["expert"] + runs["device"])
    assert [r["dropped"] for r in runs["protected"]] == [0.0] * 3  # every sequence protected
    # A resumed run must drop as it did: other (or no) dropping flags are refused.
    with pytest.raises(TrainingError, match=r"--capacity-factor \(not given\), but the run was started with 0.5"):
        train(TrainConfig(out=tmp_path / "expert", resume=True, **{**small, "steps": 5}))
    with pytest.raises(TrainingError, match="repeat its --capacity-factor, --drop-level, --drop-protect, --devices"):
        train(TrainConfig(out=tmp_path / "device", resume=True, capacity_factor=1.0, drop_level="device",
                          balance={"devices": 2}, **{**small, "steps": 5}))  # the preset's default was 4
    with pytest.raises(ValueError, match="need --capacity-factor"):
        TrainConfig(drop_level="device")

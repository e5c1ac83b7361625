"""The CPU decode kernels (dsmoe.ops.cpu_kernels) against PyTorch's operators, one by one and in whole models.

Each kernel is held to the plain PyTorch expression it replaces (fp32 to float rounding; bf16 weights against
the same bf16 values in fp32 arithmetic); a model's decode steps with the kernels on equal the same steps with
them off (`cpu_kernels(False)`: the eager slow twin), logits and greedy tokens.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dsmoe
from dsmoe.ops.cpu_kernels import MAX_TOKENS, cpu_kernels, kernels, small_batch_kernels, unavailable_reason
from dsmoe.presets import get_preset

ops = kernels()
needs_kernels = pytest.mark.skipif(ops is None, reason=f"CPU kernels unavailable: {unavailable_reason()}")


def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@needs_kernels
@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("K", [64, 100])  # 100: a tail after the 8- and 32-wide vector loops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_and_swiglu(M, K, dtype):
    x, w1, w3 = _rand(M, K, dtype=dtype), _rand(37, K, dtype=dtype, seed=1), _rand(37, K, dtype=dtype, seed=2)
    ref = F.linear(x.float(), w1.float())
    got = ops.linear(x, w1)
    assert got.dtype == dtype
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=1e-2)
    torch.testing.assert_close(got.float(), ref.to(dtype).float(), **tol)
    ref = F.silu(F.linear(x.float(), w1.float())) * F.linear(x.float(), w3.float())
    torch.testing.assert_close(ops.swiglu(x, w1, w3).float(), ref.to(dtype).float(), **tol)


@needs_kernels
@pytest.mark.parametrize("M", [1, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_experts_equals_expert_loop(M, dtype):
    from dsmoe.ops.dispatch import expert_loop

    E, D, I, K = 6, 40, 24, 3
    x = _rand(M, D, dtype=dtype)
    w1, w2, w3 = (_rand(E, I, D, dtype=dtype, seed=1), _rand(E, D, I, dtype=dtype, seed=2),
                  _rand(E, I, D, dtype=dtype, seed=3))
    gen = torch.Generator().manual_seed(4)
    indices = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(M)])  # tokens share experts
    gates = torch.rand(M, K, generator=gen)
    with cpu_kernels(False):
        ref = expert_loop(x.float(), indices, gates, w1.float(), w2.float(), w3.float())
    got = ops.moe_experts(x, indices, gates, w1, w2, w3)
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.25, rtol=2e-2)
    torch.testing.assert_close(got.float(), ref.to(dtype).float(), **tol)
    with pytest.raises(RuntimeError, match="picks expert 6 of 6"):
        ops.moe_experts(x, torch.full_like(indices, E), gates, w1, w2, w3)


def _attention_reference(q, latent, C, scale, mask):
    scores = torch.einsum("bqw,bsw->bqs", q.float(), latent.float()) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.einsum("bqs,bsc->bqc", scores.softmax(-1), latent[..., :C].float())


@needs_kernels
@pytest.mark.parametrize("S", [1, 5, 130, 300])  # 300: keys split into chunks across threads
@pytest.mark.parametrize("H", [3, 16])  # 16: more query rows than one block of 8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_decode_equals_absorbed_attention_in_pytorch(S, H, dtype):
    """The fused step against the absorbed form written out in PyTorch: q_lat = q_nope W_UK per head, attention
    over the latent (a slice of a cache with spare rows, with and without a key mask), o W_UV^T per head."""
    B, N, R, V, C = 2, 12, 8, 10, 16
    w = _rand(H * (N + V), C, dtype=dtype)
    w_uk, w_uv = w.view(H, N + V, C)[:, :N], w.view(H, N + V, C)[:, N:]
    q = _rand(B, 1, H, N + R, dtype=dtype, seed=1)
    q_nope, q_pe = q[..., :N].reshape(B, H, N), q[..., N:].reshape(B, H, R)  # strided views, as the model has
    latent = _rand(B, S + 3, C + R, dtype=dtype, seed=2)[:, :S]
    mask = torch.rand(B, S, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[:, -1] = True
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    for m in (None, mask):
        q_lat = torch.einsum("bhn,hnc->bhc", q_nope.float(), w_uk.float())
        o = _attention_reference(torch.cat((q_lat, q_pe.float()), -1), latent, C, 0.2, m)
        ref = torch.einsum("bhc,hvc->bhv", o, w_uv.float()).reshape(B, H * V)
        got = ops.mla_decode(q_nope, q_pe, latent, w, V, 0.2, m)
        torch.testing.assert_close(got.float(), ref.to(dtype).float(), **tol)


@needs_kernels
def test_small_batch_kernels_only_for_small_cpu_inference_calls():
    w = torch.randn(8, 16)
    with torch.no_grad():
        assert small_batch_kernels(torch.randn(MAX_TOKENS, 16), w) is ops
        assert small_batch_kernels(torch.randn(2, 4, 16), w) is ops  # tokens counted over leading dims
        assert small_batch_kernels(torch.randn(MAX_TOKENS + 1, 16), w) is None  # a prefill
        assert small_batch_kernels(torch.randn(1, 16, dtype=torch.float64), w) is None
        assert small_batch_kernels(torch.randn(1, 16), w.t()) is None  # not contiguous
        with cpu_kernels(False):
            assert small_batch_kernels(torch.randn(1, 16), w) is None
    assert small_batch_kernels(torch.randn(1, 16), w) is None  # autograd on: training keeps PyTorch's ops


def _decode(model, ids, steps):
    """Greedy decode: per-step logits (B, steps, V) from the eager cached step."""
    B, T = ids.shape
    cache = model.make_cache(B, T + steps)
    seen = []
    with torch.no_grad():
        logits = model(ids, cache=cache)[:, -1]
        for s in range(steps):
            seen.append(logits.float())
            logits = model(logits.argmax(-1)[:, None], cache=cache, start=T + s)[:, -1]
    return torch.stack(seen, dim=1)


@needs_kernels
@pytest.mark.parametrize("preset", ["tiny-v1", "tiny-v2", "tiny-v3", "tiny-mixtral"])
@pytest.mark.parametrize("batch", [1, 3])
def test_model_decode_equals_pytorch_twin(preset, batch):
    torch.manual_seed(0)
    config = get_preset(preset).replace(initializer_range=0.08, num_hidden_layers=2)
    model = dsmoe.Transformer(config).eval()
    ids = torch.randint(0, config.vocab_size, (batch, 9), generator=torch.Generator().manual_seed(1))
    fast = _decode(model, ids, 6)
    with cpu_kernels(False):
        slow = _decode(model, ids, 6)
    torch.testing.assert_close(fast, slow, atol=5e-5, rtol=0)
    assert torch.equal(fast.argmax(-1), slow.argmax(-1))


@needs_kernels
def test_bf16_model_decode_close_to_pytorch_twin():
    torch.manual_seed(0)
    config = get_preset("tiny-v3").replace(initializer_range=0.08, num_hidden_layers=2)
    model = dsmoe.Transformer(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    fast = _decode(model, ids, 1)
    with cpu_kernels(False):
        slow = _decode(model, ids, 1)
    # both round activations to bf16 between operations, in different places: compare distributions
    kl = F.kl_div(fast.log_softmax(-1), slow.log_softmax(-1), log_target=True, reduction="batchmean")
    assert kl.item() < 1e-3


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_rope_equal_the_modules(dtype):
    from dsmoe.model.layers import RMSNorm, apply_rope

    norm = RMSNorm(48, eps=1e-5).to(dtype)
    norm.weight.data = _rand(48, seed=3).to(dtype)
    x = _rand(3, 48, dtype=dtype, seed=4) * 3
    with torch.no_grad():
        got = norm(x)  # the kernel
        with cpu_kernels(False):
            ref = norm(x)
    assert got.dtype == ref.dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got.float(), ref.float(), **tol)
    q = _rand(2, 1, 3, 24, dtype=dtype, seed=5)[..., 8:]  # a strided view, as q_pe is
    angles = _rand(2, 1, 8, seed=6)
    for cos, sin in ((angles.cos()[0], angles.sin()[0]), (angles.cos(), angles.sin())):  # (T, R/2), (B, T, R/2)
        for interleaved in (True, False):
            with torch.no_grad():
                got = apply_rope(q, cos.to(dtype), sin.to(dtype), interleaved)
                with cpu_kernels(False):
                    ref = apply_rope(q, cos.to(dtype), sin.to(dtype), interleaved)
            torch.testing.assert_close(got.float(), ref.float(), **tol)


@needs_kernels
@pytest.mark.parametrize("preset", ["tiny-v1", "tiny-v2", "tiny-v3", "tiny-mixtral"])
def test_route_equals_router(preset):
    """Every scoring / selection rule of the family (softmax greedy, V2 group-limited, V3 noaux_tc with bias
    and groups, Mixtral) picks the same experts with the same gate weights as the PyTorch Router."""
    from dsmoe.model.moe import Router

    config = get_preset(preset)
    torch.manual_seed(0)
    router = Router(config).eval()
    router.weight.data.normal_(0, 0.5)
    if router.bias is not None:
        router.bias.data = torch.rand(router.bias.shape) * 0.1
    x = _rand(MAX_TOKENS, config.hidden_size, seed=7)
    with torch.no_grad():
        fast = router(x)
        with cpu_kernels(False):
            slow = router(x)
    assert fast.scores is None and slow.scores is not None  # (no-grad inference keeps no scores anyway)
    order_f, order_s = fast.indices.sort(-1), slow.indices.sort(-1)
    assert torch.equal(order_f.values, order_s.values)
    torch.testing.assert_close(fast.weights.gather(1, order_f.indices), slow.weights.gather(1, order_s.indices),
                               atol=1e-6, rtol=1e-5)


def test_kernels_build_where_a_compiler_is_present():
    """The kernel tests skip where the kernels cannot be built; where g++/c++ and ninja are present (as on CI) a
    failed build is a bug in the source, not a reason to skip."""
    import shutil

    if not (shutil.which("c++") or shutil.which("g++")) or not (shutil.which("ninja") or _has_ninja_module()):
        pytest.skip("no C++ compiler or ninja here")
    assert kernels() is not None, unavailable_reason()


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return True


def test_build_announcements_and_a_stale_lock(tmp_path, capsys):
    """A build to come is announced on stderr; a fresh lock (another process building) is waited for, with a line
    saying so; a lock older than any build (left by a killed build, which torch would wait on forever) is removed."""
    import os
    import time
    from types import SimpleNamespace

    from dsmoe.ops import cpu_kernels as ck

    fake = SimpleNamespace(_get_build_directory=lambda name, verbose: str(tmp_path))
    ck._announce_build(fake, "x")
    assert "building the CPU decode kernels" in capsys.readouterr().err
    lock = tmp_path / "lock"
    lock.touch()
    ck._announce_build(fake, "x")
    assert "waiting for another process" in capsys.readouterr().err and lock.exists()
    old = time.time() - ck._STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    ck._announce_build(fake, "x")
    assert not lock.exists() and "building the CPU decode kernels" in capsys.readouterr().err
    (tmp_path / "x.so").touch()
    ck._announce_build(fake, "x")
    assert capsys.readouterr().err == ""  # built: nothing to say

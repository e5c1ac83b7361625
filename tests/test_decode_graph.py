"""Fixed-shape decode steps (dsmoe.decode_graph) against the eager cached step; CUDA graph replay on CUDA."""

from __future__ import annotations

import pytest
import torch

import dsmoe
from dsmoe.decode_graph import CUDAGraphDecodeStep, StaticDecodeStep, bucket_for
from dsmoe.presets import get_preset


def _model(preset: str, device: torch.device, dtype: torch.dtype = torch.float32) -> dsmoe.Transformer:
    torch.manual_seed(0)
    config = get_preset(preset).replace(initializer_range=0.08, num_hidden_layers=2)
    return dsmoe.Transformer(config).to(device=device, dtype=dtype).eval()


def test_bucket_for():
    assert [bucket_for(b) for b in (1, 2, 3, 5, 8, 9, 128)] == [1, 2, 4, 8, 8, 16, 128]
    assert bucket_for(3, (6, 2)) == 6
    with pytest.raises(ValueError, match="batch 129 exceeds the largest decode bucket 128"):
        bucket_for(129)


def _eager_and_static(model, ids, pad, steps, step_cls):
    """Greedy tokens and per-step logits from the eager step and from step_cls, on twin caches."""
    B, T = ids.shape
    out = {}
    for name in ("eager", "static"):
        cache = model.make_cache(B, T + steps)
        with torch.no_grad():
            logits = model(ids, cache=cache, pad=pad)[:, -1]
            static = step_cls(model, cache, pad) if name == "static" else None
            seen = []
            for s in range(steps):
                token = logits.argmax(-1)
                seen.append(logits.clone())
                if static is None:
                    logits = model(token[:, None], cache=cache, start=T + s, pad=pad, check=False)[:, -1]
                else:
                    logits = static(token, T + s)
        out[name] = torch.stack(seen, dim=1)
    return out["eager"], out["static"]


@pytest.mark.parametrize("preset", ["tiny-v1", "tiny-v2", "tiny-v3", "tiny-mixtral"])
def test_static_step_equals_eager_step(preset, device):
    model = _model(preset, device)
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1)).to(device)
    eager, static = _eager_and_static(model, ids, None, 5, StaticDecodeStep)
    torch.testing.assert_close(static, eager, atol=2e-5, rtol=0)
    assert torch.equal(static.argmax(-1), eager.argmax(-1))


def test_static_step_with_left_padding_and_bucket_rows(device):
    """Rows of different prompt lengths (left padding) plus a dummy row filling the batch to its bucket:
    the real rows' logits equal the eager step's on the unpadded-to-bucket batch."""
    model = _model("tiny-v3", device)
    ids = torch.randint(0, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(2)).to(device)
    pad = torch.tensor([0, 3, 5], device=device)
    bucket = bucket_for(3)
    padded_ids = torch.cat((ids, ids[:1].expand(bucket - 3, -1)))  # dummy rows: copies of row 0
    padded_pad = torch.cat((pad, pad.new_zeros(bucket - 3)))
    eager, _ = _eager_and_static(model, ids, pad, 4, StaticDecodeStep)
    _, static = _eager_and_static(model, padded_ids, padded_pad, 4, StaticDecodeStep)
    torch.testing.assert_close(static[:3], eager, atol=2e-5, rtol=0)


def test_static_step_refuses_rolling_caches_and_cpu_graphs():
    model = _model("tiny-mixtral", torch.device("cpu"))
    model.config = model.config.replace(sliding_window=4)
    with pytest.raises(ValueError, match="sliding-window"):
        StaticDecodeStep(model, model.make_cache(1, 16))
    with pytest.raises(ValueError, match="CUDA graphs need a model on a CUDA device"):
        CUDAGraphDecodeStep(_model("tiny-v3", torch.device("cpu")), _model("tiny-v3", torch.device("cpu")).make_cache(1, 8))


@pytest.mark.cuda
@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-mixtral"])
def test_cuda_graph_step_equals_eager_step(preset, device):
    # bf16: the MoE grouped-GEMM path, which needs no host sync and so can be captured
    model = _model(preset, device, torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (4, 6), generator=torch.Generator().manual_seed(1)).to(device)
    eager, graphed = _eager_and_static(model, ids, None, 6, CUDAGraphDecodeStep)
    torch.testing.assert_close(graphed, eager, atol=3e-2, rtol=0)  # bf16: SDPA over L keys vs p + 1 keys
    assert (graphed.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.9


def test_generate_refuses_cuda_graph_off_cuda():
    model = _model("tiny-v3", torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA graphs need a model on a CUDA device"):
        dsmoe.generate(model, [[1, 2, 3]], 4, cuda_graph=True)


@pytest.mark.cuda
def test_generate_with_cuda_graph_equals_eager(device):
    model = _model("tiny-v3", device, torch.bfloat16)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6]]
    eager = dsmoe.generate(model, prompts, 12)
    graphed = dsmoe.generate(model, prompts, 12, cuda_graph=True)
    same = sum(a == b for e, g in zip(eager, graphed) for a, b in zip(e, g))
    assert same >= 0.9 * sum(map(len, eager))  # bf16 near-ties may flip a late token, not most of them
    with pytest.raises(ValueError, match="grouped-GEMM"):
        dsmoe.generate(_model("tiny-v3", device), prompts, 4, cuda_graph=True)  # fp32 MoE: not capturable


@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-v1"])
def test_compiled_generate_equals_eager_generate(preset):
    """generate(compiled=True) (CompiledDecodeStep: torch.compile of the static step, with the CPU decode kernels
    inside) gives the eager step's greedy tokens, left-padded rows included."""
    from dsmoe.generate import generate

    model = _model(preset, torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in (5, 9)]
    eager = generate(model, prompts, 8)
    assert generate(model, prompts, 8, compiled=True) == eager

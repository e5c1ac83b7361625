"""DeepSeek-V4 caches and generation: cached decode = full forward (sliding window, compressed entries, indexer
keys), greedy tokens = transformers' generate, batched prompts of different lengths, `dsmoe generate`."""

from __future__ import annotations

import pytest
import torch

from dsmoe.checkpoint import load_pretrained
from dsmoe.generate import generate

from hf_v4 import build_hf_v4

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = build_hf_v4("all-types-yarn", seed=3)
    path = tmp_path_factory.mktemp("v4")
    hf.save_pretrained(path)
    return hf, load_pretrained(path), path


@pytest.mark.parametrize("chunks", [[13, 1, 1, 1, 5, 1, 8, 3, 1, 1, 1, 1, 1, 2], [1] * 40, [40]])
def test_cached_decode_equals_full_forward(pair, chunks):
    """Chunks that cross window (8), CSA (4) and HCA (8) boundaries at every offset."""
    _, model, _ = pair
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, sum(chunks)))
    with torch.no_grad():
        full = model(ids)
        cache, start, parts = model.make_cache(2), 0, []
        for n in chunks:
            parts.append(model(ids[:, start:start + n], cache=cache, start=start))
            start += n
    assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-4


def test_greedy_tokens_equal_transformers_generate(pair):
    hf, model, _ = pair
    torch.manual_seed(1)
    ids = torch.randint(2, model.config.vocab_size, (1, 11))
    want = hf.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = generate(model, ids, max_new_tokens=30)
    assert torch.equal(got, want)


def test_batched_prompts_of_different_lengths(pair):
    hf, model, _ = pair
    prompts = [[5, 9, 33, 2, 7, 40, 41, 11, 3], [17, 4, 60, 8], [70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 2]]
    got = generate(model, prompts, max_new_tokens=14)
    for prompt, row in zip(prompts, got):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=14, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
        assert row == want[0].tolist()


def test_cli_generate_on_a_v4_checkpoint(tmp_path):
    """`dsmoe generate` streams the library's greedy text for a V4 checkpoint (tiny-v4, dsmoe's export)."""
    import subprocess
    import sys

    from tiny_assets import build_tokenizer

    import dsmoe
    from dsmoe.model.v4 import V4Transformer
    from dsmoe.presets import get_preset

    tok = build_tokenizer(tmp_path)
    torch.manual_seed(0)
    config = get_preset("tiny-v4").replace(vocab_size=tok.get_vocab_size(), initializer_range=0.08)
    dsmoe.save_pretrained(V4Transformer(config), tmp_path)
    model = load_pretrained(tmp_path)
    ids = tok.encode("def ").ids
    want = generate(model, torch.tensor([ids]), 40)[0, len(ids):].tolist()
    out = subprocess.run([sys.executable, "-m", "dsmoe", "generate", "--model", str(tmp_path), "--prompt", "def ",
                          "--max-new-tokens", "40"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = tok.decode(want, skip_special_tokens=True)
    assert text.strip() and text in out.stdout


def test_bf16_load_runs_close_to_fp32(pair):
    """bf16 weights (the checkpoint's fp32-kept tensors, like the indexer's weights_proj, stay fp32)."""
    _, model, path = pair
    half = load_pretrained(path, dtype=torch.bfloat16)
    assert half.layers[1].attn.indexer.weights_proj.weight.dtype == torch.float32
    torch.manual_seed(5)
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        a, b = half(ids), model(ids)
    # on average close; positions where bf16 flips an indexer or expert pick differ more
    assert (a - b).abs().mean() < 0.1 * b.abs().mean()  # 2.5-5% over seeds: bf16 plus routing flips
    assert len(generate(half, [[5, 6, 7], [8, 9, 10, 11, 12]], max_new_tokens=4)[1]) == 9

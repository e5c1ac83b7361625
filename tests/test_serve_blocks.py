"""The paged cache pool: sizes (against the architecture calculator), block bookkeeping, prefix cache."""

from __future__ import annotations

import pytest
import torch

from dsmoe.calc import kv_cache_per_token
from dsmoe.presets import get_preset
from dsmoe.serve.blocks import BlockAllocator, CachePool, block_hash, bytes_per_block, parse_size


@pytest.mark.parametrize("text,expected", [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000),
                                           ("1000", 1000), (4096, 4096), (" 3 kib ", 3072)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "2 parsecs", "-1GiB", "0", "GiB", "1e9"])
def test_parse_size_refuses_bad_text_naming_it(text):
    with pytest.raises(ValueError, match="cache memory"):
        parse_size(text)


@pytest.mark.parametrize("preset", ["tiny-v1", "tiny-v2", "tiny-v3", "tiny-mixtral", "deepseek-v3"])
def test_block_bytes_equal_the_calculator(preset):
    """The model's own layout holds exactly what dsmoe.calc counts per token (MLA: C + R per layer)."""
    config = get_preset(preset)
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        assert bytes_per_block(config, 16, dtype, "latent" if config.uses_mla else "kv") == \
            16 * kv_cache_per_token(config) * size


def test_decompressed_layout_is_per_head_k_and_v():
    c = get_preset("deepseek-v3")
    # 128 heads x (192 + 128) per layer vs 512 + 64: 71x the latent
    assert bytes_per_block(c, 1, torch.bfloat16, "decompressed") == 2 * 61 * 128 * (192 + 128)
    assert bytes_per_block(c, 1, torch.bfloat16, "decompressed") / bytes_per_block(c, 1, torch.bfloat16, "latent") \
        == pytest.approx(128 * 320 / 576)


@pytest.mark.parametrize("preset,layout", [("tiny-v3", "latent"), ("tiny-v3", "decompressed"), ("tiny-mixtral", "kv")])
def test_pool_from_memory_fills_the_budget(preset, layout):
    config = get_preset(preset).replace(num_hidden_layers=2)
    per_block = bytes_per_block(config, 8, torch.float32, layout)
    pool = CachePool.from_memory(config, 10 * per_block + per_block // 2, block_size=8, layout=layout)
    assert pool.num_blocks == 10 and pool.nbytes() == 10 * per_block
    assert CachePool.from_tokens(config, 81, block_size=8, layout=layout).num_blocks == 11


def test_pool_refuses_a_wrong_layout_or_a_too_small_budget():
    with pytest.raises(ValueError, match="'kv' is for GQA"):
        CachePool(get_preset("tiny-v3"), 4, layout="kv")
    with pytest.raises(ValueError, match="for MLA models"):
        CachePool(get_preset("tiny-mixtral"), 4, layout="latent")
    with pytest.raises(ValueError, match="holds no block"):
        CachePool.from_memory(get_preset("tiny-v3"), "1KiB")


def test_allocator_counts_and_refuses_overdraw():
    a = BlockAllocator(3, 4)
    blocks = [a.allocate() for _ in range(3)]
    assert sorted(blocks) == [0, 1, 2] and a.num_free == 0 and a.num_used == 3
    with pytest.raises(RuntimeError, match="no free block"):
        a.allocate()
    a.release(blocks[1])
    assert a.num_free == 1 and a.allocate() == blocks[1]
    for b in blocks:
        a.release(b)
    assert a.num_used == 0
    with pytest.raises(RuntimeError, match="released more often"):
        a.release(0)


def test_prefix_blocks_are_shared_and_evicted_least_recently_released_first():
    a = BlockAllocator(4, 2)
    h1 = block_hash(b"", [1, 2])
    h2 = block_hash(h1, [3, 4])
    assert h2 != block_hash(b"", [3, 4])  # the same tokens after another prefix are another block
    b1, b2 = a.allocate(), a.allocate()
    a.register(b1, h1)
    a.register(b2, h2)
    assert a.lookup(h1) == b1 and a.refs[b1] == 2  # shared while referenced
    a.release(b1)
    a.release(b1)
    a.release(b2)
    assert a.num_used == 0 and a.cached_blocks == 2  # idle but still findable
    assert a.lookup(h2) == b2 and a.refs[b2] == 1  # revived from idle
    a.release(b2)  # now b1 was released before b2: b1 is evicted first
    got = [a.allocate() for _ in range(2)]  # the two never-used blocks come first
    assert b1 not in got and b2 not in got and a.cached_blocks == 2
    assert a.allocate() == b1 and a.lookup(h1) is None and a.lookup(h2) == b2

"""The paged cache pool: fixed-size blocks of cached keys, block bookkeeping and the prefix cache.

vLLM's PagedAttention: the cache is one pool of blocks of `block_size` positions; a sequence owns a block
table (its blocks in position order), so sequences of any length share one preallocated pool with no
fragmentation beyond a partly filled last block. Full blocks are identified by a hash of their tokens and
of everything before them (the parent block's hash), so a later request whose prompt starts with the same
tokens reuses them, reference-counted (prefix caching). Unreferenced blocks that still hold a cached
prefix stay findable until the pool needs them back, least recently freed first.

What a block holds per layer (DeepSeek-V2 section 2.1.3 for MLA's latent):
  latent        MLA: block_size x (kv_lora_rank + qk_rope_head_dim)
  kv            GQA/MHA: block_size x 2 x kv_heads x head_dim
  decompressed  MLA as an MHA cache would hold it: block_size x heads x (qk_head_dim + v_head_dim)
"""

from __future__ import annotations

import hashlib
import re
from array import array
from collections import OrderedDict, deque

import torch

from ..config import ModelConfig

LAYOUTS = ("latent", "kv", "decompressed")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """A memory size in bytes from an int or text such as "2GiB", "512MiB", "1.5GB", "1000000".

    Raises ValueError naming the text when it is not a positive size with a known unit."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"cache memory {text!r} is not a size like 2GiB, 512MiB, 1.5GB or a byte count")
        value, unit = float(m.group(1)), m.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"cache memory {text!r} must be positive")
    return size


def default_layout(config: ModelConfig) -> str:
    return "latent" if config.uses_mla else "kv"


def values_per_token(config: ModelConfig, layout: str) -> int:
    """Cached values per token per layer in `layout`."""
    if layout not in LAYOUTS:
        raise ValueError(f"cache layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if config.uses_mla:
        if layout == "kv":
            raise ValueError("cache layout 'kv' is for GQA models; an MLA model uses 'latent' or 'decompressed'")
        if layout == "latent":
            return config.kv_lora_rank + config.qk_rope_head_dim
        return config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    if layout != "kv":
        raise ValueError(f"cache layout {layout!r} is for MLA models; a GQA model uses 'kv'")
    return 2 * config.kv_heads * config.gqa_head_dim


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, layout: str,
                    extra_layers: int = 0) -> int:
    """Bytes one block takes over all decoder layers (and `extra_layers` more: MTP modules)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return block_size * values_per_token(config, layout) * (config.num_hidden_layers + extra_layers) * itemsize


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The identity of a full block: its tokens and everything before them (through the parent's hash).
    SHA-256, so distinct prefixes never share cached keys by a hash collision in practice."""
    h = hashlib.sha256(parent)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockAllocator:
    """Block bookkeeping: reference counts, the free list and the prefix-cache table.

    A block is free (refcount 0, no cached prefix), used (refcount > 0), or cached-idle (refcount 0 but
    still holding a hashed full block, evictable in least-recently-released order). Allocation takes a free
    block first, then evicts the oldest idle cached one.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the cache pool needs at least one block, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._idle: OrderedDict[int, None] = OrderedDict()  # refcount 0, hashed: evictable, LRU first
        self._hash_of: dict[int, bytes] = {}
        self._by_hash: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks an allocation can get: free ones and idle cached ones."""
        return len(self._free) + len(self._idle)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self) -> int:
        """A block with refcount 1. Raises RuntimeError when none is left (callers check num_free)."""
        if self._free:
            block = self._free.popleft()
        elif self._idle:
            block, _ = self._idle.popitem(last=False)
            del self._by_hash[self._hash_of.pop(block)]
        else:
            raise RuntimeError("the cache pool has no free block")
        self.refs[block] = 1
        return block

    def release(self, block: int) -> None:
        """Drop one reference; at zero the block becomes free, or idle-cached if it holds a hashed prefix."""
        if self.refs[block] <= 0:
            raise RuntimeError(f"block {block} released more often than referenced")
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self._hash_of:
                self._idle[block] = None
            else:
                self._free.append(block)

    def lookup(self, digest: bytes) -> int | None:
        """The cached block holding this full block, with one more reference taken; None on a miss."""
        block = self._by_hash.get(digest)
        if block is None:
            return None
        if self.refs[block] == 0:
            del self._idle[block]
        self.refs[block] += 1
        return block

    def register(self, block: int, digest: bytes) -> None:
        """Record that `block` (referenced, now full) holds the block with this hash. If another block
        already holds it, this one stays private (freed normally)."""
        if digest not in self._by_hash and block not in self._hash_of:
            self._by_hash[digest] = block
            self._hash_of[block] = digest

    @property
    def cached_blocks(self) -> int:
        return len(self._by_hash)


class CachePool:
    """The pool's tensors, one entry per decoder layer (see dsmoe.model.paged for the layouts), then one per
    extra layer (the MTP module's attention, for speculative decoding), plus its BlockAllocator. Sized by
    num_blocks; `from_memory` / `from_tokens` size it by bytes or positions."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 layout: str | None = None, extra_layers: int = 0) -> None:
        layout = layout or default_layout(config)
        values_per_token(config, layout)  # validates the layout for this model
        self.config, self.layout, self.block_size, self.dtype = config, layout, block_size, dtype
        self.extra_layers = extra_layers
        self.allocator = BlockAllocator(num_blocks, block_size)
        shape = (num_blocks, block_size)
        self.layers: list[tuple[torch.Tensor, ...]] = []
        for _ in range(config.num_hidden_layers + extra_layers):
            if layout == "latent":
                width = config.kv_lora_rank + config.qk_rope_head_dim
                self.layers.append((torch.zeros(*shape, width, dtype=dtype, device=device),))
            elif layout == "kv":
                kv = (config.kv_heads, config.gqa_head_dim)
                self.layers.append((torch.zeros(*shape, *kv, dtype=dtype, device=device),
                                    torch.zeros(*shape, *kv, dtype=dtype, device=device)))
            else:
                heads = config.num_attention_heads
                self.layers.append((torch.zeros(*shape, heads, config.qk_head_dim, dtype=dtype, device=device),
                                    torch.zeros(*shape, heads, config.v_head_dim, dtype=dtype, device=device)))

    @classmethod
    def from_memory(cls, config: ModelConfig, memory: str | int, block_size: int = 16,
                    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    layout: str | None = None, extra_layers: int = 0) -> "CachePool":
        """As many blocks as fit in `memory` (bytes, or text like "2GiB"). Raises ValueError when not even
        one block fits, naming the block's size."""
        layout = layout or default_layout(config)
        per_block = bytes_per_block(config, block_size, dtype, layout, extra_layers)
        num_blocks = parse_size(memory) // per_block
        if num_blocks < 1:
            raise ValueError(f"cache memory {memory!r} holds no block: one block of {block_size} positions "
                             f"takes {per_block} bytes in the {layout} layout")
        return cls(config, num_blocks, block_size, dtype, device, layout, extra_layers)

    @classmethod
    def from_tokens(cls, config: ModelConfig, tokens: int, block_size: int = 16,
                    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    layout: str | None = None, extra_layers: int = 0) -> "CachePool":
        """Room for `tokens` positions in all (rounded up to whole blocks)."""
        if tokens < 1:
            raise ValueError(f"cache tokens must be >= 1, got {tokens}")
        return cls(config, -(-tokens // block_size), block_size, dtype, device, layout, extra_layers)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)

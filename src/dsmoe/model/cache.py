"""Preallocated inference caches, indexed by absolute position.

GQA/MHA layers keep K and V per kv head: 2 * G * D values per token; with a sliding window only the last
`sliding_window` tokens' (RollingKVCache), so a long generation holds a bounded cache.
MLA layers keep only the normalised latent c_kv (C) and the shared rope key k_pe (R): C + R values per
token, stored side by side in one (B, L, C + R) buffer so absorbed attention reads [c_kv | k_pe] as one
576-wide key with no concatenation per step (DeepSeek-V2 section 2.1.3).

Shape legend: B batch, L capacity (max positions), W sliding window, G kv heads, D head width, C kv_lora_rank,
R rope width.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


class KVCache:
    def __init__(self, batch: int, capacity: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.k = torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)  # (B, G, L, D)
        self.v = torch.zeros_like(self.k)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, G, T, D) at positions start..start+T; return all keys/values so far (B, G, S, D)."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class RollingKVCache:
    """K and V of the last `window` positions in a ring buffer (slot p % W), for sliding-window layers: a
    query at position q sees keys q-W+1..q, so older keys are never read again.

    Positions are written in order (each update starts where the last ended, or at 0 to start over). An
    update of T tokens returns the cached keys it may need (up to W before `start`) followed by the T new
    ones, i.e. positions max(0, start-W)..start+T-1; the attention mask covers keys 0..start+T-1 and is cut
    to its last columns in attention(). Multi-token steps (a prefill) read before they overwrite.
    """

    def __init__(self, batch: int, window: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.window = window
        self.k = torch.zeros(batch, kv_heads, window, head_dim, dtype=dtype, device=device)  # (B, G, W, D)
        self.v = torch.zeros_like(self.k)
        self.length = 0  # positions written so far

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, G, T, D) at positions start..start+T; return keys/values of positions
        max(0, start - W)..start+T-1 (B, G, S, D)."""
        if start not in (0, self.length):
            raise ValueError(f"a sliding-window cache is written in order: expected start {self.length} "
                             f"(or 0), got {start}")
        W, T = self.window, k.shape[2]
        cached = min(start, W)
        if cached:
            slots = torch.arange(start - cached, start, device=self.k.device) % W
            k_all, v_all = torch.cat((self.k[:, :, slots], k), dim=2), torch.cat((self.v[:, :, slots], v), dim=2)
        else:
            k_all, v_all = k, v
        keep = min(T, W)  # only the last W new positions can be needed later
        slots = torch.arange(start + T - keep, start + T, device=self.k.device) % W
        self.k[:, :, slots] = k[:, :, T - keep:]
        self.v[:, :, slots] = v[:, :, T - keep:]
        self.length = start + T
        return k_all, v_all

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class LatentCache:
    def __init__(self, batch: int, capacity: int, kv_rank: int, rope_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", index_dim: int = 0) -> None:
        self.kv_rank = kv_rank
        self.latent = torch.zeros(batch, capacity, kv_rank + rope_dim, dtype=dtype, device=device)  # (B, L, C+R)
        # V3.2: the lightning indexer's key (index_head_dim per token) lives beside the latent (dsa.py).
        self.index_keys = (torch.zeros(batch, capacity, index_dim, dtype=dtype, device=device)  # (B, L, D_I)
                           if index_dim else None)

    def update_index(self, start: int, keys: torch.Tensor) -> torch.Tensor:
        """Write indexer keys (B, T, D_I) at start..start+T; return all of them so far (B, S, D_I)."""
        if self.index_keys is None:
            raise ValueError("this LatentCache holds no indexer keys (built with index_dim=0)")
        end = start + keys.shape[1]
        self.index_keys[:, start:end] = keys
        return self.index_keys[:, :end]

    def update(self, start: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """Write c_kv (B, T, C) and k_pe (B, T, R) at start..start+T; return [c_kv | k_pe] so far (B, S, C+R)."""
        end = start + c_kv.shape[1]
        self.latent[:, start:end, :self.kv_rank] = c_kv
        self.latent[:, start:end, self.kv_rank:] = k_pe
        return self.latent[:, :end]

    def nbytes(self) -> int:
        index = 0 if self.index_keys is None else self.index_keys.numel() * self.index_keys.element_size()
        return self.latent.numel() * self.latent.element_size() + index


LayerCache = KVCache | RollingKVCache | LatentCache


def make_layer_cache(config: ModelConfig, batch: int, capacity: int, dtype: torch.dtype,
                     device: torch.device | str = "cpu") -> LayerCache:
    if config.uses_mla:
        return LatentCache(batch, capacity, config.kv_lora_rank, config.qk_rope_head_dim, dtype, device,
                           config.index_head_dim if config.uses_dsa else 0)
    if config.sliding_window is not None and config.sliding_window < capacity:
        return RollingKVCache(batch, config.sliding_window, config.kv_heads, config.gqa_head_dim, dtype, device)
    return KVCache(batch, capacity, config.kv_heads, config.gqa_head_dim, dtype, device)


class ModelCache:
    """One layer cache per decoder layer (plus any for MTP modules), all of one capacity."""

    def __init__(self, config: ModelConfig, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", extra_layers: int = 0) -> None:
        if capacity > config.max_position_embeddings:
            raise ValueError(f"cache capacity {capacity} exceeds max_position_embeddings="
                             f"{config.max_position_embeddings}")
        self.capacity = capacity
        self.layers = [make_layer_cache(config, batch, capacity, dtype, device)
                       for _ in range(config.num_hidden_layers + extra_layers)]

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

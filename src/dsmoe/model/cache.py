"""Preallocated inference caches, indexed by absolute position.

GQA/MHA layers keep K and V per kv head: 2 * G * D values per token.
MLA layers keep only the normalised latent c_kv (C) and the shared rope key k_pe (R): C + R values per
token, stored side by side in one (B, L, C + R) buffer so absorbed attention reads [c_kv | k_pe] as one
576-wide key with no concatenation per step (DeepSeek-V2 section 2.1.3).

Shape legend: B batch, L capacity (max positions), G kv heads, D head width, C kv_lora_rank, R rope width.
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


LayerCache = KVCache | LatentCache


def make_layer_cache(config: ModelConfig, batch: int, capacity: int, dtype: torch.dtype,
                     device: torch.device | str = "cpu") -> LayerCache:
    if config.uses_mla:
        return LatentCache(batch, capacity, config.kv_lora_rank, config.qk_rope_head_dim, dtype, device,
                           config.index_head_dim if config.uses_dsa else 0)
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

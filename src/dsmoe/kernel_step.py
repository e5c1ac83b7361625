"""A CPU decode step written straight against dsmoe's decode kernels: the eager step without its framework cost.

`model(token, cache=cache, start=p)` spends as long dispatching ~600 small PyTorch operations and ~100
nn.Module calls (norms, projections, rope, views, casts, the checks of every layer) as its matrix products take.
`KernelDecodeStep` computes the same step for the families whose decode kernels exist (MLA or GQA attention
over a contiguous cache, dense MLP or DeepSeek MoE) as ~20 calls per layer into dsmoe.ops.cpu_kernels (RMSNorm,
projections, rope, the MoE router and experts, absorbed MLA attention) with the weights looked up once: no
module calls, no per-call checks. The eager step is its slow twin (tests/test_kernel_step.py: the same logits to
float rounding and the same greedy tokens). No compiler and nothing imported beyond the kernels: the peak memory
of a decode stays the model, its cache and the PyTorch runtime (torch.compile's stack costs ~150 MiB more).

`KernelDecodeStep.supports(model, cache, batch)` says whether a model/cache/batch is covered: CPU, fp32 or bf16,
at most 8 rows, no sliding window (rolling caches), no DeepSeek-V3.2 sparse attention, not DeepSeek-V4, no
token dropping; the kernels built (a C++ compiler present) and not switched off (DSMOE_CPU_KERNELS=0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import Transformer
from .model.attention import GQAttention, MLAttention
from .model.cache import KVCache, LatentCache, ModelCache
from .model.moe import MoE
from .ops.cpu_kernels import MAX_TOKENS, small_batch_kernels


class KernelDecodeStep:
    """Greedy/sampled decode steps of `model` over `cache` on the CPU through the decode kernels (module doc).

    model: eval mode, CPU. cache: model.make_cache(B, L) holding the prompt (prefilled by the eager forward).
    pad (B,) long or None: each row's left padding, as given to the prefill.
    __call__(token (B,) long, position int) -> logits (B, V) fp32 of the token at slot `position`, the cache
    updated: what model(token[:, None], cache=cache, start=position, pad=pad)[:, -1] returns.
    Raises ValueError when `supports` is False.
    """

    @staticmethod
    def supports(model: Transformer, cache: ModelCache, batch: int) -> bool:
        config = model.config
        if config.model_type == "deepseek_v4" or config.uses_dsa or not 1 <= batch <= MAX_TOKENS or model.training:
            return False
        if any(not isinstance(c, (KVCache, LatentCache)) for c in cache.layers[:config.num_hidden_layers]):
            return False
        if any(isinstance(b.ffn, MoE) and b.ffn.token_dropping is not None for b in model.layers):
            return False
        weight = model.embed.weight
        with torch.no_grad():
            return small_batch_kernels(weight[:batch], model.head.weight) is not None

    def __init__(self, model: Transformer, cache: ModelCache, pad: torch.Tensor | None = None) -> None:
        first = cache.layers[0]
        batch = first.latent.shape[0] if isinstance(first, LatentCache) else first.k.shape[0]
        if not self.supports(model, cache, batch):
            raise ValueError("KernelDecodeStep covers CPU models in eval mode (fp32/bf16, MLA or GQA attention, no "
                             "sliding window, DSA or V4) with at most 8 rows, and needs the CPU decode kernels")
        self.model, self.cache, self.batch = model, cache, batch
        self.ops = small_batch_kernels(model.embed.weight[:1], model.head.weight)
        self.pad = None if pad is None else pad.to(torch.long)
        self.capacity = cache.capacity

    @torch.no_grad()
    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        if not 0 <= position < self.capacity:
            raise ValueError(f"position {position} is outside the cache (capacity {self.capacity})")
        model, ops, B = self.model, self.ops, self.batch
        x = model.embed.weight.index_select(0, token.view(-1))  # (B, D)
        positions = torch.full((B, 1), position, dtype=torch.long)
        visible = None
        if self.pad is not None:  # a row sees its own keys only: from its padding on (the new one always)
            positions = (positions - self.pad[:, None]).clamp(min=0)
            visible = torch.arange(position + 1)[None, :] >= self.pad[:, None]  # (B, S)
            visible[:, position] = True
        cos, sin = model.rope(positions, x.dtype)  # (B, 1, R/2)
        for block, layer_cache in zip(model.layers, self.cache.layers):
            h = ops.rms_norm(x, block.attn_norm.weight, block.attn_norm.eps)
            if isinstance(block.attn, MLAttention):
                a = self._mla(block.attn, h, cos, sin, layer_cache, position, visible)
            else:
                a = self._gqa(block.attn, h, cos, sin, layer_cache, position, visible)
            x = x + a
            h = ops.rms_norm(x, block.ffn_norm.weight, block.ffn_norm.eps)
            x = x + (self._moe(block.ffn, h) if isinstance(block.ffn, MoE) else self._mlp(block.ffn, h))
        h = ops.rms_norm(x, model.norm.weight, model.norm.eps)
        return self._linear(model.head, h).float()

    def _linear(self, layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        y = self.ops.linear(x, layer.weight)
        return y if layer.bias is None else y + layer.bias.to(y.dtype)

    def _mla(self, attn: MLAttention, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache,
             position: int, visible: torch.Tensor | None) -> torch.Tensor:
        """MLAttention.forward for one token per row, absorbed form (DeepSeek-V2 section 2.1.3) -> (B, D)."""
        ops, B = self.ops, h.shape[0]
        N, R, C = attn.nope_dim, attn.rope_dim, attn.kv_rank
        if attn.q_rank is None:
            q = self._linear(attn.wq, h)
        else:
            q = self._linear(attn.wq_b, ops.rms_norm(self._linear(attn.wq_a, h), attn.q_norm.weight, attn.q_norm.eps))
        q = q.view(B, 1, -1, N + R)  # (B, 1, H, N + R)
        kv = self._linear(attn.wkv_a, h)  # (B, C + R)
        latent = cache.latent
        latent[:, position, :C] = ops.rms_norm(kv[:, :C], attn.kv_norm.weight, attn.kv_norm.eps)
        latent[:, position, C:] = ops.rope(kv[:, None, None, C:], cos, sin, attn.interleaved).view(B, R)
        q_pe = ops.rope(q[..., N:], cos, sin, attn.interleaved)  # (B, 1, H, R)
        H = q.shape[2]
        o = ops.mla_decode(q[:, 0, :, :N], q_pe.view(B, H, R), latent[:, :position + 1], attn.wkv_b.weight,
                           attn.v_dim, attn.scale, visible)  # (B, H * V)
        return self._linear(attn.wo, o)

    def _gqa(self, attn: GQAttention, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
             position: int, visible: torch.Tensor | None) -> torch.Tensor:
        """GQAttention.forward for one token per row -> (B, D)."""
        ops, B, D = self.ops, h.shape[0], attn.head_dim
        q = ops.rope(self._linear(attn.wq, h).view(B, 1, -1, D), cos, sin, False)  # (B, 1, H, D)
        cache.k[:, :, position] = ops.rope(self._linear(attn.wk, h).view(B, 1, -1, D), cos, sin, False)[:, 0]
        cache.v[:, :, position] = self._linear(attn.wv, h).view(B, -1, D)
        S = position + 1
        mask = None if visible is None else visible[:, None, None, :]
        k, v = cache.k[:, :, :S], cache.v[:, :, :S]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=attn.scale,
                                             enable_gqa=k.shape[1] != q.shape[2])  # (B, H, 1, D)
        return self._linear(attn.wo, out.reshape(B, -1))

    def _mlp(self, mlp, h: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(self.ops.swiglu(h, mlp.w1.weight, mlp.w3.weight), mlp.w2.weight)

    def _moe(self, moe: MoE, h: torch.Tensor) -> torch.Tensor:
        """MoE.forward (DeepSeekMoE section 3) for a few tokens: the router, the picked experts, the shared ones."""
        gate = moe.gate
        group_mode = 0 if not gate.group_limited else (2 if gate.method == "noaux_tc" else 1)
        weights, indices = self.ops.route(h, gate.weight, gate.bias, gate.scoring != "softmax", gate.top_k,
                                          gate.n_group, gate.topk_group, group_mode, gate.normalise,
                                          gate.scale_after_normalising or not gate.normalise, float(gate.scaling))
        experts = moe.experts
        y = self.ops.moe_experts(h, indices, weights, experts.w1, experts.w2, experts.w3)
        if moe.shared_experts is not None:
            y = y + self._mlp(moe.shared_experts, h)
        return y


__all__ = ["KernelDecodeStep"]

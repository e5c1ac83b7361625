"""A CPU decode step written straight against dsmoe's decode kernels: the eager step without its framework cost.

`model(token, cache=cache, start=p)` spends as long dispatching ~600 small PyTorch operations and ~100
nn.Module calls (norms, projections, rope, views, casts, the checks of every layer) as its matrix products take.
`KernelDecodeStep` computes the same step for the families whose decode kernels exist (MLA or GQA attention
over a contiguous cache, dense MLP or DeepSeek MoE) through dsmoe.ops.cpu_kernels: for MLA models without
attention biases the whole step is one C++ call (`mla_decode_step`, its arguments flattened once by
`MLAStepPlan`); otherwise ~6 calls per layer (`decode_layers`: the layer pieces, attention, the FFN block). No
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
        self.plan = MLAStepPlan(model) if MLAStepPlan.applies(model) else None  # the whole step in one C++ call

    @torch.no_grad()
    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        if not 0 <= position < self.capacity:
            raise ValueError(f"position {position} is outside the cache (capacity {self.capacity})")
        model, ops, B = self.model, self.ops, self.batch
        positions = torch.full((B, 1), position, dtype=torch.long)
        visible = None
        if self.pad is not None:  # a row sees its own keys only: from its padding on (the new one always)
            positions = (positions - self.pad[:, None]).clamp(min=0)
            visible = torch.arange(position + 1)[None, :] >= self.pad[:, None]  # (B, S)
            visible[:, position] = True
        caches = self.cache.layers
        if self.plan is not None:
            latents = [c.latent for c in caches[:len(model.layers)]]  # the head in the same C++ call
            return self.plan.logits(ops, token.view(-1), positions.view(-1), latents, position, visible)

        def attend(i: int, attn, q: torch.Tensor, new: tuple[torch.Tensor, ...]) -> torch.Tensor:
            if isinstance(attn, MLAttention):
                latent = caches[i].latent
                latent[:, position] = new[0] if len(new) == 1 else torch.cat(new, dim=-1)
                return mla_attention(ops, attn, q, latent[:, :position + 1], visible)
            k, v = new
            caches[i].k[:, :, position], caches[i].v[:, :, position] = k, v
            S = position + 1
            return gqa_attention(ops, attn, q, caches[i].k[:, :, :S], caches[i].v[:, :, :S],
                                 None if visible is None else visible[:, None, None, :])

        h = decode_layers(ops, model, token.view(-1), positions, attend)
        return linear(ops, model.head, h).float()


_NONE = torch.empty(0)  # an absent weight in MLAStepPlan's flat list (the operator's "no tensor")


class MLAStepPlan:
    """The arguments of the C++ whole-step operator `mla_decode_step` for one model, flattened once (the layout
    is documented with the operator in ops/cpu/decode_step.cpp) and handed to a C++ `MLAStep` that keeps them, so
    that a step passes only its own inputs: every layer MLA attention without biases, dense MLP or DeepSeek MoE,
    the norms in the embedding's dtype. In-place changes to the weights (an optimizer step, the router's bias
    updates) are seen by the next step. When the model's tensors are replaced (`model.to(...)`, which also replaces
    buffers such as the router's bias) the lists are flattened again; the check looks at the embedding and the
    head only, so after replacing other parameters (`load_state_dict(..., assign=True)`) build a new plan.
    """

    @staticmethod
    def applies(model: Transformer) -> bool:
        for block in model.layers:
            attn = block.attn
            if not isinstance(attn, MLAttention) or attn.indexer is not None:
                return False
            if _has_bias(attn.wkv_a, attn.wo, getattr(attn, "wq_a", None), getattr(attn, "wq", None)):
                return False
            if isinstance(block.ffn, MoE) and block.ffn.token_dropping is not None:
                return False
            norms = [block.attn_norm, block.ffn_norm, attn.kv_norm] + ([attn.q_norm] if attn.q_rank else [])
            if any(n.weight.dtype != model.embed.weight.dtype for n in norms):  # the operator's activations' dtype
                return False
        return model.norm.weight.dtype == model.embed.weight.dtype

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self._native: dict[bool, object] = {}  # with the head or not -> MLAStep
        self._flatten()

    def _key(self) -> tuple[int, ...]:
        embed, head = self.model.embed.weight, self.model.head.weight
        return id(embed), embed.data_ptr(), id(head), head.data_ptr()

    def _flatten(self) -> None:
        model = self.model
        weights, ints, floats = [], [], []
        for block in model.layers:
            attn, ffn = block.attn, block.ffn
            lora = attn.q_rank is not None
            weights += [block.attn_norm.weight, attn.wq_a.weight if lora else _NONE,
                        attn.q_norm.weight if lora else _NONE, (attn.wq_b if lora else attn.wq).weight,
                        attn.wkv_a.weight, attn.kv_norm.weight, attn.wkv_b.weight, attn.wo.weight, block.ffn_norm.weight]
            if isinstance(ffn, MoE):
                gate, shared = ffn.gate, ffn.shared_experts
                weights += [gate.weight, _NONE if gate.bias is None else gate.bias,
                            ffn.experts.w1, ffn.experts.w2, ffn.experts.w3,
                            *((_NONE,) * 3 if shared is None else (shared.w1.weight, shared.w3.weight, shared.w2.weight))]
                *rule, scaling = gate.kernel_settings()
                ints += [int(lora), 1, int(shared is not None), *map(int, rule)]
            else:
                weights += [_NONE, _NONE, ffn.w1.weight, ffn.w2.weight, ffn.w3.weight, _NONE, _NONE, _NONE]
                ints += [int(lora), 0, 0, 0, 1, 1, 1, 0, 0, 0]
                scaling = 1.0
            floats += [block.attn_norm.eps, attn.q_norm.eps if lora else 1e-6, attn.kv_norm.eps, block.ffn_norm.eps,
                       float(attn.scale), scaling]
        first = model.layers[0].attn
        self.weights, self.ints, self.floats = weights, ints, floats
        self.dims = [first.nope_dim, first.rope_dim, first.v_dim, int(first.interleaved)]
        self._native.clear()  # MLASteps built from the previous tensors
        self._flattened = self._key()

    def _step(self, ops, logits: bool):
        if self._key() != self._flattened:  # the model's tensors were replaced (.to): flatten them again
            self._flatten()
        native = self._native.get(logits)
        if native is None:
            model = self.model
            native = self._native[logits] = torch.classes.dsmoe_cpu.MLAStep(
                self.weights, self.ints, self.floats, self.dims, model.embed.weight, model.rope.inv_freq,
                model.rope.amplitude, model.norm.weight, model.norm.eps, model.head.weight if logits else None)
        return native

    def hidden(self, ops, ids: torch.Tensor, positions: torch.Tensor, caches: list[torch.Tensor], position: int = 0,
               slots: torch.Tensor | None = None, tables: torch.Tensor | None = None, keys: int = 0,
               visible: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, D) of one token per row: ids (B,), rope positions (B,); caches as
        mla_decode_step takes them (contiguous latents, or paged pools with slots/tables/keys)."""
        return self._step(ops, False).step(ids, positions, caches, position, slots, tables, keys, visible)

    def logits(self, ops, ids: torch.Tensor, positions: torch.Tensor, caches: list[torch.Tensor], position: int = 0,
               visible: torch.Tensor | None = None) -> torch.Tensor:
        """The head's logits (B, V) fp32 after `hidden` over contiguous caches, in the same call (the head's output
        rounded to the model's dtype first, as model.head's is; dsmoe's head has no bias)."""
        return self._step(ops, True).step(ids, positions, caches, position, None, None, 0, visible)


def decode_layers(ops, model: Transformer, ids: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
    """The decoder over one token per row through the kernels -> final-normed hidden states (B, D).

    ids (B,), positions (B, 1) for rope. attend(layer index, attention module, q, new) stores the layer's new
    keys (`new`: (c_kv, k_pe) for MLA, (k, v) for GQA) wherever its cache keeps them and returns the attention
    output (B, D), wo included; q is what mla_attention / gqa_attention take."""
    x = model.embed.weight.index_select(0, ids)  # (B, D)
    cos, sin = model.rope(positions, x.dtype)  # (B, 1, R/2)
    for i, block in enumerate(model.layers):
        attn = block.attn
        if isinstance(attn, MLAttention) and not _has_bias(attn.wkv_a, getattr(attn, "wq_a", None)):
            q_nope, q_pe, row = ops.mla_project(  # the whole input side of the layer in one call
                x, block.attn_norm.weight, block.attn_norm.eps,
                None if attn.q_rank is None else attn.wq_a.weight, None if attn.q_rank is None else attn.q_norm.weight,
                1e-6 if attn.q_rank is None else attn.q_norm.eps, (attn.wq if attn.q_rank is None else attn.wq_b).weight,
                attn.wkv_a.weight, attn.kv_norm.weight, attn.kv_norm.eps, cos, sin, attn.interleaved,
                attn.nope_dim, attn.rope_dim)
            q, new = (q_nope, q_pe), (row,)
        else:
            h = ops.rms_norm(x, block.attn_norm.weight, block.attn_norm.eps)
            project = mla_project if isinstance(attn, MLAttention) else gqa_project
            q, new = project(ops, attn, h, cos, sin)
        x = x + attend(i, attn, q, new)
        x = ffn_block(ops, block, x)
    return ops.rms_norm(x, model.norm.weight, model.norm.eps)


def _has_bias(*layers) -> bool:
    return any(layer is not None and layer.bias is not None for layer in layers)


def ffn_block(ops, block, x: torch.Tensor) -> torch.Tensor:
    """x + ffn(ffn_norm(x)) in one kernel call: MoE (router, experts, shared experts) or the dense MLP."""
    ffn, norm = block.ffn, block.ffn_norm
    if not isinstance(ffn, MoE):
        return ops.mlp_block(x, norm.weight, norm.eps, ffn.w1.weight, ffn.w3.weight, ffn.w2.weight)
    gate, experts, shared = ffn.gate, ffn.experts, ffn.shared_experts
    return ops.moe_block(x, norm.weight, norm.eps, gate.weight, gate.bias, *gate.kernel_settings(),
                         experts.w1, experts.w2, experts.w3,
                         *((None, None, None) if shared is None else
                           (shared.w1.weight, shared.w3.weight, shared.w2.weight)))


def linear(ops, layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    y = ops.linear(x, layer.weight)
    return y if layer.bias is None else y + layer.bias.to(y.dtype)


def mla_project(ops, attn: MLAttention, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """MLAttention's projections for one token per row -> ((q_nope (B, H, N), q_pe (B, H, R)),
    (c_kv (B, C) normalised, k_pe (B, R) with rope)): the query and what the latent cache keeps."""
    B, N, R, C = h.shape[0], attn.nope_dim, attn.rope_dim, attn.kv_rank
    if attn.q_rank is None:
        q = linear(ops, attn.wq, h)
    else:
        q = linear(ops, attn.wq_b, ops.rms_norm(linear(ops, attn.wq_a, h), attn.q_norm.weight, attn.q_norm.eps))
    q = q.view(B, 1, -1, N + R)  # (B, 1, H, N + R)
    H = q.shape[2]
    kv = linear(ops, attn.wkv_a, h)  # (B, C + R)
    c_kv = ops.rms_norm(kv[:, :C], attn.kv_norm.weight, attn.kv_norm.eps)
    k_pe = ops.rope(kv[:, None, None, C:], cos, sin, attn.interleaved).view(B, R)
    q_pe = ops.rope(q[..., N:], cos, sin, attn.interleaved).view(B, H, R)
    return (q[:, 0, :, :N], q_pe), (c_kv.to(k_pe.dtype), k_pe)


def mla_attention(ops, attn: MLAttention, q: tuple[torch.Tensor, torch.Tensor], latent: torch.Tensor,
                  visible: torch.Tensor | None) -> torch.Tensor:
    """Absorbed MLA (DeepSeek-V2 section 2.1.3) of q over latent (B, S, C + R), mask visible (B, S) or None,
    then wo -> (B, D)."""
    q_nope, q_pe = q
    o = ops.mla_decode(q_nope, q_pe, latent, attn.wkv_b.weight, attn.v_dim, attn.scale, visible)  # (B, H * V)
    return linear(ops, attn.wo, o)


def gqa_project(ops, attn: GQAttention, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """GQAttention's projections for one token per row -> (q (B, 1, H, D) with rope, (k (B, G, D) with rope,
    v (B, G, D)))."""
    B, D = h.shape[0], attn.head_dim
    q = ops.rope(linear(ops, attn.wq, h).view(B, 1, -1, D), cos, sin, False)
    k = ops.rope(linear(ops, attn.wk, h).view(B, 1, -1, D), cos, sin, False)[:, 0]
    return q, (k, linear(ops, attn.wv, h).view(B, -1, D))


def gqa_attention(ops, attn: GQAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
    """q (B, 1, H, D) over k, v (B, G, S, D), mask (B, 1, 1, S) or None, then wo -> (B, D)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=attn.scale,
                                         enable_gqa=k.shape[1] != q.shape[2])  # (B, H, 1, D)
    return linear(ops, attn.wo, out.reshape(q.shape[0], -1))


def paged_decode_hidden_states(model: Transformer, ids: torch.Tensor, meta, layers: list,
                               plan: MLAStepPlan | None = None) -> torch.Tensor | None:
    """dsmoe.model.paged.paged_hidden_states for a step of decodes only (meta.only_decodes), through the kernels
    -> final-normed hidden states (M, D); None when the kernels do not take it (then the caller runs the
    module path): more than 8 sequences, the decompressed MLA layout, a sliding window, no kernels."""
    from .model.paged import _gather

    if not meta.only_decodes or meta.window is not None or model.training:
        return None
    if any(len(layer) != (1 if isinstance(block.attn, MLAttention) else 2)
           for block, layer in zip(model.layers, layers)):
        return None  # MLA served from the decompressed (per-head K/V) layout: the module path handles it
    ops = small_batch_kernels(model.embed.weight[:ids.shape[0]], model.head.weight)
    if ops is None:
        return None
    tables, S = meta.decode_tables, meta.decode_keys
    visible = None if meta.decode_mask is None else meta.decode_mask[:, 0, 0]  # (M, S)
    if plan is not None:  # plan: MLAStepPlan(model), built once by the caller
        pools = [layer[0] for layer in layers[:len(model.layers)]]
        return plan.hidden(ops, ids, meta.positions, pools, 0, meta.slots, tables, S, visible)

    def attend(i: int, attn, q, new) -> torch.Tensor:
        pool = layers[i]
        if isinstance(attn, MLAttention):
            flat = pool[0].view(-1, pool[0].shape[-1])
            row = new[0] if len(new) == 1 else torch.cat(new, dim=-1)
            flat.index_copy_(0, meta.slots, row.to(flat.dtype))
            return mla_attention(ops, attn, q, _gather(pool[0], tables)[:, :S], visible)
        k_pool, v_pool = pool
        for p, t in zip(pool, new):
            p.view(-1, *p.shape[2:]).index_copy_(0, meta.slots, t.to(p.dtype))
        k = _gather(k_pool, tables)[:, :S].transpose(1, 2)  # (M, G, S, D)
        v = _gather(v_pool, tables)[:, :S].transpose(1, 2)
        return gqa_attention(ops, attn, q, k, v, meta.decode_mask)

    return decode_layers(ops, model, ids, meta.positions[:, None], attend)


__all__ = ["KernelDecodeStep", "MLAStepPlan", "decode_layers", "paged_decode_hidden_states"]

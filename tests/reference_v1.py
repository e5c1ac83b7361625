"""Test-only reference for DeepSeekMoE "V1" (model_type "deepseek", e.g. deepseek-moe-16b).

transformers has no class for it, so this is an independent re-statement of its math, written from the
DeepSeekMoE paper (arXiv:2401.06066, section 3) and the semantics of the `modeling_deepseek.py` published
with deepseek-ai/deepseek-moe-16b-base. It deliberately shares nothing with `dsmoe.model`: it reads a plain
dict of tensors under the Hub checkpoint names and a plain dict of config.json hyperparameters, and spells
every step out with explicit matmuls (no SDPA, no nn.Module, no sorted dispatch).

    Llama-style pre-norm decoder:
        h = x + o_proj(attn(rope(q_proj(n1(x))), rope(k_proj(n1(x))), v_proj(n1(x))))
        y = h + ffn(n2(h))
    ffn is a dense SwiGLU MLP for layers < first_k_dense_replace and for layers with layer % moe_layer_freq
    != 0; otherwise DeepSeekMoE:
        s = softmax(x W_g^T)            (fp32, over all routed experts)
        top-k greedy on s; renormalise the k picked weights only if top_k > 1 and norm_topk_prob
        y = sum_e combine[t, e] * expert_e(x) + shared_experts(x)
    where shared_experts is one SwiGLU MLP of width n_shared_experts * moe_intermediate_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def swiglu(x: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """down(silu(gate x) * up x) with HF (out, in) weight layout."""
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(seq_len: int, dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """Llama RoPE tables over the full head_dim: (T, dim) each, frequencies repeated for both halves."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    t = torch.arange(seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def attention(x: Tensor, sd: dict[str, Tensor], p: str, cfg: dict) -> Tensor:
    B, T, _ = x.shape
    n_heads = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    head_dim = cfg["hidden_size"] // n_heads
    q = (x @ sd[p + "self_attn.q_proj.weight"].T).view(B, T, n_heads, head_dim).transpose(1, 2)  # (B, H, T, D)
    k = (x @ sd[p + "self_attn.k_proj.weight"].T).view(B, T, n_kv, head_dim).transpose(1, 2)  # (B, G, T, D)
    v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(B, T, n_kv, head_dim).transpose(1, 2)
    cos, sin = rope_cos_sin(T, head_dim, cfg.get("rope_theta", 10000.0))
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    # repeat_kv: kv head g serves query heads g * (H / G) ... (g + 1) * (H / G) - 1
    k = k.repeat_interleave(n_heads // n_kv, dim=1)
    v = v.repeat_interleave(n_heads // n_kv, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * head_dim ** -0.5  # (B, H, T, T)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores.to(torch.float32), dim=-1).to(q.dtype)
    out = torch.matmul(probs, v)  # (B, H, T, D)
    out = out.transpose(1, 2).reshape(B, T, n_heads * head_dim)
    return out @ sd[p + "self_attn.o_proj.weight"].T


def moe(x: Tensor, sd: dict[str, Tensor], p: str, cfg: dict) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (output, topk_idx (N, K), topk_weight (N, K))."""
    shape = x.shape
    h = x.reshape(-1, shape[-1])  # (N, D)
    n_experts, top_k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    logits = h.to(torch.float32) @ sd[p + "mlp.gate.weight"].to(torch.float32).T  # (N, E)
    scores = logits.softmax(dim=-1)
    topk_weight, topk_idx = torch.topk(scores, k=top_k, dim=-1)
    if top_k > 1 and cfg.get("norm_topk_prob", False):
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
    # Dense combine: every expert runs on every token; the (N, E) combine matrix zeroes the unpicked ones.
    combine = torch.zeros(h.shape[0], n_experts, dtype=torch.float32)
    combine.scatter_(1, topk_idx, topk_weight)
    outs = torch.stack([
        swiglu(h, sd[f"{p}mlp.experts.{e}.gate_proj.weight"], sd[f"{p}mlp.experts.{e}.up_proj.weight"],
               sd[f"{p}mlp.experts.{e}.down_proj.weight"])
        for e in range(n_experts)])  # (E, N, D)
    y = torch.einsum("ne,end->nd", combine, outs.to(torch.float32)).to(h.dtype)
    if cfg.get("n_shared_experts"):
        y = y + swiglu(h, sd[p + "mlp.shared_experts.gate_proj.weight"], sd[p + "mlp.shared_experts.up_proj.weight"],
                       sd[p + "mlp.shared_experts.down_proj.weight"])
    return y.view(shape), topk_idx, topk_weight


def is_moe_layer(cfg: dict, i: int) -> bool:
    return (cfg.get("n_routed_experts") is not None and i >= cfg.get("first_k_dense_replace", 0)
            and i % cfg.get("moe_layer_freq", 1) == 0)


def forward(sd: dict[str, Tensor], cfg: dict, input_ids: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
    """logits (B, T, V) in fp32 and {layer: topk_idx (B*T, K)} for every MoE layer."""
    eps = cfg.get("rms_norm_eps", 1e-6)
    x = sd["model.embed_tokens.weight"][input_ids]
    routing: dict[int, Tensor] = {}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = x + attention(rms_norm(x, sd[p + "input_layernorm.weight"], eps), sd, p, cfg)
        h = rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
        if is_moe_layer(cfg, i):
            y, idx, _ = moe(h, sd, p, cfg)
            routing[i] = idx
        else:
            y = swiglu(h, sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"], sd[p + "mlp.down_proj.weight"])
        x = x + y
    x = rms_norm(x, sd["model.norm.weight"], eps)
    return (x @ sd["lm_head.weight"].T).float(), routing

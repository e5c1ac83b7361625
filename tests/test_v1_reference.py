"""DeepSeekMoE V1 parity: dsmoe.Transformer against the independent reference in tests/reference_v1.py.

The weights go through the Hub's deepseek-moe-16b names, mapped here by hand (not by dsmoe.checkpoint), so
the test also pins down which of our tensors is which Hub tensor.
"""

from __future__ import annotations

import re

import pytest
import torch

import reference_v1
from dsmoe import ModelConfig, Transformer
from dsmoe.model import MoE
from dsmoe.presets import PRESETS

# Our per-layer names -> Hub names (deepseek-moe-16b); experts are handled separately (stacked vs per expert).
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
}
_EXPERTS = {"ffn.experts.w1": "gate_proj", "ffn.experts.w2": "down_proj", "ffn.experts.w3": "up_proj"}
_GLOBAL = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "head.weight": "lm_head.weight"}


def to_hub_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        t = t.detach().clone()
        if name in _GLOBAL:
            out[_GLOBAL[name]] = t
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        assert m, f"unmapped parameter {name}"
        layer, rest = m.groups()
        if rest in _LAYER:
            out[f"model.layers.{layer}.{_LAYER[rest]}"] = t
        elif rest in _EXPERTS:
            for e in range(t.shape[0]):
                out[f"model.layers.{layer}.mlp.experts.{e}.{_EXPERTS[rest]}.weight"] = t[e].clone()
        else:
            raise AssertionError(f"unmapped parameter {name}")
    return out


def _tiny_v1(**changes) -> dict:
    """tiny-v1 shrunk: 3 layers, 8 experts, top-2, 2 shared experts."""
    hp = {**PRESETS["tiny-v1"], "vocab_size": 512, "num_hidden_layers": 3, "n_routed_experts": 8,
          "num_experts_per_tok": 2, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
          "rope_theta": 10000.0, "initializer_range": 0.1}
    hp.update(changes)
    return hp


VARIANTS = {
    "top2": _tiny_v1(),
    "top2-norm-freq2-gqa": _tiny_v1(num_hidden_layers=4, norm_topk_prob=True, moe_layer_freq=2,
                                    num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5),
    "top3-no-dense-first": _tiny_v1(first_k_dense_replace=0, num_experts_per_tok=3, n_shared_experts=1),
    # published modeling_deepseek.py renormalises only when top_k > 1: a single pick keeps its softmax score
    "top1-norm": _tiny_v1(num_experts_per_tok=1, norm_topk_prob=True),
}


def _build(hp: dict, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**hp)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # not all ones, so a swapped norm would show
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_v1_matches_reference(variant):
    hp = VARIANTS[variant]
    model = _build(hp)
    cfg = model.config
    sd = to_hub_names(model.state_dict())

    # every Hub tensor the reference expects is there, and nothing else
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    per_moe = 1 + 3 * cfg.n_routed_experts + (3 if cfg.n_shared_experts else 0)
    expected = 3 + cfg.num_hidden_layers * 6 + n_moe * per_moe + (cfg.num_hidden_layers - n_moe) * 3
    assert len(sd) == expected

    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        ours = model(ids)
        ref, ref_routing = reference_v1.forward(sd, dict(hp), ids)
    assert ours.dtype == torch.float32 and ours.shape == (2, 16, cfg.vocab_size)
    assert ref.abs().max() > 0.5  # not a degenerate comparison
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4, f"max abs logit error {err}"

    # The layer plan is the official one, and routing is non-degenerate and identical.
    moe_layers = [i for i, b in enumerate(model.layers) if isinstance(b.ffn, MoE)]
    assert moe_layers == sorted(ref_routing)
    assert moe_layers, "variant has no MoE layer"
    for i in moe_layers:
        ours_idx = model.layers[i].ffn.last_routing.indices.sort(dim=-1).values
        ref_idx = ref_routing[i].sort(dim=-1).values
        assert torch.equal(ours_idx, ref_idx), f"layer {i}: different experts picked"
        used = ref_idx.unique().numel()
        assert used >= 5, f"layer {i}: only {used} of {cfg.n_routed_experts} experts used"
        weights = model.layers[i].ffn.last_routing.weights
        assert weights.max() < 0.99 or cfg.norm_topk_prob, "routing collapsed onto one expert per token"


def test_v1_layer_plan():
    """first_k_dense_replace and moe_layer_freq decide dense vs MoE exactly as in modeling_deepseek.py."""
    model = _build(VARIANTS["top2-norm-freq2-gqa"])
    kinds = [isinstance(b.ffn, MoE) for b in model.layers]
    assert kinds == [False, False, True, False]
    model = _build(VARIANTS["top2"])
    assert [isinstance(b.ffn, MoE) for b in model.layers] == [False, True, True]
    ffn = model.layers[1].ffn
    assert ffn.shared_experts.w1.weight.shape == (2 * 32, 64)
    assert ffn.experts.w1.shape == (8, 32, 64) and ffn.experts.w2.shape == (8, 64, 32)

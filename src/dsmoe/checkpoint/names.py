"""Hugging Face checkpoint names <-> dsmoe parameter names, one table per family.

Keys inside a layer are written without the `layers.{i}.` / `model.layers.{i}.` prefix. Stacked expert
tensors (ours: one (E, ...) tensor per projection) map to E per-expert Hub tensors; `{}` in the Hub name
is the expert index.
"""

from __future__ import annotations

from ..config import ModelConfig

GLOBAL = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}

_COMMON_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}

_GQA = {
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.wq.bias": "self_attn.q_proj.bias",
    "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.bias": "self_attn.v_proj.bias",
    "attn.wo.bias": "self_attn.o_proj.bias",
}

_MLA = {
    "attn.wq.weight": "self_attn.q_proj.weight",  # only when q_lora_rank is null (V2-Lite)
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.wq_a.bias": "self_attn.q_a_proj.bias",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.wkv_a.bias": "self_attn.kv_a_proj_with_mqa.bias",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.wo.bias": "self_attn.o_proj.bias",
}

_DEEPSEEK_FFN = {
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.experts.w1": "mlp.experts.{}.gate_proj.weight",
    "ffn.experts.w2": "mlp.experts.{}.down_proj.weight",
    "ffn.experts.w3": "mlp.experts.{}.up_proj.weight",
}

_MIXTRAL_FFN = {
    "ffn.gate.weight": "block_sparse_moe.gate.weight",
    "ffn.experts.w1": "block_sparse_moe.experts.{}.w1.weight",
    "ffn.experts.w2": "block_sparse_moe.experts.{}.w2.weight",
    "ffn.experts.w3": "block_sparse_moe.experts.{}.w3.weight",
}

# V3.2's lightning indexer (transformers' DeepseekV32Indexer; the Hub's names).
_INDEXER = {f"attn.indexer.{name}": f"self_attn.indexer.{name}"
            for name in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")}

LAYER_TABLES = {
    "deepseek": {**_COMMON_LAYER, **_GQA, **_DEEPSEEK_FFN},
    "deepseek_v2": {**_COMMON_LAYER, **_MLA, **_DEEPSEEK_FFN},
    "deepseek_v3": {**_COMMON_LAYER, **_MLA, **_DEEPSEEK_FFN},
    "deepseek_v32": {**_COMMON_LAYER, **_MLA, **_DEEPSEEK_FFN, **_INDEXER},
    "mixtral": {**_COMMON_LAYER, **_GQA, **_MIXTRAL_FFN},
}


# DeepSeek-V3's MTP module k is stored as layer num_hidden_layers + k; its block uses the layer table.
MTP = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "norm.weight": "shared_head.norm.weight",
}
# Copies of the shared embedding and head that the published checkpoint also stores in the MTP layer.
MTP_SHARED_COPIES = {"embed.weight": "embed_tokens.weight", "head.weight": "shared_head.head.weight"}


def mtp_layer(config: ModelConfig, depth: int) -> int:
    return config.num_hidden_layers + depth


def hf_names(config: ModelConfig, ours: str) -> list[str]:
    """Hub tensor names that make up our tensor `ours`: one name, or one per expert for stacked experts."""
    if ours in GLOBAL:
        return [GLOBAL[ours]]
    parts = ours.split(".", 2)
    if parts[0] not in ("layers", "mtp") or len(parts) < 3:
        raise KeyError(f"no Hugging Face name for parameter {ours!r}")
    table = LAYER_TABLES[config.model_type]
    layer, suffix = parts[1], parts[2]
    if parts[0] == "mtp":
        layer = str(mtp_layer(config, int(layer)))
        if suffix in MTP:
            return [f"model.layers.{layer}.{MTP[suffix]}"]
        suffix = suffix.removeprefix("block.")
    if suffix not in table:
        raise KeyError(f"no Hugging Face name for parameter {ours!r} ({config.model_type})")
    hf = f"model.layers.{layer}.{table[suffix]}"
    if "{}" in hf:
        return [hf.format(e) for e in range(config.n_routed_experts)]
    return [hf]


def mtp_layer_indices(config: ModelConfig, names: set[str]) -> set[int]:
    """Indices past num_hidden_layers of the DeepSeek-V3 MTP modules a checkpoint holds (judged by eh_proj)."""
    if config.model_type not in ("deepseek_v3", "deepseek_v32"):
        return set()
    found = set()
    for name in names:
        parts = name.split(".")
        if name.endswith(".eh_proj.weight") and parts[2].isdigit() and int(parts[2]) >= config.num_hidden_layers:
            found.add(int(parts[2]))
    return found


def is_ignored_hf_name(config: ModelConfig, name: str, with_mtp: bool, mtp_layers: set[int],
                       shape: tuple[int, ...]) -> bool:
    """Tensors a checkpoint may hold that the model does not need.

    - rotary `inv_freq` tables (older exports store them; we recompute);
    - FP8 scales, consumed together with their weight;
    - the MTP layers' copies of the shared embedding and head;
    - all of the MTP layers (`mtp_layers`, see mtp_layer_indices) when the model is built without them
      (transformers' DeepseekV3ForCausalLM drops them the same way);
    - `lm_head.weight` of a model with tied embeddings (the head is the embedding; transformers ignores it too);
    - 0-wide shared experts of a model with n_shared_experts 0 (transformers and DeepSeek's code build and save
      them).
    Any other layer at or past num_hidden_layers is not ignored: a config.json that declares fewer layers
    than the checkpoint holds must fail, not load a truncated model.
    """
    if name.endswith("rotary_emb.inv_freq") or name.endswith("_scale_inv"):
        return True
    if config.model_type == "deepseek_v4" and name.endswith(".scale") and not name.endswith("hc_head.hc_scale"):
        return True  # V4's FP8 / FP4 scales (X.scale beside X.weight), consumed with their weight
    if config.model_type == "deepseek_v4" and name.startswith("mtp."):
        return not with_mtp  # V4's MTP module, when the model is built without it (dsmoe.model.mtp_v4)
    if config.tie_word_embeddings and name == "lm_head.weight":
        return True
    if config.n_shared_experts == 0 and ".mlp.shared_experts." in name and 0 in shape:
        return True
    if name.startswith("model.layers."):
        layer, rest = name.split(".", 3)[2:]
        if layer.isdigit() and int(layer) in mtp_layers:
            return not with_mtp or rest in MTP_SHARED_COPIES.values()
    return False


def checkpoint_has_mtp(config: ModelConfig, names: set[str]) -> bool:
    """All of the config's MTP depths are present (judged by their eh_proj; V4: mtp.{k}.e_proj)."""
    depth = config.num_nextn_predict_layers
    if config.model_type == "deepseek_v4":
        return depth > 0 and all(f"mtp.{k}.e_proj.weight" in names for k in range(depth))
    return depth > 0 and all(f"model.layers.{mtp_layer(config, k)}.eh_proj.weight" in names for k in range(depth))


# DeepSeek-V4: our names are the Hub's inside a layer (attn.wq_a, attn.compressor.wkv, ffn.gate.tid2eid, ...);
# transformers' save_pretrained writes them under `model.layers.{i}.`, with these exceptions (its conversion
# mapping reads both that and the original layout without `model.`; see v4_alternatives).
V4_GLOBAL = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "head.weight",
    "hc_head.fn": "model.hc_head.hc_fn",
    "hc_head.base": "model.hc_head.hc_base",
    "hc_head.scale": "model.hc_head.hc_scale",
}
V4_ORIGINAL_GLOBAL = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
                      "model.hc_head.hc_fn": "hc_head_fn", "model.hc_head.hc_base": "hc_head_base",
                      "model.hc_head.hc_scale": "hc_head_scale"}


def v4_hf_names(config: ModelConfig, ours: str) -> list[str]:
    """The save_pretrained name(s) of our V4 tensor `ours` (one per expert for stacked experts)."""
    if ours in V4_GLOBAL:
        return [V4_GLOBAL[ours]]
    parts = ours.split(".", 2)
    if parts[0] not in ("layers", "mtp") or len(parts) < 3:
        raise KeyError(f"no Hugging Face name for parameter {ours!r}")
    suffix = parts[2]
    # The MTP module (dsmoe.model.mtp_v4) keeps the original layout `mtp.{k}.`: transformers has no name for it.
    prefix = f"mtp.{parts[1]}" if parts[0] == "mtp" else f"model.layers.{parts[1]}"
    if parts[0] == "mtp" and suffix.startswith("hc_head."):
        return [f"{prefix}.{suffix.replace('.', '_', 1)}"]  # hc_head.fn -> hc_head_fn
    for hc in ("hc_attn", "hc_ffn"):
        if suffix.startswith(hc + "."):
            suffix = suffix.replace(".", "_", 1)  # hc_attn.fn -> hc_attn_fn
    if suffix in ("ffn.experts.w1", "ffn.experts.w2", "ffn.experts.w3"):
        w = suffix.rsplit(".", 1)[1]
        return [f"{prefix}.ffn.experts.{e}.{w}.weight" for e in range(config.n_routed_experts)]
    return [f"{prefix}.{suffix}"]


def v4_alternatives(name: str) -> list[str]:
    """Other spellings of a save_pretrained V4 name that checkpoints use: the original DeepSeek layout has no
    `model.` prefix and flat hc_head names."""
    if name in V4_ORIGINAL_GLOBAL:
        return [V4_ORIGINAL_GLOBAL[name]]
    return [name.removeprefix("model.")] if name.startswith("model.layers.") else []

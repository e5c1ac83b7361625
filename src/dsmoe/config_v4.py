"""DeepSeek-V4's part of ModelConfig: defaults that depend on other fields, validation, legacy config.json keys
and its two-rope `rope_parameters`.

transformers' DeepseekV4Config is the reference for every rule here:

* `layer_types` (per layer: sliding_attention | compressed_sparse_attention | heavily_compressed_attention);
  absent, it is the V4-Pro schedule (2 x HCA, then CSA / HCA alternating), or the legacy per-layer
  `compress_ratios` (0 / 4 / 128) when the file has those.
* `mlp_layer_types` (hash_moe | moe); absent, the first `num_hash_layers` (legacy key, default 3) are hash_moe.
* `compress_rates` {layer type: m}; default CSA 4, HCA 128 (legacy `compress_rate_csa` / `compress_rate_hca`).
* `partial_rotary_factor`: the rotated fraction of head_dim; legacy `qk_rope_head_dim / head_dim`, else 64/512.
* rope: the sliding layers use `rope_theta` with plain RoPE ("main"); the compressed layers and their
  compressors use `compress_rope_theta` with the file's YaRN settings ("compress"), whose cos/sin amplitude
  is 1 (`attention_factor` 1.0: the reference code does not scale them). Our `rope_scaling` holds the
  compress branch's YaRN settings; `rope_theta` the main branch's base.
"""

from __future__ import annotations

from typing import Any, Callable

LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
MLP_LAYER_TYPES = ("hash_moe", "moe")
DEFAULT_COMPRESS_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
_RATIO_TO_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
DEFAULT_NUM_HASH_LAYERS = 3
DEFAULT_PARTIAL_ROTARY_FACTOR = 64 / 512
LEGACY_KEYS = ("compress_ratios", "compress_rate_csa", "compress_rate_hca", "num_hash_layers", "qk_rope_head_dim",
               "expert_dtype")


def default_layer_types(n: int) -> list[str]:
    """V4-Pro's schedule (transformers' default): two HCA layers, then CSA and HCA alternating."""
    rest = ["compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(max(n - 2, 0))]
    return ["heavily_compressed_attention"] * min(n, 2) + rest


def fill_v4_defaults(config: Any) -> None:
    """Fill the V4 fields left None (layer schedules, compress rates, partial rotary factor, swiglu limit)."""
    n = config.num_hidden_layers
    if config.compress_rates is None:
        config.compress_rates = dict(DEFAULT_COMPRESS_RATES)
    if config.layer_types is None:
        config.layer_types = default_layer_types(n)
    if config.mlp_layer_types is None:
        k = min(n, DEFAULT_NUM_HASH_LAYERS)
        config.mlp_layer_types = ["hash_moe"] * k + ["moe"] * (n - k)
    if config.partial_rotary_factor is None:
        config.partial_rotary_factor = DEFAULT_PARTIAL_ROTARY_FACTOR
    if config.swiglu_limit is None:
        config.swiglu_limit = 10.0
    config.topk_method = "noaux_tc"  # V4's top-k router: V3's bias-corrected selection, one group
    if config.rope_scaling is not None and config.rope_scaling.get("rope_type") == "yarn":
        config.rope_scaling.setdefault("attention_factor", 1.0)  # the reference leaves cos/sin unscaled
    if config.sliding_window is None:
        config.sliding_window = 128
    if config.head_dim is None:
        config.head_dim = 512
    if config.num_key_value_heads is None:
        config.num_key_value_heads = 1


def v4_rope_dim(config: Any) -> int:
    """Rotated width of each V4 head (transformers: int(head_dim * partial_rotary_factor))."""
    return int(config.head_dim * config.partial_rotary_factor)


def validate_v4(config: Any, fail: Callable[[str, str], None]) -> None:
    """Every invalid V4 combination, as fail(field, message)."""
    n = config.num_hidden_layers
    for name, types, allowed in (("layer_types", config.layer_types, LAYER_TYPES),
                                 ("mlp_layer_types", config.mlp_layer_types, MLP_LAYER_TYPES)):
        if len(types) != n:
            fail(name, f"has {len(types)} entries, num_hidden_layers is {n}")
        bad = [t for t in types if t not in allowed]
        if bad:
            fail(name, f"entries must be one of {', '.join(allowed)}; got {bad}")
    for t in ("compressed_sparse_attention", "heavily_compressed_attention"):
        if t in config.layer_types and t not in config.compress_rates:
            fail("compress_rates", f"has no rate for {t}, which layer_types uses")
    if config.num_key_value_heads != 1:
        fail("num_key_value_heads", f"DeepSeek-V4 attention has one shared key/value head, got {config.num_key_value_heads}")
    if config.q_lora_rank is None:
        fail("q_lora_rank", "DeepSeek-V4 needs a query latent (wq_a / wq_b; the indexer reads it too)")
    rope = v4_rope_dim(config)
    if rope % 2 or rope <= 0 or rope > config.head_dim:
        fail("partial_rotary_factor", f"head_dim * partial_rotary_factor = {rope} must be even, > 0 and <= head_dim")
    if rope > config.index_head_dim:
        fail("index_head_dim", f"{config.index_head_dim} is narrower than the rotated width {rope}")
    heads = config.num_attention_heads * config.head_dim
    if heads % config.o_groups:
        fail("o_groups", f"{config.o_groups} does not divide num_attention_heads * head_dim = {heads}")
    if config.is_moe:
        if not config.norm_topk_prob:
            fail("norm_topk_prob", "DeepSeek-V4's routers always renormalise the picked weights (transformers)")
        if config.n_shared_experts != 1:
            fail("n_shared_experts", f"DeepSeek-V4 has one shared expert of moe_intermediate_size, got "
                 f"{config.n_shared_experts}")
        if config.scoring_func not in ("softmax", "sigmoid", "sqrtsoftplus"):
            fail("scoring_func", f"got {config.scoring_func!r}")
    elif "hash_moe" in config.mlp_layer_types:
        fail("mlp_layer_types", "hash_moe layers need routed experts (n_routed_experts > 0)")


def fold_legacy(raw: dict[str, Any]) -> dict[str, Any]:
    """A V4 config.json with its legacy keys folded into the modern ones, as transformers' __post_init__ does
    (the original dict is untouched). Legacy `compress_ratios` values other than 0 / 4 / 128 are refused."""
    raw = dict(raw)
    n = raw.get("num_hidden_layers", 2)
    ratios = raw.pop("compress_ratios", None)
    csa, hca = raw.pop("compress_rate_csa", None), raw.pop("compress_rate_hca", None)
    n_hash = raw.pop("num_hash_layers", None)
    qk_rope = raw.pop("qk_rope_head_dim", None)
    expert_dtype = raw.pop("expert_dtype", None)
    if csa is not None or hca is not None:
        rates = dict(raw.get("compress_rates") or DEFAULT_COMPRESS_RATES)
        if csa is not None:
            rates["compressed_sparse_attention"] = csa
        if hca is not None:
            rates["heavily_compressed_attention"] = hca
        raw["compress_rates"] = rates
    if raw.get("layer_types") is None and ratios is not None:
        if not isinstance(ratios, list) or any(r not in _RATIO_TO_TYPE for r in ratios):
            raise ValueError(f"ModelConfig.compress_ratios: must be a list of 0, 4 or 128, got {ratios!r}")
        raw["layer_types"] = [_RATIO_TO_TYPE[r] for r in ratios]
    if isinstance(raw.get("layer_types"), list) and isinstance(n, int):
        raw["layer_types"] = raw["layer_types"][:n]  # transformers truncates (the Hub lists one per layer + MTP)
    if raw.get("mlp_layer_types") is None and n_hash is not None:
        k = min(n, n_hash)
        raw["mlp_layer_types"] = ["hash_moe"] * k + ["moe"] * (n - k)
    if raw.get("partial_rotary_factor") is None and qk_rope is not None:
        head_dim = raw.get("head_dim") or 512
        raw["partial_rotary_factor"] = qk_rope / head_dim
    quant = raw.get("quantization_config")
    if isinstance(quant, dict) and expert_dtype is not None and "expert_dtype" not in quant:
        raw["quantization_config"] = {**quant, "expert_dtype": expert_dtype}
    return raw


def rope_from_hf(raw: dict[str, Any]) -> dict[str, Any] | None:
    """A V4 file's nested `rope_parameters` {"main": ..., "compress": ...} -> the flat Hub keys (rope_theta,
    compress_rope_theta, rope_scaling of the compress branch), or None when the file is not nested."""
    params = raw.get("rope_parameters")
    if not (isinstance(params, dict) and isinstance(params.get("main"), dict)
            and isinstance(params.get("compress"), dict)):
        return None
    main, comp = params["main"], params["compress"]
    out = {"rope_theta": main.get("rope_theta", raw.get("rope_theta", 10000.0)),
           "compress_rope_theta": comp.get("rope_theta", raw.get("compress_rope_theta", 160000.0))}
    if raw.get("partial_rotary_factor") is None and "partial_rotary_factor" in main:
        out["partial_rotary_factor"] = main["partial_rotary_factor"]
    scaling = {k: v for k, v in comp.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    out["rope_scaling"] = scaling
    return out


def rope_to_hf(config: Any) -> dict[str, Any]:
    """transformers v5's nested `rope_parameters` for a V4 config."""
    main = {"rope_type": "default", "rope_theta": config.rope_theta,
            "partial_rotary_factor": config.partial_rotary_factor}
    comp = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.compress_rope_theta,
            "partial_rotary_factor": config.partial_rotary_factor}
    if comp["rope_type"] == "yarn":
        comp.setdefault("attention_factor", 1.0)
    return {"main": main, "compress": comp}

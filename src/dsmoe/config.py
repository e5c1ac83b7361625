"""ModelConfig: one typed, validated description of every supported architecture.

Field names are the Hugging Face config.json names, so reading and writing config.json is a table
(`_HF_ALIASES`) plus the rope parameters, which come in two styles:

* the Hub's original files: ``rope_theta`` + ``rope_scaling = {"type": "yarn", "factor": ...}``
* transformers v5: ``rope_parameters = {"rope_type": "yarn", "rope_theta": ..., "factor": ...}``

Variants are explicit switches (``model_type`` picks the attention kind and rope layout,
``scoring_func`` / ``topk_method`` pick the router), never name sniffing.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPES = ("deepseek", "deepseek_v2", "deepseek_v3", "deepseek_v32", "mixtral")
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
DSA_MODEL_TYPES = ("deepseek_v32",)  # MLA + DeepSeek Sparse Attention (lightning indexer, top-k keys)
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
ROPE_TYPES = ("default", "yarn")
HIDDEN_ACTS = ("silu",)

# Family defaults that config.json files routinely leave out (they live in the model code upstream).
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek": {"scoring_func": "softmax", "topk_method": "greedy", "first_k_dense_replace": 1},
    "deepseek_v2": {"scoring_func": "softmax", "topk_method": "greedy"},
    "deepseek_v3": {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True},
    "deepseek_v32": {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True},
    "mixtral": {
        "scoring_func": "softmax",
        "topk_method": "greedy",
        "norm_topk_prob": True,  # softmax over the top-k logits == softmax, pick, renormalise
        "n_shared_experts": 0,
        "first_k_dense_replace": 0,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
    },
}

# HF key -> our field, for names that differ between families.
_HF_ALIASES = {
    "num_local_experts": "n_routed_experts",  # Mixtral
    "num_mtp_layers": "num_nextn_predict_layers",  # transformers' alias
}

_ARCHITECTURES = {
    "deepseek": "DeepseekForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v32": "DeepseekV32ForCausalLM",
    "mixtral": "MixtralForCausalLM",
}


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 512  # dense MLP width (Mixtral: each expert's width)
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # GQA only; None = num_attention_heads
    head_dim: int | None = None  # GQA only; None = hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # normalised: {"rope_type": "yarn", "factor": ...}
    rope_interleave: bool = True  # V2/V3: rope dims are adjacent pairs (official layout)
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # --- MoE ---
    n_routed_experts: int | None = 8  # None = dense model
    num_experts_per_tok: int = 2
    n_shared_experts: int = 0
    moe_intermediate_size: int = 128
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    # --- MLA (V2/V3) ---
    q_lora_rank: int | None = None
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # --- DSA (V3.2): the lightning indexer and its top-k (transformers' DeepseekV32Config defaults) ---
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    # --- balancing / MTP (used by training) ---
    aux_loss_alpha: float = 0.0
    seq_aux: bool = False
    router_aux_loss_coef: float = 0.0
    num_nextn_predict_layers: int = 0
    # --- tokens ---
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # Keys of the source config.json we do not model, kept so that to_hf() round-trips them.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        if not self.uses_mla and self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads  # config.json must carry a number
        if self.topk_method != "greedy":
            # null group settings mean one group holding every expert
            self.n_group = 1 if self.n_group is None else self.n_group
            self.topk_group = 1 if self.topk_group is None else self.topk_group
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def uses_mla(self) -> bool:
        return self.model_type in MLA_MODEL_TYPES

    @property
    def uses_dsa(self) -> bool:
        """DeepSeek Sparse Attention: MLA whose queries attend only to the indexer's top-k keys (V3.2)."""
        return self.model_type in DSA_MODEL_TYPES

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def gqa_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        """Width of the rotated part of each query/key head."""
        return self.qk_rope_head_dim if self.uses_mla else self.gqa_head_dim

    @property
    def rope_interleaved(self) -> bool:
        """Adjacent-pair rotation (DeepSeek's official layout) vs Llama's rotate-half."""
        return self.uses_mla and (self.model_type == "deepseek_v2" or self.rope_interleave)

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim**-0.5, times mscale**2 under YaRN (DeepSeek-V2 appendix on YaRN)."""
        scale = (self.qk_head_dim if self.uses_mla else self.gqa_head_dim) ** -0.5
        rs = self.rope_scaling
        if self.uses_mla and rs and rs["rope_type"] == "yarn" and rs.get("mscale_all_dim"):
            m = yarn_mscale(self.yarn_factor, rs["mscale_all_dim"])
            scale *= m * m
        return scale

    @property
    def yarn_factor(self) -> float:
        rs = self.rope_scaling or {}
        if rs.get("factor") is not None:
            return float(rs["factor"])
        return self.max_position_embeddings / rs["original_max_position_embeddings"]

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts is not None and self.n_routed_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Official rule: MoE from `first_k_dense_replace` on, every `moe_layer_freq` layers."""
        return self.is_moe and layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def group_limited(self) -> bool:
        """Whether routing picks experts only inside the topk_group best of n_group groups (V2's
        device-limited, V3's node-limited routing); greedy routing, or one group, is plain top-k."""
        return self.topk_method != "greedy" and (self.n_group or 1) > 1

    @property
    def renormalise_topk(self) -> bool:
        """Whether the k picked gate weights are rescaled to sum to 1.

        DeepSeekMoE/V2's reference code renormalises only when top_k > 1 (a single pick keeps its softmax
        score); V3 and Mixtral renormalise whatever k is (Mixtral's top-1 weight is 1)."""
        if not self.norm_topk_prob:
            return False
        return self.num_experts_per_tok > 1 or self.model_type in ("deepseek_v3", "mixtral")

    @property
    def shared_intermediate_size(self) -> int:
        return self.n_shared_experts * self.moe_intermediate_size

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def fail(name: str, msg: str) -> None:
            raise ValueError(f"ModelConfig.{name}: {msg}")

        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, f"must be a positive integer, got {value!r}")

        def one_of(name: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, name) not in allowed:
                fail(name, f"must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

        def boolean(name: str) -> None:
            if not isinstance(getattr(self, name), bool):  # "false" from a hand-edited config.json is truthy
                fail(name, f"must be true or false, got {getattr(self, name)!r}")

        def number(name: str, integer: bool = False) -> None:
            """A type check before any comparison: null or a string would otherwise raise a bare TypeError."""
            value = getattr(self, name)
            if not isinstance(value, int if integer else (int, float)) or isinstance(value, bool):
                fail(name, f"must be {'an integer' if integer else 'a number'}, got {value!r}")

        one_of("model_type", MODEL_TYPES)
        one_of("scoring_func", SCORING_FUNCS)
        one_of("topk_method", TOPK_METHODS)
        one_of("hidden_act", HIDDEN_ACTS)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings", "moe_layer_freq"):
            positive(name)
        for name in ("rope_interleave", "attention_bias", "tie_word_embeddings", "norm_topk_prob", "seq_aux"):
            boolean(name)
        for name in ("rms_norm_eps", "rope_theta"):
            number(name)
        for name in ("first_k_dense_replace", "num_nextn_predict_layers"):
            number(name, integer=True)
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            fail("rope_theta", f"must be > 0, got {self.rope_theta}")
        if self.first_k_dense_replace < 0:
            fail("first_k_dense_replace", f"must be >= 0, got {self.first_k_dense_replace}")
        if self.num_nextn_predict_layers < 0:
            fail("num_nextn_predict_layers", f"must be >= 0, got {self.num_nextn_predict_layers}")

        if self.uses_mla:
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                positive(name)
            if self.q_lora_rank is not None:
                positive("q_lora_rank")
            if self.qk_rope_head_dim % 2:
                fail("qk_rope_head_dim", f"must be even (rope rotates pairs), got {self.qk_rope_head_dim}")
        else:
            if self.num_key_value_heads is not None:
                positive("num_key_value_heads")
                if self.num_attention_heads % self.num_key_value_heads:
                    fail("num_key_value_heads", f"{self.num_key_value_heads} does not divide "
                         f"num_attention_heads={self.num_attention_heads}")
            if self.head_dim is not None:
                positive("head_dim")
            elif self.hidden_size % self.num_attention_heads:
                fail("num_attention_heads", f"{self.num_attention_heads} does not divide "
                     f"hidden_size={self.hidden_size} (or set head_dim)")
            if self.gqa_head_dim % 2:
                fail("head_dim", f"must be even (rope rotates pairs), got {self.gqa_head_dim}")

        if self.uses_dsa:
            self._validate_dsa(fail, positive)
        if self.model_type == "mixtral" and self.attention_bias:
            fail("attention_bias", "Mixtral's attention projections have no biases (transformers would drop them)")
        window = self.extra.get("sliding_window")
        if window is not None and (not isinstance(window, int) or window < self.max_position_embeddings):
            fail("sliding_window", f"sliding-window attention is not implemented: only null or a window of at "
                 f"least max_position_embeddings={self.max_position_embeddings}, got {window!r}")

        if self.is_moe:
            self._validate_moe(fail, positive, number)
        elif self.n_routed_experts is not None and self.n_routed_experts < 0:
            fail("n_routed_experts", f"must be positive or null, got {self.n_routed_experts}")

        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if rs["rope_type"] not in ROPE_TYPES:
                fail("rope_scaling", f"rope_type must be one of {', '.join(ROPE_TYPES)}; got {rs['rope_type']!r}")
            if rs["rope_type"] == "yarn":
                if not rs.get("original_max_position_embeddings"):
                    fail("rope_scaling", "yarn needs original_max_position_embeddings")
                if rs.get("factor") is not None and rs["factor"] <= 0:
                    fail("rope_scaling", f"factor must be > 0, got {rs['factor']}")

    # ---- DSA (V3.2) fields: one block, the shared helpers ----
    def _validate_dsa(self, fail, positive) -> None:
        for name in ("index_n_heads", "index_head_dim", "index_topk"):
            positive(name)
        if self.q_lora_rank is None:
            fail("q_lora_rank", "deepseek_v32 needs a query latent: the indexer's wq_b reads it")
        if self.index_head_dim < self.qk_rope_head_dim:
            fail("index_head_dim", f"{self.index_head_dim} is narrower than its rope part "
                 f"qk_rope_head_dim={self.qk_rope_head_dim}")
        if not self.rope_interleave:
            fail("rope_interleave", "deepseek_v32's MLA rope is always interleaved (the checkpoint's layout)")
        # transformers writes these per-layer lists; ours follow from first_k_dense_replace (from_hf drops them).
        for key, rule in (("mlp_layer_types", ["sparse" if self.is_moe_layer(i) else "dense"
                                               for i in range(self.num_hidden_layers)]),
                          ("layer_types", ["indexed_attention"] * self.num_hidden_layers)):
            if self.extra.get(key) is not None and self.extra[key] != rule:
                fail(key, f"{self.extra[key]!r} differs from what this config builds ({rule!r})")

    def _validate_moe(self, fail, positive, number) -> None:
        for name in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"):
            positive(name)
        number("n_shared_experts", integer=True)
        number("routed_scaling_factor")
        if self.n_shared_experts < 0:
            fail("n_shared_experts", f"must be >= 0, got {self.n_shared_experts}")
        if self.num_experts_per_tok > self.n_routed_experts:
            fail("num_experts_per_tok", f"{self.num_experts_per_tok} is larger than "
                 f"n_routed_experts={self.n_routed_experts}")
        if self.routed_scaling_factor <= 0:
            fail("routed_scaling_factor", f"must be > 0, got {self.routed_scaling_factor}")
        if self.topk_method == "noaux_tc" and self.scoring_func != "sigmoid":
            fail("topk_method", "noaux_tc (V3 bias-corrected selection) needs scoring_func='sigmoid'")
        if self.topk_method in ("group_limited_greedy", "noaux_tc"):
            n_group = self.n_group if self.n_group is not None else 1
            topk_group = self.topk_group if self.topk_group is not None else 1
            if n_group <= 0:
                fail("n_group", f"must be a positive integer, got {n_group}")
            if topk_group <= 0:
                fail("topk_group", f"must be a positive integer, got {topk_group}")
            if self.n_routed_experts % n_group:
                fail("n_group", f"{n_group} groups do not divide n_routed_experts={self.n_routed_experts}")
            if topk_group > n_group:
                fail("topk_group", f"{topk_group} is larger than n_group={n_group}")
            per_group = self.n_routed_experts // n_group
            if topk_group * per_group < self.num_experts_per_tok:
                fail("topk_group", f"{topk_group} groups of {per_group} experts cannot hold "
                     f"num_experts_per_tok={self.num_experts_per_tok}")
            if self.topk_method == "noaux_tc" and per_group < 2 and n_group > 1:
                fail("n_group", "noaux_tc scores a group by its top-2 experts: each group needs >= 2 experts")

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> "ModelConfig":
        """Build from a config.json dict, its path, or the checkpoint directory holding it."""
        if isinstance(source, dict):
            raw = dict(source)
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"no config.json at {path}")
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from None
            if not isinstance(raw, dict):
                raise ValueError(f"{path}: config.json must hold a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"ModelConfig.model_type: must be one of {', '.join(MODEL_TYPES)}; "
                             f"got {model_type!r}")
        values: dict[str, Any] = dict(_FAMILY_DEFAULTS[model_type])
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra: dict[str, Any] = {}
        for key, value in raw.items():
            key = _HF_ALIASES.get(key, key)
            if key in ("rope_parameters", "rope_scaling", "rope_theta"):
                continue
            if key in known:
                values[key] = value
            else:
                extra[key] = value
        values.update(_rope_from_hf(raw, default_theta=values.get("rope_theta", 10000.0)))
        if model_type in MLA_MODEL_TYPES:
            # transformers writes head_dim = qk_rope_head_dim for MLA models; it is not a GQA head size.
            values.pop("head_dim", None)
            values.pop("num_key_value_heads", None)
        if model_type == "mixtral":
            values["moe_intermediate_size"] = values.get("intermediate_size", cls.intermediate_size)
        for drop in ("architectures", "transformers_version", "dtype", "torch_dtype", "auto_map"):
            extra.pop(drop, None)
        config = cls(**values, extra=extra)
        if config.uses_dsa:  # checked against first_k_dense_replace by validate(); transformers re-derives them
            for key in ("mlp_layer_types", "layer_types"):
                config.extra.pop(key, None)
        return config

    def to_hf(self, style: str = "v5") -> dict[str, Any]:
        """A config.json dict. style="v5": `rope_parameters` (transformers >= 5); "hub": `rope_theta` +
        `rope_scaling`, as the published checkpoints write it."""
        if style not in ("v5", "hub"):
            raise ValueError(f"to_hf(style=...): must be 'v5' or 'hub', got {style!r}")
        out: dict[str, Any] = {"architectures": [_ARCHITECTURES[self.model_type]]}
        out.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "rope_theta", "rope_scaling", "rope_interleave"):
                continue
            out[f.name] = getattr(self, f.name)
        if self.model_type == "mixtral":
            out["num_local_experts"] = out.pop("n_routed_experts")
            out["intermediate_size"] = self.moe_intermediate_size
            for key in ("n_shared_experts", "moe_intermediate_size", "first_k_dense_replace", "moe_layer_freq",
                        "scoring_func", "topk_method", "n_group", "topk_group", "norm_topk_prob",
                        "routed_scaling_factor", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                        "qk_rope_head_dim", "v_head_dim", "aux_loss_alpha", "seq_aux", "num_nextn_predict_layers"):
                out.pop(key)
        if self.uses_mla:
            out.pop("head_dim")
            out["num_key_value_heads"] = self.num_attention_heads
            if self.model_type == "deepseek_v3":
                out["rope_interleave"] = self.rope_interleave
        if not self.uses_dsa:
            for key in ("index_n_heads", "index_head_dim", "index_topk"):
                out.pop(key)
        if self.model_type != "mixtral":
            out.pop("router_aux_loss_coef")
        if style == "v5":
            params = {"rope_type": "default", "rope_theta": self.rope_theta}
            if self.rope_scaling is not None:
                params.update(self.rope_scaling)
            out["rope_parameters"] = params
        else:
            out["rope_theta"] = self.rope_theta
            out["rope_scaling"] = None if self.rope_scaling is None else {
                ("type" if k == "rope_type" else k): v for k, v in self.rope_scaling.items()}
        return out

    def save(self, directory: str | Path, style: str = "v5") -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_hf(style), indent=2) + "\n")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _normalise_rope_scaling(rs: dict[str, Any]) -> dict[str, Any] | None:
    rs = dict(rs)
    rope_type = rs.pop("rope_type", None) or rs.pop("type", None) or "default"
    rs.pop("type", None)
    rs.pop("rope_theta", None)
    if rope_type == "default" and not rs:
        return None
    return {"rope_type": rope_type, **rs}


def _rope_from_hf(raw: dict[str, Any], default_theta: float) -> dict[str, Any]:
    """Both styles -> {rope_theta, rope_scaling}. A v5 `rope_parameters` wins over the Hub keys."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", raw.get("rope_theta", default_theta))
        return {"rope_theta": _theta(theta), "rope_scaling": _normalise_rope_scaling(params)}
    theta = raw.get("rope_theta", default_theta)
    scaling = raw.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ValueError(f"ModelConfig.rope_scaling: must be an object or null, got {scaling!r}")
    return {"rope_theta": _theta(theta), "rope_scaling": _normalise_rope_scaling(scaling) if scaling else None}


def _theta(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"ModelConfig.rope_theta: must be a number, got {value!r}")
    return float(value)

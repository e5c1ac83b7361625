"""ModelConfig: one typed, validated description of every supported architecture.

Field names are the Hugging Face config.json names. Each field is declared once, with `_f(default, kind,
families)`: its default, the kind of value it takes (checked in one place, `check_types`, with a ValueError
naming the field, nested keys included), and the model types whose config.json carries it (config.json files
of other model types may not give it a value that matters). Adding a field is that one line.

Reading and writing config.json (config_json.py) is driven by the same declarations, plus the rope parameters,
which come in two styles:

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

from .config_types import (BLOCK_SIZE, BOOL, NON_NEGATIVE_INT, NON_NEGATIVE_NUMBER, NUMBER, POSITIVE_INT,
                           POSITIVE_NUMBER, STRING, TOKEN_IDS, Kind, check, one_of, optional, schema)

STRING_LIST = Kind("a list of strings", lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v))
COMPRESS_RATES = Kind("an object of layer type -> positive integer", lambda v: isinstance(v, dict) and all(
    isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in v.values()))

MODEL_TYPES = ("deepseek", "deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4", "mixtral")
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
DSA_MODEL_TYPES = ("deepseek_v32",)  # MLA + DeepSeek Sparse Attention (lightning indexer, top-k keys)
SCORING_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
ROPE_TYPES = ("default", "yarn")
HIDDEN_ACTS = ("silu",)

# Which model types' config.json carries a field (None on a field: all of them).
V4 = ("deepseek_v4",)  # hyper-connections, compressed sparse attention, hash-routed MoE (see config_v4.py)
DEEPSEEK = tuple(t for t in MODEL_TYPES if t not in ("mixtral", "deepseek_v4"))  # V4's file is its own shape
V2_ON = MLA_MODEL_TYPES  # group-limited routing, scaling factor and MLA arrived with DeepSeek-V2
V3_ON = tuple(t for t in MLA_MODEL_TYPES if t != "deepseek_v2")  # rope_interleave, MTP: V3 and later
MIXTRAL = ("mixtral",)

# Family defaults that config.json files routinely leave out (they live in the model code upstream). A
# field another model type carries is accepted in these files only at this value (or null, or its `off`).
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek": {"scoring_func": "softmax", "topk_method": "greedy", "first_k_dense_replace": 1},
    "deepseek_v2": {"scoring_func": "softmax", "topk_method": "greedy", "rope_interleave": True},
    "deepseek_v3": {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True},
    "deepseek_v32": {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True},
    # V4 files also carry topk_method "noaux_tc" (V3's bias-corrected top-k, which its router does)
    "deepseek_v4": {"scoring_func": "sqrtsoftplus", "norm_topk_prob": True, "num_key_value_heads": 1,
                    "topk_method": "noaux_tc"},
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

# Our field -> its config.json key, for model types that name it differently.
_HF_NAMES: dict[str, dict[str, str]] = {"mixtral": {"n_routed_experts": "num_local_experts"}}
# Other spellings accepted on reading (never written).
_HF_ALIASES = {"num_mtp_layers": "num_nextn_predict_layers"}  # transformers' alias

# The class in config.json's `architectures` for each model type. A config.json whose model_type is not one
# of ours (Kimi-K2's "kimi_k2") loads as the model type whose class its `architectures` names.
_ARCHITECTURES = {
    "deepseek": "DeepseekForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v32": "DeepseekV32ForCausalLM",
    "deepseek_v4": "DeepseekV4ForCausalLM",
    "mixtral": "MixtralForCausalLM",
}

_NO_OFF = object()

ROPE_SCALING = optional(schema("an object", {
    "rope_type": one_of(*ROPE_TYPES), "factor": optional(POSITIVE_NUMBER),
    "original_max_position_embeddings": POSITIVE_INT, "mscale": optional(NUMBER),
    "mscale_all_dim": optional(NUMBER), "beta_fast": optional(POSITIVE_NUMBER),
    "beta_slow": optional(POSITIVE_NUMBER), "attention_factor": optional(POSITIVE_NUMBER),
    "truncate": optional(BOOL), "rope_theta": POSITIVE_NUMBER}, aliases={"type": "rope_type"}))
QUANTIZATION_CONFIG = optional(schema("an object", {
    "quant_method": STRING, "fmt": STRING, "activation_scheme": STRING, "weight_block_size": BLOCK_SIZE,
    "expert_dtype": STRING}))


def _f(default: Any, kind: Kind, families: tuple[str, ...] | None = None, off: Any = _NO_OFF) -> Any:
    """A ModelConfig field: default, kind (checked by check_types), the model types whose config.json carries
    it (None: all), and `off`, the value meaning "feature absent" that any model type's file may carry."""
    return field(default=default, metadata={"kind": kind, "families": families, "off": off})


def inert_value(name: str, value: Any, model_type: str, spec: dict[str, Any]) -> bool:
    """Whether a field that `model_type` does not carry holds a value that changes nothing for it: null, the
    field's `off` value, or the value this model type fixes anyway (_FAMILY_DEFAULTS)."""
    def same(a: Any, b: Any) -> bool:
        return b is not _NO_OFF and a == b and isinstance(a, bool) == isinstance(b, bool)  # true is not 1

    return value is None or same(value, spec["off"]) or same(value, _FAMILY_DEFAULTS[model_type].get(name, _NO_OFF))


@dataclass
class ModelConfig:
    model_type: str = _f("deepseek_v3", one_of(*MODEL_TYPES))
    vocab_size: int = _f(32000, POSITIVE_INT)
    hidden_size: int = _f(256, POSITIVE_INT)
    intermediate_size: int = _f(512, POSITIVE_INT)  # dense MLP width (Mixtral: each expert's width)
    num_hidden_layers: int = _f(2, POSITIVE_INT)
    num_attention_heads: int = _f(4, POSITIVE_INT)
    num_key_value_heads: int | None = _f(None, optional(POSITIVE_INT))  # GQA only; None = num_attention_heads
    head_dim: int | None = _f(None, optional(POSITIVE_INT))  # GQA only; None = hidden_size // num_attention_heads
    max_position_embeddings: int = _f(4096, POSITIVE_INT)
    rms_norm_eps: float = _f(1e-6, POSITIVE_NUMBER)
    rope_theta: float = _f(10000.0, POSITIVE_NUMBER)
    rope_scaling: dict[str, Any] | None = _f(None, ROPE_SCALING)  # normalised: {"rope_type": "yarn", ...}
    rope_interleave: bool = _f(True, BOOL, V3_ON)  # V2/V3: rope dims are adjacent pairs (official layout)
    hidden_act: str = _f("silu", one_of(*HIDDEN_ACTS))
    attention_bias: bool = _f(False, BOOL, DEEPSEEK, off=False)
    tie_word_embeddings: bool = _f(False, BOOL)
    initializer_range: float = _f(0.02, NON_NEGATIVE_NUMBER)
    # Mixtral (transformers' MistralConfig lineage): each query sees the last `sliding_window` keys; None = all.
    sliding_window: int | None = _f(None, optional(POSITIVE_INT), (*MIXTRAL, *V4), off=None)
    # --- MoE ---
    n_routed_experts: int | None = _f(8, optional(NON_NEGATIVE_INT))  # None or 0 = dense model
    num_experts_per_tok: int | None = _f(2, optional(POSITIVE_INT))
    n_shared_experts: int = _f(0, NON_NEGATIVE_INT, (*DEEPSEEK, *V4), off=0)
    moe_intermediate_size: int | None = _f(128, optional(POSITIVE_INT))  # Mixtral: = intermediate_size
    first_k_dense_replace: int = _f(0, NON_NEGATIVE_INT, DEEPSEEK, off=0)
    moe_layer_freq: int = _f(1, POSITIVE_INT, DEEPSEEK, off=1)
    scoring_func: str = _f("softmax", one_of(*SCORING_FUNCS), (*DEEPSEEK, *V4))
    topk_method: str = _f("greedy", one_of(*TOPK_METHODS), V2_ON)
    n_group: int | None = _f(None, optional(POSITIVE_INT), V2_ON, off=1)
    topk_group: int | None = _f(None, optional(POSITIVE_INT), V2_ON, off=1)
    norm_topk_prob: bool = _f(False, BOOL, (*DEEPSEEK, *V4))
    routed_scaling_factor: float = _f(1.0, POSITIVE_NUMBER, (*V2_ON, *V4), off=1.0)
    # --- MLA (V2/V3) ---
    q_lora_rank: int | None = _f(None, optional(POSITIVE_INT), (*V2_ON, *V4))
    kv_lora_rank: int = _f(64, POSITIVE_INT, V2_ON)
    qk_nope_head_dim: int = _f(32, POSITIVE_INT, V2_ON)
    qk_rope_head_dim: int = _f(16, POSITIVE_INT, V2_ON)
    v_head_dim: int = _f(32, POSITIVE_INT, V2_ON)
    # --- DSA (V3.2): the lightning indexer and its top-k (transformers' DeepseekV32Config defaults) ---
    index_n_heads: int = _f(64, POSITIVE_INT, (*DSA_MODEL_TYPES, *V4))
    index_head_dim: int = _f(128, POSITIVE_INT, (*DSA_MODEL_TYPES, *V4))
    index_topk: int = _f(2048, POSITIVE_INT, (*DSA_MODEL_TYPES, *V4))
    # --- DeepSeek-V4 (transformers' DeepseekV4Config; checked in config_v4.py) ---
    hc_mult: int = _f(4, POSITIVE_INT, V4)  # residual streams of the hyper-connections
    hc_sinkhorn_iters: int = _f(20, POSITIVE_INT, V4)
    hc_eps: float = _f(1e-6, POSITIVE_NUMBER, V4)
    layer_types: list[str] | None = _f(None, optional(STRING_LIST), V4, off=None)  # filled for V4
    compress_rates: dict[str, int] | None = _f(None, optional(COMPRESS_RATES), V4, off=None)  # filled for V4
    compress_rope_theta: float = _f(160000.0, POSITIVE_NUMBER, V4)
    o_groups: int = _f(8, POSITIVE_INT, V4)
    o_lora_rank: int = _f(1024, POSITIVE_INT, V4)
    mlp_layer_types: list[str] | None = _f(None, optional(STRING_LIST), V4, off=None)  # filled for V4
    swiglu_limit: float | None = _f(None, optional(POSITIVE_NUMBER), V4, off=None)
    partial_rotary_factor: float | None = _f(None, optional(POSITIVE_NUMBER), V4, off=None)  # filled for V4
    # --- balancing / MTP (used by training) ---
    aux_loss_alpha: float = _f(0.0, NON_NEGATIVE_NUMBER, DEEPSEEK, off=0.0)
    seq_aux: bool = _f(False, BOOL, DEEPSEEK, off=False)
    router_aux_loss_coef: float = _f(0.0, NON_NEGATIVE_NUMBER, (*MIXTRAL, *V4), off=0.0)
    num_nextn_predict_layers: int = _f(0, NON_NEGATIVE_INT, (*V3_ON, *V4), off=0)
    # --- tokens ---
    bos_token_id: int | None = _f(None, optional(TOKEN_IDS))
    eos_token_id: int | list[int] | None = _f(None, optional(TOKEN_IDS))
    pad_token_id: int | None = _f(None, optional(TOKEN_IDS))
    # FP8 checkpoints (DeepSeek-V3): {"quant_method": "fp8", "weight_block_size": [128, 128], ...}
    quantization_config: dict[str, Any] | None = _f(None, QUANTIZATION_CONFIG)
    # Keys of the source config.json we do not model, kept so that to_hf() round-trips them.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The config.json this was read from (config_json.HFSource, set by from_hf), so that to_hf() writes back
        # what it held. A plain attribute, not a field: asdict() / ModelConfig(**d) stay as they were.
        self._hf_source: Any = None
        self.check_types()  # before anything below compares or normalises a value
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        if self.model_type == "deepseek_v4":
            from .config_v4 import fill_v4_defaults

            fill_v4_defaults(self)
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
        return self.num_experts_per_tok > 1 or self.model_type in (*V3_ON, *MIXTRAL)

    @property
    def shared_intermediate_size(self) -> int:
        return self.n_shared_experts * self.moe_intermediate_size

    # ------------------------------------------------------------------ validation
    def check_types(self) -> None:
        """The one type check of every field (nested rope_scaling / quantization_config keys included):
        ValueError("ModelConfig.<field>: must be <kind>, got <value>")."""
        for f in dataclasses.fields(self):
            if "kind" in f.metadata:
                check(f.name, getattr(self, f.name), f.metadata["kind"])

    def validate(self) -> None:
        """Types, then every invalid combination, as a ValueError naming the field and what it must be."""
        self.check_types()

        def fail(name: str, msg: str) -> None:
            raise ValueError(f"ModelConfig.{name}: {msg}")

        for f in dataclasses.fields(self):  # a setting of another model type would be ignored, and lost by to_hf
            families, value = f.metadata.get("families"), getattr(self, f.name)
            if families and self.model_type not in families and value != f.default and not inert_value(
                    f.name, value, self.model_type, f.metadata):
                fail(f.name, f"is a setting of {', '.join(families)} models, not {self.model_type}; got {value!r}")

        if self.uses_mla:
            if self.qk_rope_head_dim % 2:
                fail("qk_rope_head_dim", f"must be even (rope rotates pairs), got {self.qk_rope_head_dim}")
        else:
            if self.num_key_value_heads is not None and self.num_attention_heads % self.num_key_value_heads:
                fail("num_key_value_heads", f"{self.num_key_value_heads} does not divide "
                     f"num_attention_heads={self.num_attention_heads}")
            if self.head_dim is None and self.hidden_size % self.num_attention_heads:
                fail("num_attention_heads", f"{self.num_attention_heads} does not divide "
                     f"hidden_size={self.hidden_size} (or set head_dim)")
            if self.gqa_head_dim % 2:
                fail("head_dim", f"must be even (rope rotates pairs), got {self.gqa_head_dim}")

        if self.uses_dsa:
            self._validate_dsa(fail)
        if self.model_type == "deepseek_v4":
            from .config_v4 import validate_v4

            validate_v4(self, fail)
        if self.model_type == "mixtral":
            if self.attention_bias:
                fail("attention_bias", "Mixtral's attention projections have no biases (transformers would drop them)")
            if self.is_moe and self.moe_intermediate_size != self.intermediate_size:
                fail("moe_intermediate_size", f"Mixtral's experts are intermediate_size={self.intermediate_size} "
                     f"wide, got {self.moe_intermediate_size}")

        if self.is_moe:
            self._validate_moe(fail)

        if self.rope_scaling is not None and self.rope_scaling["rope_type"] == "yarn":
            if not self.rope_scaling.get("original_max_position_embeddings"):
                fail("rope_scaling", "yarn needs original_max_position_embeddings")

    def _validate_dsa(self, fail) -> None:
        if self.q_lora_rank is None:
            fail("q_lora_rank", "deepseek_v32 needs a query latent: the indexer's wq_b reads it")
        if self.index_head_dim < self.qk_rope_head_dim:
            fail("index_head_dim", f"{self.index_head_dim} is narrower than its rope part "
                 f"qk_rope_head_dim={self.qk_rope_head_dim}")
        if not self.rope_interleave:
            fail("rope_interleave", "deepseek_v32's MLA rope is always interleaved (the checkpoint's layout)")
        # transformers writes these per-layer lists; ours follow from first_k_dense_replace. Kept in `extra` for
        # the round trip, they must agree with what this config builds.
        for key, rule in (("mlp_layer_types", ["sparse" if self.is_moe_layer(i) else "dense"
                                               for i in range(self.num_hidden_layers)]),
                          ("layer_types", ["indexed_attention"] * self.num_hidden_layers)):
            if self.extra.get(key) is not None and self.extra[key] != rule:
                fail(key, f"{self.extra[key]!r} differs from what this config builds ({rule!r})")

    def _validate_moe(self, fail) -> None:
        for name in ("num_experts_per_tok", "moe_intermediate_size"):
            if getattr(self, name) is None:
                fail(name, f"must be a positive integer in an MoE model (n_routed_experts={self.n_routed_experts}), "
                     "got None")
        if self.num_experts_per_tok > self.n_routed_experts:
            fail("num_experts_per_tok", f"{self.num_experts_per_tok} is larger than "
                 f"n_routed_experts={self.n_routed_experts}")
        if self.topk_method == "noaux_tc" and self.scoring_func not in ("sigmoid", "sqrtsoftplus"):
            fail("topk_method", "noaux_tc (V3 bias-corrected selection) needs scoring_func='sigmoid'")
        if self.topk_method in ("group_limited_greedy", "noaux_tc"):
            n_group, topk_group = self.n_group or 1, self.topk_group or 1
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
    def from_hf(cls, source: str | Path | dict[str, Any], strict: bool = False) -> "ModelConfig":
        """Build from a config.json dict, its path, or the checkpoint directory holding it.

        The model type is config.json's `model_type`, or else the one whose class `architectures` names
        (Kimi-K2: model_type "kimi_k2", architectures ["DeepseekV3ForCausalLM"]). Raises ValueError naming the
        culprit for: a model type and architecture dsmoe does not implement, a wrongly typed value, a key of
        another model type with a value that would change the model (kv_lora_rank in a V1 file), an invalid
        combination. An unknown key close to a known one (`num_hiden_layers`) is reported with a
        `ConfigKeyWarning` naming the likely intended key; strict=True refuses it instead. Every other unknown
        key is kept in `extra`, and to_hf() writes back what the file held (see config_json.py).
        FileNotFoundError when there is no config.json.
        """
        from .config_json import config_from_hf

        return config_from_hf(cls, source, strict)

    def to_hf(self, style: str | None = None) -> dict[str, Any]:
        """A config.json dict. style="v5": `rope_parameters` (transformers >= 5); "hub": `rope_theta` +
        `rope_scaling`, as the published checkpoints write it; None: the style of the file this config was
        read from (v5 for a config built in Python).

        Read from a file, the result holds that file's keys and values (unknown ones such as auto_map included),
        with only the fields changed since updated, and adds no key the file lacked unless its value changed;
        it never writes keys that do not belong to the model type (kv_lora_rank in a V1 file).
        """
        from .config_json import config_to_hf

        return config_to_hf(self, style)

    def save(self, directory: str | Path, style: str | None = None) -> None:
        from .files import atomic_write_text

        atomic_write_text(Path(directory, "config.json"), json.dumps(self.to_hf(style), indent=2) + "\n")

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with `changes`; it remembers the config.json this one was read from, so a later to_hf()
        still writes that file's other keys."""
        new = dataclasses.replace(self, **changes, extra=dict(self.extra))
        new._hf_source = self._hf_source
        return new


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

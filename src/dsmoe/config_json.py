"""config.json <-> ModelConfig, driven by the field declarations in config.py.

Reading (`config_from_hf`):
1. the model type: `model_type` if dsmoe implements it, else the type whose class `architectures` names
   (Kimi-K2 ships `model_type: kimi_k2` with `architectures: ["DeepseekV3ForCausalLM"]`);
2. keys of another model type (a field whose `families` exclude this one) are refused, all named at once,
   unless null or at a value that changes nothing (its `off` value or this family's fixed value): an early
   DeepSeek-V2 upload labelled `deepseek` with `kv_lora_rank` would otherwise load as V1 with wrong heads;
3. unknown keys are kept in `extra`; one close to a known key (`num_hiden_layers`) warns (ConfigKeyWarning)
   naming the likely intended key, or is refused with strict=True;
4. values are type-checked once, by ModelConfig.check_types.

Writing (`config_to_hf`): a config read from a file remembers that file (HFSource). The output holds the
file's keys in its order, each with its original value while the field behind it is unchanged (so `n_group:
null`, `rope_theta: 10000` or `model_type: kimi_k2` come back as written), the new value otherwise; keys the
file lacked appear only when their value changed; nothing of another model type is ever written.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import (_ARCHITECTURES, _FAMILY_DEFAULTS, _HF_ALIASES, _HF_NAMES, _NO_OFF, MLA_MODEL_TYPES,
                     MODEL_TYPES, ModelConfig, inert_value)
from .config_types import POSITIVE_NUMBER, Kind, check, close_key

ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta")
ROPE_PARAMETER_KEYS = ("rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "mscale",
                       "mscale_all_dim", "beta_fast", "beta_slow", "attention_factor", "truncate")

# Keys transformers or the Hub's files carry that dsmoe does not model: kept verbatim, never taken for a typo.
COMMON_KEYS = frozenset({
    "auto_map", "transformers_version", "torch_dtype", "dtype", "use_cache", "pretraining_tp", "attention_dropout",
    "ep_size", "output_router_logits", "router_jitter_noise", "qk_head_dim", "mlp_bias", "use_sliding_window",
    "max_window_layers", "_name_or_path", "return_dict", "output_hidden_states", "output_attentions",
    "is_encoder_decoder", "num_experts", "layer_types", "chunk_size_feed_forward", "mlp_layer_types",
})


_MISSING = object()
_ANY = Kind("anything", lambda v: True)


class ConfigKeyWarning(UserWarning):
    """An unknown config.json key that looks like a misspelling of a known one."""


@dataclass(frozen=True)
class HFSource:
    """The config.json a ModelConfig was read from, to write it back faithfully."""

    raw: dict[str, Any]  # as read
    written: dict[str, Any]  # config_to_hf of the fresh config at read time: what each key read back as
    extra_keys: frozenset[str]  # the raw keys that went to `extra`
    style: str  # "v5" (rope_parameters) or "hub" (rope_theta + rope_scaling)
    typos: dict[str, str] = dataclasses.field(default_factory=dict)  # unknown key -> the known key it resembles


def _specs() -> dict[str, dict[str, Any]]:
    """Field -> its declaration (kind, families, off); a field declared without _f() counts as carried by
    every model type and unchecked (tests/test_config_types.py asks every field to declare its kind)."""
    plain = {"kind": None, "families": None, "off": _NO_OFF}
    return {f.name: {**plain, **f.metadata} for f in dataclasses.fields(ModelConfig) if f.name != "extra"}


def _hf_key(name: str, model_type: str) -> str:
    return _HF_NAMES.get(model_type, {}).get(name, name)


def _key_table() -> dict[str, tuple[str, tuple[str, ...]]]:
    """config.json key -> (our field, model types whose file carries it under that key)."""
    table: dict[str, tuple[str, list[str]]] = {}
    for name, spec in _specs().items():
        if name in ("rope_theta", "rope_scaling", "model_type"):
            continue
        for model_type in spec["families"] or MODEL_TYPES:
            key = _hf_key(name, model_type)
            table.setdefault(key, (name, []))[1].append(model_type)
    for alias, name in _HF_ALIASES.items():
        table[alias] = (name, list(table[name][1]))
    return {key: (name, tuple(types)) for key, (name, types) in table.items()}


def _read_raw(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(source, dict):
        return dict(source)
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
    return raw


def resolve_model_type(raw: dict[str, Any]) -> str:
    """Our model type for a config.json: its model_type, or the one whose class `architectures` names."""
    model_type, archs = raw.get("model_type"), raw.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ValueError(f"ModelConfig.architectures: must be a list of class names, got {archs!r}")
    by_class = {cls: t for t, cls in _ARCHITECTURES.items()}
    named = [by_class[a] for a in archs or [] if a in by_class]
    if model_type in MODEL_TYPES:
        if named and model_type not in named:
            raise ValueError(f"ModelConfig.model_type: {model_type!r} contradicts architectures {archs!r} "
                             f"(the class of a {named[0]} model); fix one of them")
        return model_type
    if named:
        return named[0]
    raise ValueError(f"ModelConfig.model_type: {model_type!r} is not a model type dsmoe implements "
                     f"({', '.join(MODEL_TYPES)}), and architectures {archs!r} names none of its classes "
                     f"({', '.join(_ARCHITECTURES.values())})")


def _report_unknown(where: str, key: str, guess: str, strict: bool, stacklevel: int = 4) -> None:
    """Warn (stacklevel: pointing at the caller of ModelConfig.from_hf) or, strict, raise."""
    message = (f"config.json: unknown key {where}{key!r}; did you mean {guess!r}? "
               f"(ignored, so {guess} keeps its default)")
    if strict:
        raise ValueError(f"ModelConfig.{where}{key}: unknown key; did you mean {guess!r}? "
                         "(refused: strict config checking)")
    warnings.warn(message, ConfigKeyWarning, stacklevel=stacklevel)


def config_from_hf(cls: type[ModelConfig], source: str | Path | dict[str, Any], strict: bool) -> ModelConfig:
    """See ModelConfig.from_hf."""
    raw = _read_raw(source)
    model_type = resolve_model_type(raw)
    source_raw = raw
    v4_rope = None
    if model_type == "deepseek_v4":  # legacy keys fold in as transformers does; the file is written back as read
        from .config_v4 import fold_legacy, rope_from_hf

        raw = fold_legacy(raw)
        v4_rope = rope_from_hf(raw)
    specs, table = _specs(), _key_table()
    values: dict[str, Any] = {"model_type": model_type, **_FAMILY_DEFAULTS[model_type]}
    extra: dict[str, Any] = {}
    foreign: list[str] = []
    typos: dict[str, str] = {}
    known = set(table) | set(ROPE_KEYS) | {"model_type", "architectures"}
    for key, value in raw.items():
        if key in ROPE_KEYS or key in ("model_type", "architectures"):
            continue
        if key not in table:
            guess = None if key in COMMON_KEYS else close_key(key, known - set(raw))
            if guess:
                _report_unknown("", key, guess, strict)
                typos[key] = guess
            extra[key] = value
            continue
        name, families = table[key]
        if key in COMMON_KEYS and model_type not in families:  # another family's list (V3.2's layer_types)
            extra[key] = value
            continue
        if model_type in families:
            values[name] = value
        elif not inert_value(name, value, model_type, specs[name]):
            foreign.append(f"{key}={value!r}")
    if foreign:
        owners = sorted({t for item in foreign for t in table[item.split("=")[0]][1]})
        raise ValueError(f"ModelConfig.model_type: {raw.get('model_type')!r} ({model_type}) contradicts "
                         f"{', '.join(foreign)}: {'this key belongs' if len(foreign) == 1 else 'these keys belong'} "
                         f"to {', '.join(owners)} models; fix model_type or remove the key(s)")
    style = "v5" if isinstance(raw.get("rope_parameters"), dict) and raw["rope_parameters"] else "hub"
    if v4_rope is not None:
        values.update(v4_rope)
    else:
        values.update(_rope_from_hf(raw, values.get("rope_theta", ModelConfig.rope_theta), strict))
    if model_type in MLA_MODEL_TYPES:
        # transformers writes head_dim = qk_rope_head_dim for MLA models; it is not a GQA head size. Both
        # keys are unused here, but a wrongly typed one is still a broken file.
        for name in ("head_dim", "num_key_value_heads"):
            if name in values:
                check(name, values.pop(name), specs[name]["kind"] or _ANY)
    if model_type == "mixtral":
        # each expert is intermediate_size wide; a moe_intermediate_size that differs is refused by validate()
        values.setdefault("moe_intermediate_size", values.get("intermediate_size", ModelConfig.intermediate_size))
    try:
        config = cls(**values, extra=extra)
    except ValueError as err:
        if style == "v5" and str(err).startswith("ModelConfig.rope_scaling"):  # name the key the file used
            raise ValueError(str(err).replace("ModelConfig.rope_scaling", "ModelConfig.rope_parameters", 1)) from None
        raise
    # a private copy: the caller may reuse its dict (and its nested rope dict) for something else
    config._hf_source = HFSource(copy.deepcopy(source_raw), _fresh(config, style), frozenset(extra), style, typos)
    return config


def _rope_from_hf(raw: dict[str, Any], default_theta: float, strict: bool) -> dict[str, Any]:
    """Both styles -> {rope_theta, rope_scaling}. A v5 `rope_parameters` wins over the Hub keys."""
    params = raw.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"ModelConfig.rope_parameters: must be an object or null, got {params!r}")
    scaling = raw.get("rope_scaling")
    if params:
        theta, scaling, where = params.get("rope_theta", raw.get("rope_theta", default_theta)), params, "rope_parameters"
    else:
        theta, where = raw.get("rope_theta", default_theta), "rope_scaling"
        if scaling is not None and not isinstance(scaling, dict):
            raise ValueError(f"ModelConfig.rope_scaling: must be an object or null, got {scaling!r}")
    for key in scaling or {}:
        guess = None if key in ROPE_PARAMETER_KEYS else close_key(key, set(ROPE_PARAMETER_KEYS) - set(scaling))
        if guess:
            _report_unknown(f"{where}.", key, guess, strict, stacklevel=5)
    check("rope_theta", theta, POSITIVE_NUMBER)
    return {"rope_theta": float(theta), "rope_scaling": scaling or None}


def _fresh(config: ModelConfig, style: str) -> dict[str, Any]:
    """The complete config.json of this model type: every field its files carry, nothing else."""
    if style not in ("v5", "hub"):
        raise ValueError(f"to_hf(style=...): must be 'v5' or 'hub', got {style!r}")
    model_type = config.model_type
    out: dict[str, Any] = {"architectures": [_ARCHITECTURES[model_type]], "model_type": model_type}
    for name, spec in _specs().items():
        if name in ("model_type", "rope_theta", "rope_scaling") or (spec["families"] and model_type not in spec["families"]):
            continue
        value = getattr(config, name)
        if name == "quantization_config" and value is None:
            continue
        out[_hf_key(name, model_type)] = value
    if config.uses_mla:
        out.pop("head_dim")
        out["num_key_value_heads"] = config.num_attention_heads
    if model_type == "mixtral":
        out.pop("moe_intermediate_size")
        out["intermediate_size"] = config.moe_intermediate_size
    if model_type == "deepseek_v4":
        out.pop("intermediate_size")  # transformers maps it onto moe_intermediate_size (attribute_map)
    if model_type == "deepseek_v4" and style == "v5":
        from .config_v4 import rope_to_hf

        out["rope_parameters"] = rope_to_hf(config)
    elif style == "v5":
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta, **(config.rope_scaling or {})}
    else:
        out["rope_theta"] = config.rope_theta
        out["rope_scaling"] = None if config.rope_scaling is None else {
            ("type" if k == "rope_type" else k): v for k, v in config.rope_scaling.items()}
    return out




def config_to_hf(config: ModelConfig, style: str | None) -> dict[str, Any]:
    """See ModelConfig.to_hf."""
    src: HFSource | None = config._hf_source
    fresh = _fresh(config, style or (src.style if src else "v5"))
    if src is None or src.written["model_type"] != config.model_type:
        arch = fresh.pop("architectures")
        return {"architectures": arch, **config.extra, **fresh}
    out: dict[str, Any] = {}
    for key, raw in src.raw.items():
        if key in src.extra_keys:
            if key in config.extra:
                out[key] = config.extra[key]
        elif key in fresh:
            out[key] = raw if fresh[key] == src.written.get(key, _MISSING) else fresh[key]
        elif key == "rope_theta" and config.model_type == "deepseek_v4" and "rope_parameters" in fresh:
            out[key] = config.rope_theta  # transformers' V4 files repeat the main base beside rope_parameters
        elif key not in ROPE_KEYS and key not in src.written:
            out[key] = raw  # accepted but not modelled: MLA's head_dim, another type's key at a harmless value
    for key, value in fresh.items():
        if key not in out and key not in src.raw and value != src.written.get(key, _MISSING):
            out[key] = value  # the file lacked it, and its value is not what that absence read as
    for key, value in config.extra.items():
        out.setdefault(key, value)
    return out

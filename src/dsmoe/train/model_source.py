"""What a run trains: an architecture (preset or config.json, with `--set` overrides) or a Hugging Face
checkpoint to fine-tune (`--init`), which parameters train (`--train-only` / `--freeze`), and whether the
model fits in memory before anything is allocated.

Pattern matching is `fnmatch` over parameter names, tried against both dsmoe's names
(``layers.3.ffn.experts.w1``, ``mtp.0.eh_proj.weight``) and the Hub names they are stored under
(``model.layers.3.mlp.experts.*.gate_proj.weight``), so either spelling selects a tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch

from ..calc import format_bytes, format_count
from ..checkpoint.names import hf_names
from ..config import ModelConfig
from ..device import meta_device
from ..presets import PRESETS, get_preset

# fp32 master weight + its gradient + AdamW's two moments, per trainable parameter; frozen ones keep the weight.
BYTES_TRAINABLE = 16
BYTES_FROZEN = 4


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["num_hidden_layers=6", "q_lora_rank=null"]`` -> ``{"num_hidden_layers": 6, "q_lora_rank": None}``.

    Values are read as JSON (numbers, true/false, null, lists, objects) and otherwise kept as strings.
    ValueError naming the item for one without ``=``.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE (e.g. --set num_hidden_layers=6)")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def resolve_config(spec: str, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """A preset name, a config.json path or a directory holding one, with `overrides` applied as config.json
    keys, validated as a whole (ValueError naming the field, or the unknown key)."""
    if spec in PRESETS:
        raw = get_preset(spec).to_hf()
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ValueError(f"--config {spec}: neither a preset ({', '.join(PRESETS)}) nor an existing "
                             "config.json or checkpoint directory")
        raw = ModelConfig.from_hf(path).to_hf()
    overrides = overrides or {}
    if ("rope_theta" in overrides or "rope_scaling" in overrides) and "rope_parameters" not in overrides:
        # the Hub-style keys the user sets replace the v5 block; what they leave out keeps its value
        params = dict(raw.pop("rope_parameters", None) or {})
        raw.setdefault("rope_theta", params.pop("rope_theta", None))
        plain = params.get("rope_type", "default") == "default" and set(params) <= {"rope_type"}
        raw.setdefault("rope_scaling", None if plain else params)
    raw.update(overrides)
    try:
        config = ModelConfig.from_hf(raw)
    except TypeError as err:
        raise ValueError(f"--set: {err}") from None
    # from_hf keeps the keys it does not model in `extra`: a --set key landing there is a typo, not a setting
    unknown = sorted(set(overrides) & set(config.extra))
    if unknown:
        raise ValueError(f"--set {unknown[0]}: not a model config field (e.g. num_hidden_layers, n_routed_experts, "
                         "hidden_size, num_nextn_predict_layers)")
    return config


def select_trainable(names: Sequence[str], config: ModelConfig, train_only: Sequence[str] = (),
                     freeze: Sequence[str] = ()) -> set[str]:
    """The names among `names` that train: those matching a `train_only` pattern (all when none is given),
    minus those matching a `freeze` pattern. ValueError naming a pattern that matches nothing, or when
    nothing is left to train."""
    aliases = {name: [name, *_hub_names(config, name)] for name in names}

    def matches(pattern: str, name: str) -> bool:
        return any(fnmatchcase(alias, pattern) for alias in aliases[name])

    for flag, patterns in (("--train-only", train_only), ("--freeze", freeze)):
        for pattern in patterns:
            if not any(matches(pattern, n) for n in names):
                raise ValueError(f"{flag} {pattern!r} matches no parameter (e.g. {names[0]!r}; "
                                 "patterns are fnmatch over dsmoe or Hugging Face names)")
    chosen = {n for n in names if not train_only or any(matches(p, n) for p in train_only)}
    chosen -= {n for n in chosen if any(matches(p, n) for p in freeze)}
    if not chosen:
        raise ValueError("--train-only / --freeze leave no parameter to train")
    return chosen


def _hub_names(config: ModelConfig, name: str) -> list[str]:
    try:
        names = hf_names(config, name)
    except KeyError:
        return []
    if len(names) > 1:  # stacked experts: the per-expert pattern, plus each expert's own name
        return [names[0].replace(".0.", ".*.", 1), *names]
    return names


def apply_trainable(model: torch.nn.Module, trainable: set[str]) -> tuple[int, int]:
    """Set requires_grad from `trainable`; returns (trainable, total) parameter counts (tied tensors once)."""
    total = done = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
        total += p.numel()
        done += p.numel() if name in trainable else 0
    return done, total


def meta_parameters(config: ModelConfig, with_mtp: bool | None = None) -> dict[str, int]:
    """name -> element count of every parameter of `Transformer(config)`, built on the meta device (no memory)."""
    from ..model import Transformer

    with meta_device():
        model = Transformer(config, with_mtp=with_mtp)
    return {name: p.numel() for name, p in model.named_parameters()}


def available_memory() -> int | None:
    """Bytes of memory this process may still use: MemAvailable from /proc/meminfo (Linux), else the
    physical memory; None when neither is known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def training_bytes(sizes: dict[str, int], trainable: set[str]) -> int:
    """Weights, gradients and AdamW moments in fp32: 16 bytes per trainable parameter, 4 per frozen one.
    Activations come on top (they scale with --batch-size x --seq-len)."""
    return sum(n * (BYTES_TRAINABLE if name in trainable else BYTES_FROZEN) for name, n in sizes.items())


def check_fits(what: str, sizes: dict[str, int], trainable: set[str], available: int | None = None) -> int:
    """Refuse (ValueError, one line with the estimate) a model whose parameters, gradients and optimizer
    state exceed the memory available; returns the estimate in bytes."""
    need = training_bytes(sizes, trainable)
    have = available_memory() if available is None else available
    if have is not None and need > have:
        count = sum(sizes.values())
        raise ValueError(f"{what}: {format_count(count)} parameters need about {format_bytes(need)} for fp32 "
                         f"weights, gradients and AdamW state ({BYTES_TRAINABLE} bytes per trainable parameter), "
                         f"more than the {format_bytes(have)} of memory available; pick a smaller --config / --set, "
                         "or --train-only / --freeze part of it")
    return need
def checkpoint_has_mtp_dir(directory: Path, config: ModelConfig) -> bool:
    """Whether the checkpoint in `directory` holds DeepSeek-V3 / V4 MTP modules (load_pretrained then builds them)."""
    from ..checkpoint.names import checkpoint_has_mtp
    from ..checkpoint.shards import ShardReader

    with ShardReader(Path(directory)) as reader:
        return checkpoint_has_mtp(config, set(reader.names()))


def router_bias_names(config: ModelConfig, with_mtp: bool | None) -> list[str]:
    """Names of the routers' correction-bias buffers (V3 routing), which --train-only / --freeze also select."""
    if config.topk_method != "noaux_tc" or not config.is_moe:
        return []
    layers = [f"layers.{i}" for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    depth = config.num_nextn_predict_layers if with_mtp in (None, True) else 0
    block = "" if config.model_type == "deepseek_v4" else ".block"  # V4's MTP module is its block
    layers += [f"mtp.{k}{block}" for k in range(depth) if config.is_moe_layer(config.num_hidden_layers + k)]
    return [f"{layer}.ffn.gate.bias" for layer in layers]

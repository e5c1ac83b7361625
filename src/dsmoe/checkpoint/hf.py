"""load_pretrained / save_pretrained in the Hugging Face layout (config.json + safetensors shards).

Loading plans everything before reading any tensor: every expected Hub name must exist with the right
shape (FP8 weights with their block scales), and nothing unexpected may be present. Only then are the
tensors read, converted (dequantised, stacked per expert, cast) into a fresh state dict and assigned
into a model built on the meta device, so a load holds one copy of the weights and a failed load
returns nothing half-built.

Each tensor is read with plain file reads (checkpoint/stream.py) into its final place on the target
device: straight into the parameter's buffer when it is a CPU tensor of the stored dtype, else through a
one-tensor staging buffer; stacked experts are written into one preallocated tensor, FP8 weights are
dequantised on the device. No memory map of a shard outlives the load, and the peak during a load is the
model plus about one tensor (tests/test_load_device.py measures it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ModelConfig
from ..device import meta_device, resolve_device
from ..files import atomic_write_text
from ..model import Transformer
from ..model.v4 import V4Transformer
from .fp4 import FP4_BLOCK, FP4_DTYPES, SCALE_DTYPES, dequantize_fp4, scale_names, scale_to_float
from .fp8 import DEFAULT_BLOCK, FP8_DTYPES, dequantize_blockwise, scale_shape
from .generation_config import (GenerationConfig, generation_config_from_model_config, read_generation_config,
                                write_generation_config)
from .names import (MTP_SHARED_COPIES, checkpoint_has_mtp, hf_names, is_ignored_hf_name, mtp_layer,
                    mtp_layer_indices, v4_alternatives, v4_hf_names)
from .shards import INDEX_NAME, SINGLE_NAME, CheckpointError, ShardReader, parse_size, write_shards
from .stream import ST_DTYPES, Staging, TensorFile

_FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
_ALWAYS_FP32 = (".ffn.gate.bias",  # V3's correction bias: tiny, and updates of 1e-3 vanish in bf16
                 ".indexer.weights_proj.weight")  # V3.2: transformers keeps it in fp32 too


def load_pretrained(directory: str | Path, dtype: torch.dtype | None = None, strict: bool = False,
                    device: str | torch.device | None = "cpu") -> Transformer:
    """Load a Hugging Face checkpoint directory (DeepSeek V1/V2/V3, Mixtral) into a `Transformer`.

    dtype: the parameters' dtype; None keeps the checkpoint's (that of its embedding; FP8 weights are
    dequantised to it). DeepSeek-V3's MTP modules are loaded when the checkpoint holds them (a
    transformers export does not). The model is returned in eval mode on `device`.
    device: "cpu" (default), "cuda", "cuda:N", "auto" (CUDA if available) or "meta" (every check of the
    checkpoint runs, no weight is read: parameters of the right shapes and dtypes on the meta device).
    Each tensor goes to the device as it is read; a bad or unavailable device is a ValueError naming it,
    raised before anything is read.
    strict: refuse (ValueError) instead of warning about config.json keys that look misspelled
    (ModelConfig.from_hf).
    The directory's generation_config.json (token ids, sampling defaults) is read first and attached as
    `model.generation_config` (a GenerationConfig), None when the checkpoint has none; save_pretrained
    writes it back.
    """
    device = resolve_device(device)
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such model directory")
    config = ModelConfig.from_hf(directory, strict=strict)
    generation_config = read_generation_config(directory)
    try:
        model = _load(directory, config, dtype, device)
    except CheckpointError as err:
        typos = config._hf_source.typos
        if not typos:
            raise
        # a misspelled key left its field at the default: that, not the tensor, is what to fix
        hint = "; ".join(f"{key!r} (did you mean {meant!r}?)" for key, meant in typos.items())
        raise CheckpointError(f"{err}; config.json has unknown key(s) {hint}") from None
    model.generation_config = generation_config
    return model.eval()


def _load(directory: Path, config: ModelConfig, dtype: torch.dtype | None, device: torch.device) -> Transformer:
    """The weights of `directory` into a model of `config` on `device` (see load_pretrained)."""
    block = _fp8_block(config)
    v4 = config.model_type == "deepseek_v4"
    with ShardReader(directory) as reader:
        with_mtp = checkpoint_has_mtp(config, set(reader.names()))
        with meta_device():
            model = (V4Transformer if v4 else Transformer)(config, with_mtp=with_mtp)
        expected = {name: t for name, t in model.state_dict().items()
                    if not (config.tie_word_embeddings and name == "head.weight")}
        plan = _plan(config, reader, expected, block, with_mtp)
        if dtype is None:
            dtype = _checkpoint_dtype(reader, plan["embed.weight"][0])
        files = {} if device.type == "meta" else {f: TensorFile(reader.directory / f)
                                                  for f in sorted(set(reader.file_of.values()))}
        staging = Staging(pin=device.type == "cuda")
        try:
            state = {}
            for ours, sources in plan.items():
                target = torch.float32 if ours.endswith(_ALWAYS_FP32) else dtype
                if not expected[ours].is_floating_point():  # V4's hash table tid2eid
                    target = expected[ours].dtype
                out = torch.empty(expected[ours].shape, dtype=target, device=device)
                if device.type != "meta":
                    # one part of the same rank is the tensor itself; else parts are stacked along dim 0
                    stacked = not (len(sources) == 1 and len(reader.shape(sources[0])) == out.ndim)
                    for e, hf in enumerate(sources):
                        _read(reader, files, hf, out[e] if stacked else out, block, staging)
                state[ours] = out
        finally:
            for f in files.values():
                f.close()
    if config.tie_word_embeddings:
        state["head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.head.weight = model.embed.weight
    # non-persistent buffers (the rope tables) were built on the CPU beside the meta parameters
    if device.type != "meta":
        for module in model.modules():
            for name, buf in module.named_buffers(recurse=False):
                if buf.device != device:
                    setattr(module, name, buf.to(device))
    return model


def save_pretrained(model: Transformer, directory: str | Path, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None, config_style: str | None = None,
                    generation_config: GenerationConfig | None = None) -> None:
    """Write `model` as config.json + safetensors shards with the Hub's names (per-expert tensors), which
    `transformers.AutoModelForCausalLM.from_pretrained(directory)` loads. dtype: cast on write (default:
    as the model holds them). Shards of at most max_shard_size (bytes, or "5GB", "500MB").

    config.json: ModelConfig.to_hf(config_style): a loaded model's file comes back with its own keys and
    style (None); "v5" or "hub" pick the rope style. Its dtype key (`torch_dtype` if the source used that)
    says the saved dtype. generation_config.json: `generation_config` if given (a training run passes the
    tokenizer's real EOS id this way), else `model.generation_config` (what load_pretrained read, its keys
    kept), else one made of config.json's bos/eos/pad ids when any is set; no file otherwise. Every file is
    written with mode 0666 less the process umask, as open() would."""
    config = model.config
    limit = parse_size(max_shard_size)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()

    def hub_tensors():
        for ours, t in state.items():
            if config.tie_word_embeddings and ours == "head.weight":
                continue
            t = t.detach().cpu()
            if dtype is not None and t.is_floating_point() and not ours.endswith(_ALWAYS_FP32):
                t = t.to(dtype)
            names = v4_hf_names(config, ours) if config.model_type == "deepseek_v4" else hf_names(config, ours)
            if len(names) == 1:
                yield names[0], t.contiguous()
            else:  # stacked experts -> one tensor each; clone so shards share no storage
                for e, name in enumerate(names):
                    yield name, t[e].clone()
        # The published V3 layout repeats the shared embedding and head inside each MTP layer (V4's does not).
        for depth in range(0 if config.model_type == "deepseek_v4" else len(model.mtp)):
            for ours, suffix in MTP_SHARED_COPIES.items():
                t = state["embed.weight" if config.tie_word_embeddings else ours].detach().cpu()
                yield f"model.layers.{mtp_layer(config, depth)}.{suffix}", (t if dtype is None else t.to(dtype)).clone()

    files = write_shards(hub_tensors(), directory, limit)
    for stale in list(directory.glob("model*.safetensors")):
        if stale.name not in files:
            stale.unlink()
    saved_dtype = dtype or model.embed.weight.dtype
    hf = config.to_hf(config_style)
    dtype_key = "torch_dtype" if "torch_dtype" in hf and "dtype" not in hf else "dtype"  # the source's key
    hf[dtype_key] = str(saved_dtype).removeprefix("torch.")
    hf.pop("quantization_config", None)  # weights are written dequantised
    atomic_write_text(directory / "config.json", json.dumps(hf, indent=2) + "\n")
    if generation_config is None:
        generation_config = getattr(model, "generation_config", None)
    if generation_config is None:
        generation_config = generation_config_from_model_config(config.bos_token_id, config.eos_token_id,
                                                                config.pad_token_id)
    if generation_config is not None:
        write_generation_config(directory, generation_config)


def _plan(config: ModelConfig, reader: ShardReader, expected: dict[str, torch.Tensor],
          block: tuple[int, int], with_mtp: bool) -> dict[str, list[str]]:
    """Our name -> Hub names, after checking presence, shapes and dtypes of every Hub tensor."""
    present = set(reader.names())
    plan: dict[str, list[str]] = {}
    missing: list[str] = []
    v4 = config.model_type == "deepseek_v4"
    for ours, meta in expected.items():
        names = v4_hf_names(config, ours) if v4 else hf_names(config, ours)
        if v4:  # the original DeepSeek layout spells them without `model.`
            names = [hf if hf in present else next((a for a in v4_alternatives(hf) if a in present), hf)
                     for hf in names]
        plan[ours] = names
        shape = tuple(meta.shape[1:]) if len(names) > 1 else tuple(meta.shape)
        for hf in names:
            if hf not in present:
                missing.append(hf)
                continue
            _check_tensor(reader, hf, shape, present, block, integer=not meta.is_floating_point())
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{reader.directory}: missing tensor {', '.join(missing[:3])}{more}")
    wanted = {hf for names in plan.values() for hf in names}
    mtp_layers = mtp_layer_indices(config, present)
    for hf in sorted(present - wanted):
        if not is_ignored_hf_name(config, hf, with_mtp, mtp_layers, reader.shape(hf)):
            raise CheckpointError(f"unexpected tensor {hf!r} in {reader.directory / reader.file_of[hf]} "
                                  f"(not part of a {config.model_type} model with this config.json)")
    return plan


def _check_tensor(reader: ShardReader, hf: str, shape: tuple[int, ...], present: set[str],
                  block: tuple[int, int], integer: bool = False) -> None:
    where = reader.directory / reader.file_of[hf]
    got = reader.shape(hf)
    kind = reader.dtype(hf)
    if not integer and kind in FP4_DTYPES and len(got) == 2 and len(shape) == 2:
        _check_fp4(reader, hf, got, shape, present, where)  # V4's packed FP4 experts
        return
    if got != shape:
        raise CheckpointError(f"tensor {hf!r} in {where} has shape {list(got)}, expected {list(shape)}")
    if integer:
        if kind not in ("I64", "I32", "I16", "U8", "I8"):
            raise CheckpointError(f"tensor {hf!r} in {where} has dtype {kind}, expected an integer type")
    elif kind in FP8_DTYPES:
        scale = next((n for n in scale_names(hf) if n in present), hf + "_scale_inv")
        if scale not in present:
            raise CheckpointError(f"FP8 tensor {hf!r} in {where} has no {scale!r}")
        if reader.shape(scale) != scale_shape(got, block):
            raise CheckpointError(f"tensor {scale!r} has shape {list(reader.shape(scale))}, expected "
                                  f"{list(scale_shape(got, block))} for {block[0]}x{block[1]} blocks of {hf!r}")
    elif kind not in _FLOAT_DTYPES:
        raise CheckpointError(f"tensor {hf!r} in {where} has dtype {kind}, expected a floating-point type")


def _read(reader: ShardReader, files: dict[str, TensorFile], hf: str, out: torch.Tensor,
          block: tuple[int, int], staging: Staging) -> None:
    """Tensor `hf` into `out` (its final place: device and dtype), dequantising FP8 / FP4 on out's device;
    tensors that need a cast or a move go through `staging`, one at a time."""
    file = files[reader.file_of[hf]]
    where = reader.directory / reader.file_of[hf]
    kind = reader.dtype(hf)
    fp4 = out.is_floating_point() and kind in FP4_DTYPES  # V4's packed e2m1 experts (int8 storage)
    if fp4 or kind in FP8_DTYPES:
        scale_name = next(n for n in scale_names(hf) if n in reader.file_of)  # V4 `X.scale`, V3 `X_scale_inv`
        scale = scale_to_float(files[reader.file_of[scale_name]].read(scale_name)).to(out.device)
        raw = file.read(hf, staging).to(out.device)
        out.copy_(dequantize_fp4(raw, scale, out.dtype) if fp4 else dequantize_blockwise(raw, scale, out.dtype, block))
        # checked after dequantisation: a NaN code or an inf / NaN in the block scales both end up here
        if not _all_finite(out):
            raise CheckpointError(f"{'FP4' if fp4 else 'FP8'} tensor {hf!r} in {where} dequantises to NaN or inf "
                                  f"values (check it and {scale_name!r})")
        return
    if out.device.type == "cpu" and out.dtype == ST_DTYPES[kind] and out.is_contiguous():
        file.read_into(hf, out)  # no staging copy at all
    else:
        out.copy_(file.read(hf, staging))  # staged on the CPU, cast (and moved) by the copy
    if out.is_floating_point() and not _all_finite(out):
        # a cast to fp16 can also overflow to inf: equally unusable
        raise CheckpointError(f"tensor {hf!r} in {where} holds NaN or inf values"
                              + (f" (after conversion to {out.dtype})" if out.dtype != ST_DTYPES[kind] else ""))


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN / inf in t, without a full-size temporary: any NaN or inf makes the fp32-accumulated sum of
    its chunk non-finite (real weights never sum past fp32's range, 3.4e38); chunks of 2^20 elements keep
    the cast a reduced-precision sum may make small. One host synchronisation per tensor."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    sums = torch.stack([c.sum(dtype=acc) for c in t.reshape(-1).split(1 << 20)]) if t.numel() else t.new_zeros(1, dtype=acc)
    return bool(torch.isfinite(sums).all())


def _check_fp4(reader: ShardReader, hf: str, got: tuple[int, ...], shape: tuple[int, ...], present: set[str],
               where) -> None:
    """A packed FP4 weight (M, N/2) for an (M, N) tensor, with its (M, N/32) UE8M0 scale."""
    if got != (shape[0], shape[1] // 2) or shape[1] % FP4_BLOCK:
        raise CheckpointError(f"tensor {hf!r} in {where} has shape {list(got)} ({reader.dtype(hf)}), expected "
                              f"{list(shape)}, or {[shape[0], shape[1] // 2]} as packed FP4")
    scale = next((n for n in scale_names(hf) if n in present), None)
    if scale is None:
        raise CheckpointError(f"FP4 tensor {hf!r} in {where} has no {scale_names(hf)[0]!r}")
    want = (shape[0], shape[1] // FP4_BLOCK)
    if reader.shape(scale) != want or reader.dtype(scale) not in SCALE_DTYPES:
        raise CheckpointError(f"tensor {scale!r} has shape {list(reader.shape(scale))} ({reader.dtype(scale)}), "
                              f"expected {list(want)} UE8M0 scales for 1x{FP4_BLOCK} blocks of FP4 {hf!r}")


def _checkpoint_dtype(reader: ShardReader, embed: str = "model.embed_tokens.weight") -> torch.dtype:
    kind = reader.dtype(embed)
    return _FLOAT_DTYPES.get(kind, torch.bfloat16)


def _fp8_block(config: ModelConfig) -> tuple[int, int]:
    quant = config.quantization_config or {}
    block = quant.get("weight_block_size") or DEFAULT_BLOCK
    return (int(block[0]), int(block[1]))


__all__ = ["CheckpointError", "load_pretrained", "save_pretrained", "INDEX_NAME", "SINGLE_NAME"]

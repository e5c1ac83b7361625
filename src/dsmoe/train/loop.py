"""The training loop: corpus -> tokenizer -> batches -> steps -> metrics and crash-safe checkpoints.

Library code: it reports through `on_event(dict)` callbacks and never prints; the CLI draws the progress.
A resumed run reproduces an uninterrupted one exactly: the checkpoint holds the fp32 weights (and the
routing biases), optimizer state, RNG states and the data position, and everything else is a function
of the step.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import parallel
from ..checkpoint import load_pretrained
from ..model import Transformer
from ..ops.capacity import TokenDropping, protected_sequences
from ..parallel import ParallelInfo
from ..presets import get_preset
from . import balance, checkpoint, data, indexer, metrics, tokenizer
from .objective import BalanceSettings, compute_losses, dropped_fraction, expert_loads, update_biases


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, unusable resume state); the message says why."""


@dataclass
class TrainConfig:
    preset: str = "tiny-v3"
    steps: int = 800  # ~2.5 minutes on 2 quiet CPU cores
    seed: int = 0
    out: Path = Path("runs/tiny-v3")
    save_every: int = 200
    resume: bool = False
    data: Path | None = None  # None: the Python standard library's source
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dtype: str = "fp32"  # fp32 or bf16 (bf16 autocast over fp32 master weights)
    mtp_weight: float = 0.3  # lambda (V3: 0.3 early in training, 0.1 later)
    eval_every: int = 100
    eval_batches: int = 4
    vocab_size: int | None = None  # None: the preset's
    ep: int = 1  # expert-parallel ranks (the rest of the world is data parallel)
    balance: dict[str, Any] = field(default_factory=dict)  # BalanceSettings overrides (None = paper default)
    # Token dropping (off: None). DeepSeek-V2 trained with capacity 1.0 per device and ~10% of sequences
    # never dropped: capacity_factor=1.0, drop_level="device" (over the balance settings' devices).
    capacity_factor: float | None = None
    drop_level: str = "expert"
    drop_protect: float = 0.1  # share of the run's sequences never dropped (ops.capacity.protected_sequences)
    indexer_warmup_steps: int = 0  # V3.2 (DSA): steps of dense warm-up training only the indexers (train/indexer.py)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name in ("steps", "save_every", "batch_size", "seq_len", "eval_every", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"--dtype must be fp32 or bf16, got {self.dtype!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive finite number, got {self.lr}")
        if not 0.0 <= self.drop_protect <= 1.0:
            raise ValueError(f"--drop-protect must be a fraction in [0, 1], got {self.drop_protect}")
        if self.capacity_factor is None and (self.drop_level, self.drop_protect) != ("expert", 0.1):
            raise ValueError("--drop-level and --drop-protect shape token dropping: they need --capacity-factor")

    def settings(self) -> tuple[BalanceSettings, TokenDropping | None]:
        """The balancing and dropping rules for this run's preset, checked (ValueError naming the flag).
        Device-level dropping groups the experts into the balance settings' --devices."""
        config = get_preset(self.preset)
        if self.indexer_warmup_steps < 0 or (self.indexer_warmup_steps and not config.uses_dsa):
            raise ValueError(f"--indexer-warmup-steps {self.indexer_warmup_steps}: must be >= 0, and needs a model "
                             f"with DeepSeek Sparse Attention (a V3.2 preset; {self.preset} is {config.model_type})")
        settings = BalanceSettings.paper_defaults(config, **self.balance)
        settings.check_model(config)
        if "aux_free" in settings.schemes and config.topk_method != "noaux_tc":  # only V3 routers have a bias
            raise ValueError("--balance aux_free needs a model whose routers have a correction bias "
                             f"(topk_method noaux_tc; {self.preset} routes with {config.topk_method})")
        dropping = None
        if self.capacity_factor is not None:
            dropping = TokenDropping(self.capacity_factor, self.drop_level, settings.devices)
            dropping.check_experts(config.n_routed_experts)
        return settings, dropping


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup reaching lr at its last step (step 0 without warmup), then a cosine decay reaching
    min_lr_ratio * lr at the last step, steps - 1. A warmup of `steps` or more is cut to steps - 1."""
    warmup = min(cfg.warmup, cfg.steps - 1)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    peak = max(warmup - 1, 0)  # the step that ran at lr
    progress = (step - peak) / max(1, cfg.steps - 1 - peak)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: matrices (and stacked experts) decay; norm gains and biases (1-D) do not, as in
    Megatron-LM and nanoGPT: decaying an RMSNorm gain pulls it toward 0, not toward its initial 1."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def _upgrade_optimizer_state(saved: dict[str, Any], model: torch.nn.Module,
                             optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A checkpoint from before `parameter_groups` holds one AdamW group over model.parameters(): re-index
    its per-parameter state into today's groups, so such a run still resumes."""
    if len(saved["param_groups"]) == len(optimizer.param_groups):
        return saved
    if len(saved["param_groups"]) != 1:
        raise TrainingError(f"the checkpoint's optimizer has {len(saved['param_groups'])} parameter groups; "
                            f"this version uses {len(optimizer.param_groups)}")
    old_order = list(model.parameters())
    new_index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    groups = optimizer.state_dict()["param_groups"]
    return {"state": {new_index[id(old_order[int(i)])]: v for i, v in saved["state"].items()},
            "param_groups": groups}


def train(cfg: TrainConfig, on_event: Callable[[dict[str, Any]], None] = lambda event: None,
          info: ParallelInfo = parallel.groups.SINGLE) -> dict[str, Any]:
    """Run (or resume) training; returns the final metrics record.

    Under torchrun, `info` places this process in the EP x DP grid: every rank builds the same full
    model, then its experts are sharded and each rank trains on its slice of every global batch
    (dsmoe.parallel). Only the main rank logs, reports events and writes checkpoints.
    """
    if cfg.ep != info.ep_size:
        raise ValueError(f"TrainConfig.ep={cfg.ep} but the process grid has ep_size={info.ep_size}: pass the "
                         "ParallelInfo that init_distributed(cfg.ep, ...) returned")
    if not info.is_main:
        on_event = lambda event: None  # noqa: E731 - one reporter per run
    # Settle the flags and the run directory first: a refused resume or an occupied --out fails before any
    # corpus work.
    settings, dropping = cfg.settings()
    _check_out_directory(cfg.out)
    state: dict[str, Any] = {"step": 0, "position": 0}
    # What is dropped depends on the resolved rule (--devices may come from the preset) and on the rows each
    # process caps, so a resumed run must have both unchanged to continue the same run.
    dropping_record = ({"rule": asdict(dropping), "protect": cfg.drop_protect, "processes": info.world_size}
                       if dropping is not None else None)
    if cfg.resume:
        ckpt_dir, state = _resume_state(cfg)
        if "dropping" in state and state["dropping"] != dropping_record:
            raise TrainingError(f"--resume: the run dropped tokens with {_describe_dropping(state['dropping'])}, "
                                f"this command would with {_describe_dropping(dropping_record)}: repeat its "
                                "--capacity-factor, --drop-level, --drop-protect, --devices and number of processes")
    elif (cfg.out / checkpoint.CURRENT).exists():
        raise TrainingError(f"{cfg.out} already holds a run: pass --resume to continue it or choose another --out")
    torch.manual_seed(cfg.seed)
    on_event({"event": "status", "message": "reading corpus"})
    docs = data.load_corpus(cfg.data)
    train_docs, val_docs = data.split_corpus(docs, seed=cfg.seed)
    model_config = get_preset(cfg.preset)
    vocab = cfg.vocab_size or model_config.vocab_size
    on_event({"event": "status", "message": f"tokenizer ({vocab} tokens)"})
    if not info.is_main:
        parallel.barrier(info)  # the main rank trains and caches the tokenizer; the others then read it
    tok = tokenizer.train_tokenizer(train_docs, vocab)
    if info.is_main:
        parallel.barrier(info)
    if cfg.resume and (ckpt_dir / "tokenizer.json").is_file() and \
            tokenizer.load_tokenizer(ckpt_dir).get_vocab() != tok.get_vocab():
        raise TrainingError(f"--resume: the corpus at --data {cfg.data} gives another tokenizer than the run in "
                            f"{cfg.out} was trained with (was --data changed?)")
    train_stream = data.encode_corpus(train_docs, tok)
    val_stream = data.encode_corpus(val_docs, tok)
    depth = model_config.num_nextn_predict_layers
    # Both splits must hold one window before the first step: the validation split otherwise fails only at
    # the first evaluation, possibly before any checkpoint.
    for split, stream, need in (("training", train_stream, cfg.seq_len + 1 + depth),
                                ("validation", val_stream, cfg.seq_len + 1)):
        if len(stream) < need:
            raise TrainingError(f"the {split} split of --data {cfg.data} has {len(stream)} tokens, fewer than one "
                                f"window of {need} (--seq-len {cfg.seq_len} + 1"
                                f"{f' + {depth} MTP' if split == 'training' and depth else ''}): add text or lower "
                                "--seq-len")
    model_config = model_config.replace(
        vocab_size=tok.get_vocab_size(),
        max_position_embeddings=max(model_config.max_position_embeddings, cfg.seq_len + depth + 1))

    if cfg.resume:
        model = load_pretrained(ckpt_dir, dtype=torch.float32).train()
    else:
        model = Transformer(model_config).train()
    if info.distributed:
        plan = parallel.shard_experts(model, info)
        parallel.broadcast_parameters(model, info)
        for warning in plan.warnings:
            on_event({"event": "status", "message": warning})
    my_rows = parallel.split_batch(torch.arange(cfg.batch_size), info)  # this rank's rows of each global batch
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    if cfg.resume:
        saved = _upgrade_optimizer_state(state["optimizer"], model, optimizer)
        if info.distributed:
            saved = parallel.shard_optimizer_state(saved, model, info, optimizer)
        optimizer.load_state_dict(saved)
        checkpoint.set_rng_state(state["rng"])
    log = (metrics.MetricsLog(cfg.out / "metrics.jsonl", truncate_after=state["step"] if cfg.resume else 0)
           if info.is_main else None)
    tokenizer_json = tok.to_str()
    on_event({"event": "start", "step": state["step"], "steps": cfg.steps,
              "params": sum(p.numel() for p in model.parameters()), "settings": asdict(settings)})

    position, record = state["position"], {}
    layers = model.moe_layers(include_mtp=True)
    dsa = model_config.uses_dsa
    for step in range(state["step"], cfg.steps):
        began = time.perf_counter()
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens, position = train_stream.shuffled_windows(position, cfg.batch_size, cfg.seq_len, depth, cfg.seed)
        tokens = parallel.split_batch(tokens, info)  # this rank's rows of the global batch
        if dropping is not None:
            model.set_token_dropping(dropping, protected_sequences(step * cfg.batch_size + my_rows, cfg.drop_protect))
        stage = indexer.stage_for(step, cfg.indexer_warmup_steps) if dsa else None
        if dsa:
            indexer.set_stage(model, stage)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
            losses = compute_losses(model, tokens, cfg.seq_len, settings, cfg.mtp_weight)
            if dsa:  # warm-up: the indexers' KL alone (all else frozen); sparse: added to the model's loss
                kl = indexer.indexer_loss(model)
                losses.total = kl if stage == indexer.WARMUP else losses.total + kl
        floats = losses.as_floats()
        if dsa:
            floats["indexer_loss"] = float(kl.detach())
        if dropping is not None:
            floats["dropped"] = dropped_fraction(model.moe_layers())
        values = parallel.mean_over_world(floats, info)  # every rank sees the same numbers
        if not math.isfinite(values["loss"]):
            raise TrainingError(f"loss became {values['loss']} at step {step + 1}; stopped. "
                                f"Last good checkpoint: {_describe_current(cfg.out)} (intact).")
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        parallel.all_reduce_gradients(model, info)
        if stage == indexer.WARMUP:
            indexer.drop_frozen_grads(model)
        grad_norm = parallel.clip_grad_norm(model, cfg.grad_clip, info)
        optimizer.step()
        loads = parallel.global_expert_loads(expert_loads(layers), info)
        if "aux_free" in settings.schemes and stage != indexer.WARMUP:  # routers are frozen in the warm-up
            update_biases(layers, loads, settings.bias_gamma)
        seconds = time.perf_counter() - began
        record = {"step": step + 1, **values, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens_per_s": cfg.batch_size * cfg.seq_len / seconds,
                  **_load_record(loads, len(model.moe_layers()))}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record["val_loss"] = evaluate(model, val_stream, cfg, info)
        if log is not None:
            log.write(record)
        on_event({"event": "step", **record})
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            _save(cfg, model, optimizer, info, tokenizer_json, step + 1, position, dropping_record)
            on_event({"event": "saved", "step": step + 1})
    if info.is_main:
        metrics.plot_run(cfg.out)
    on_event({"event": "done", **record})
    return record


def _save(cfg: TrainConfig, model: Transformer, optimizer: torch.optim.Optimizer, info: ParallelInfo,
          tokenizer_json: str, step: int, position: int, dropping: dict[str, Any] | None) -> None:
    """Every rank joins the gathering of expert shards; the main rank writes one full checkpoint, which
    any number of processes can resume from (the same number when tokens are dropped: `dropping`)."""
    full_model, full_optimizer = model, optimizer.state_dict()
    if info.distributed:
        full_model = parallel.unshard_experts(model, info)
        full_optimizer = parallel.full_optimizer_state(optimizer, model, info)
    if info.is_main:
        checkpoint.save_checkpoint(cfg.out, full_model, tokenizer_json, {
            "step": step, "position": position, "optimizer": full_optimizer,
            "rng": checkpoint.rng_state(), "train_config": _jsonable(asdict(cfg)), "dropping": dropping})
    parallel.barrier(info)


@torch.no_grad()
def evaluate(model: Transformer, stream: data.TokenStream, cfg: TrainConfig,
             info: ParallelInfo = parallel.groups.SINGLE) -> float:
    """Mean next-token loss over the first eval_batches windows of the validation split."""
    was_training = model.training
    model.eval()
    total, position = 0.0, 0
    for _ in range(cfg.eval_batches):
        tokens, position = stream.windows(position, cfg.batch_size, cfg.seq_len)
        tokens = parallel.split_batch(tokens, info)
        logits = model(tokens[:, :cfg.seq_len])
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:cfg.seq_len + 1].flatten()))
    model.train(was_training)
    return parallel.mean_over_world({"val": total / cfg.eval_batches}, info)["val"]


def _load_record(loads: list[torch.Tensor], main_layers: int) -> dict[str, Any]:
    """Per-layer expert load and MaxVio of the main model's MoE layers (MTP layers excluded)."""
    per_layer = [balance.load_metrics(load) for load in loads[:main_layers]]
    return {"expert_load": [load.tolist() for load in loads[:main_layers]],
            "max_vio": [m["max_vio"] for m in per_layer],
            "max_vio_mean": sum(m["max_vio"] for m in per_layer) / max(1, len(per_layer)),
            "dead_experts": sum(int(m["dead"]) for m in per_layer)}


def _resume_state(cfg: TrainConfig) -> tuple[Path, dict[str, Any]]:
    try:
        directory, state = checkpoint.load_checkpoint(cfg.out)
    except (FileNotFoundError, checkpoint.DamagedCheckpoint) as err:
        raise TrainingError(str(err)) from None
    saved = state.get("train_config", {})
    # The global batch and what a step computes must not change (--ep may: the result does not depend on it,
    # except through token dropping, checked by the caller).
    for name in ("preset", "batch_size", "seq_len", "seed", "capacity_factor", "drop_level", "drop_protect",
                 "indexer_warmup_steps"):
        if name in saved and saved[name] != _jsonable(getattr(cfg, name)):
            shown = lambda v: "(not given)" if v is None else v  # noqa: E731
            raise TrainingError(f"--resume with --{name.replace('_', '-')} {shown(getattr(cfg, name))}, but the "
                                f"run was started with {shown(saved[name])}")
    if state["step"] >= cfg.steps:
        raise TrainingError(f"{cfg.out} is already at step {state['step']} (--steps {cfg.steps}): nothing to do")
    return directory, state


def _check_out_directory(out: Path) -> None:
    """--out, or its nearest existing ancestor, must be a directory (refused before any corpus work)."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                raise TrainingError(f"--out {out}: {path} exists and is not a directory")
            return


def _describe_current(out: Path) -> str:
    current = out / checkpoint.CURRENT
    return str(current.resolve()) if current.exists() else "none was saved yet"


def _describe_dropping(record: dict[str, Any] | None) -> str:
    if record is None:
        return "no dropping"
    rule = record["rule"]
    per = f"device ({rule['devices']} devices)" if rule["level"] == "device" else "expert"
    processes = f"{record['processes']} process{'es' if record['processes'] > 1 else ''}"
    return f"capacity factor {rule['capacity_factor']} per {per}, {record['protect']} protected, {processes}"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))

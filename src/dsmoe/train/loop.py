"""The training loop: corpus -> tokenizer -> batches -> steps -> metrics and crash-safe checkpoints.

Library code: it reports through `on_event(dict)` callbacks and never prints; the CLI draws the progress.
A resumed run reproduces an uninterrupted one exactly: the checkpoint holds the fp32 weights (and the
routing biases), optimizer state, RNG states and the data position, and everything else is a function
of the step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import parallel
from ..checkpoint import load_pretrained
from ..config import ModelConfig
from ..model import Transformer
from ..ops.capacity import TokenDropping, protected_sequences
from ..parallel import ParallelInfo
from . import balance, checkpoint, data, indexer, metrics, model_source, run_record
from .errors import TrainingError
from .interrupt import StopRequest
from .placement import autocast, checkpoint_activations, make_optimizer, to_cpu, training_device
from .prepare import prepare_corpus
from .objective import BalanceSettings, compute_losses, dropped_fraction, expert_loads, update_biases


__all__ = ["TrainConfig", "TrainingError", "learning_rate", "parameter_groups", "train", "evaluate"]


@dataclass
class TrainConfig:
    preset: str = "tiny-v3"
    config: str | None = None  # a preset name or a config.json / checkpoint directory; None: `preset`
    overrides: dict[str, Any] = field(default_factory=dict)  # config.json keys set on top (--set)
    init: Path | None = None  # a Hugging Face checkpoint to fine-tune (weights, tokenizer, generation config)
    train_only: tuple[str, ...] = ()  # fnmatch patterns over parameter names; () = all
    freeze: tuple[str, ...] = ()
    steps: int = 800  # ~2.5 minutes on 2 quiet CPU cores
    seed: int = 0
    out: Path = Path("runs/tiny-v3")
    save_every: int = 200
    resume: bool = False
    data: Path | None = None  # None: the Python standard library's source; a folder, file or token shards
    data_field: str = "text"  # the text's field in a .jsonl / column in a .parquet
    strict_data: bool = False  # refuse a file that is not UTF-8 (default: skip it with a warning)
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
    # (step, lr) where a resume with another --steps re-anchored the cosine decay (None: the plain schedule)
    lr_anchor: tuple[int, float] | None = None
    # Where the steps run (cpu, cuda, cuda:N, auto); recorded, and may change on --resume (the result does not
    # depend on it beyond rounding). train/placement.py.
    device: str = "auto"
    checkpoint_activations: bool = False  # recompute each decoder block's activations in the backward pass

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name in ("train_only", "freeze"):  # "a,b" or ["a", "b"] -> ("a", "b")
            value = getattr(self, name)
            patterns = value.split(",") if isinstance(value, str) else value
            setattr(self, name, tuple(p.strip() for p in patterns if p.strip()))
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

    def model_config(self) -> ModelConfig:
        """The architecture: --init's config.json, else --config (or --preset) with --set applied, validated
        (ValueError naming the field)."""
        if self.init is not None:
            if self.overrides:
                raise ValueError(f"--set changes the architecture; --init {self.init} trains the checkpoint's own")
            if not Path(self.init).is_dir():
                if self.resume and (self.out / "config.json").is_file():  # the run's own copy will do
                    return ModelConfig.from_hf(self.out)
                raise ValueError(f"--init {self.init}: no such checkpoint directory")
            return ModelConfig.from_hf(self.init)
        return model_source.resolve_config(self.config or self.preset, self.overrides)

    @property
    def model_name(self) -> str:
        return str(self.init) if self.init is not None else (self.config or self.preset)

    def settings(self) -> tuple[BalanceSettings, TokenDropping | None]:
        """The balancing and dropping rules for this run's model, checked (ValueError naming the flag).
        Device-level dropping groups the experts into the balance settings' --devices."""
        config = self.model_config()
        if self.indexer_warmup_steps < 0 or (self.indexer_warmup_steps and not config.uses_dsa):
            raise ValueError(f"--indexer-warmup-steps {self.indexer_warmup_steps}: must be >= 0, and needs a model "
                             f"with DeepSeek Sparse Attention (V3.2; {self.model_name} is {config.model_type})")
        settings = BalanceSettings.paper_defaults(config, **self.balance)
        settings.check_model(config)
        if "aux_free" in settings.schemes and config.topk_method != "noaux_tc":  # only V3 routers have a bias
            raise ValueError("--balance aux_free needs a model whose routers have a correction bias "
                             f"(topk_method noaux_tc; {self.model_name} routes with {config.topk_method})")
        dropping = None
        if self.capacity_factor is not None:
            dropping = TokenDropping(self.capacity_factor, self.drop_level, settings.devices)
            dropping.check_experts(config.n_routed_experts)
        return settings, dropping


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup reaching lr at its last step (step 0 without warmup), then a cosine decay reaching
    min_lr_ratio * lr at the last step, steps - 1. A warmup of `steps` or more is cut to steps - 1.
    With `cfg.lr_anchor = (s, r)` (set when a resume changed --steps), steps from s on decay by a half cosine
    from r to the floor at the new last step, so the rate never jumps."""
    if cfg.lr_anchor is not None and step >= cfg.lr_anchor[0]:
        # --steps changed on resume at `start`: decay from the rate reached there to the floor at the new end
        start, rate = cfg.lr_anchor
        floor = cfg.min_lr_ratio * cfg.lr
        progress = (step - start) / max(1, cfg.steps - 1 - start)
        return floor + (rate - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
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
          info: ParallelInfo = parallel.groups.SINGLE, interruptible: bool = False,
          device: torch.device | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns the final metrics record.

    interruptible: a first Ctrl-C (SIGINT) during the steps finishes the current step, saves a checkpoint
    at it and raises KeyboardInterrupt (event "interrupted" first); a second one interrupts at once.
    Single-process runs only (the ranks of a torchrun job would have to agree on the step).

    Under torchrun, `info` places this process in the EP x DP grid: every rank builds the same full
    model, then its experts are sharded and each rank trains on its slice of every global batch
    (dsmoe.parallel). Only the main rank logs, reports events and writes checkpoints.

    device: where the model, batches, optimizer state and evaluation live (None: `cfg.device` resolved, with
    cuda:LOCAL_RANK for a bare `cuda` under torchrun). Checkpoints are written from CPU copies.
    TrainingError naming --device for a device this machine does not have.
    """
    if device is None:
        device = training_device(cfg.device, info.local_rank if info.distributed else None)
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
        cfg = _continue_schedule(cfg, state)
        if "dropping" in state and state["dropping"] != dropping_record:
            raise TrainingError(f"--resume: the run dropped tokens with {_describe_dropping(state['dropping'])}, "
                                f"this command would with {_describe_dropping(dropping_record)}: repeat its "
                                "--capacity-factor, --drop-level, --drop-protect, --devices and number of processes")
    elif (cfg.out / checkpoint.CURRENT).exists():
        raise TrainingError(f"{cfg.out} already holds a run: pass --resume to continue it or choose another --out")
    base_config = cfg.model_config()
    with_mtp = None
    if cfg.init is not None:
        with_mtp = model_source.checkpoint_has_mtp_dir(ckpt_dir if cfg.resume else cfg.init, base_config)
    elif base_config.model_type == "deepseek_v4":  # V4 builds its MTP only when asked (dsmoe.model.v4)
        with_mtp = base_config.num_nextn_predict_layers > 0
    sizes = model_source.meta_parameters(base_config, with_mtp)
    trainable = model_source.select_trainable([*sizes, *model_source.router_bias_names(base_config, with_mtp)], base_config,
                                              cfg.train_only, cfg.freeze)
    model_source.check_fits(cfg.model_name, sizes, trainable)
    torch.manual_seed(cfg.seed)
    depth = sum(1 for name in sizes if name.startswith("mtp.") and name.split(".", 2)[2] in ("eh_proj.weight",
                                                                                            "e_proj.weight"))
    corpus = prepare_corpus(cfg, base_config, info, on_event, ckpt_dir if cfg.resume else None, depth)
    if cfg.init is not None:
        model_config = base_config
        if cfg.seq_len + depth + 1 > model_config.max_position_embeddings:
            raise TrainingError(f"--seq-len {cfg.seq_len} (+ {depth + 1}) exceeds --init's max_position_embeddings "
                                f"{model_config.max_position_embeddings}")
    else:  # a new model: its embedding is the tokenizer's size, and config.json names the end-of-text id
        model_config = base_config.replace(
            vocab_size=corpus.tokenizer.get_vocab_size(), eos_token_id=corpus.eos_id,
            max_position_embeddings=max(base_config.max_position_embeddings, cfg.seq_len + depth + 1))

    on_event({"event": "status", "message": "building the model"})
    if cfg.resume:
        model = load_pretrained(ckpt_dir, dtype=torch.float32, device=device).train()
    elif cfg.init is not None:
        model = load_pretrained(cfg.init, dtype=torch.float32, device=device).train()
    else:  # initialised on the CPU (the same weights for a seed on every device), then moved
        model = Transformer(model_config, with_mtp=with_mtp).to(device).train()
    if cfg.checkpoint_activations:
        checkpoint_activations(model)
    n_trainable, n_params = model_source.apply_trainable(model, trainable)
    bias_names = {id(b): n for n, b in model.named_buffers() if n.endswith(".ffn.gate.bias")}
    if info.distributed:
        plan = parallel.shard_experts(model, info)
        parallel.broadcast_parameters(model, info)
        for warning in plan.warnings:
            on_event({"event": "status", "message": warning})
    # this rank's rows of each global batch
    my_rows = parallel.split_batch(torch.arange(cfg.batch_size, device=device), info)
    optimizer = make_optimizer(parameter_groups(model, cfg.weight_decay), cfg.lr, device)
    if cfg.resume:
        saved = _upgrade_optimizer_state(state["optimizer"], model, optimizer)
        if info.distributed:
            saved = parallel.shard_optimizer_state(saved, model, info, optimizer)
        optimizer.load_state_dict(saved)
        checkpoint.set_rng_state(state["rng"], device)
    log = (metrics.MetricsLog(cfg.out / "metrics.jsonl", truncate_after=state["step"] if cfg.resume else 0)
           if info.is_main else None)
    if cfg.resume:
        on_event({"event": "resumed", "step": state["step"], "checkpoint": str(ckpt_dir)})
    on_event({"event": "start", "step": state["step"], "steps": cfg.steps, "params": n_params,
              "trainable": n_trainable, "settings": asdict(settings)})

    layers = model.moe_layers(include_mtp=True)
    # the aux-loss-free bias moves only where --train-only / --freeze leave it trainable
    bias_layers = [moe for moe in layers if moe.gate.bias is not None and bias_names.get(id(moe.gate.bias)) in trainable]
    stop = StopRequest(on_event) if interruptible and not info.distributed else None
    try:
        record = _steps(cfg, on_event, info, state, model, optimizer, corpus, settings, dropping, dropping_record,
                        my_rows, log, layers, bias_layers, stop)
    finally:
        if stop is not None:
            stop.restore()
    if info.is_main:  # the run is complete and saved: a Ctrl-C from here on only stops the plots
        on_event({"event": "status", "message": "plotting"})
        metrics.plot_run(cfg.out)
    on_event({"event": "done", **record})
    return record


def _steps(cfg: TrainConfig, on_event: Callable[[dict[str, Any]], None], info: ParallelInfo, state: dict[str, Any],
           model: Transformer, optimizer: torch.optim.Optimizer, corpus: Any, settings: BalanceSettings,
           dropping: TokenDropping | None, dropping_record: dict[str, Any] | None, my_rows: torch.Tensor,
           log: metrics.MetricsLog | None, layers: list, bias_layers: list, stop: StopRequest | None
           ) -> dict[str, Any]:
    """The training steps from state["step"] to cfg.steps; returns the last record."""
    train_stream, val_stream = corpus.train, corpus.val
    depth = len(model.mtp)
    position, record = state["position"], {}
    dsa = model.config.uses_dsa
    device = my_rows.device  # the model's
    for step in range(state["step"], cfg.steps):
        began = time.perf_counter()
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens, position = train_stream.shuffled_windows(position, cfg.batch_size, cfg.seq_len, depth, cfg.seed)
        tokens = parallel.split_batch(tokens, info).to(device)  # this rank's rows of the global batch
        if dropping is not None:
            model.set_token_dropping(dropping, protected_sequences(step * cfg.batch_size + my_rows, cfg.drop_protect))
        stage = indexer.stage_for(step, cfg.indexer_warmup_steps) if dsa else None
        if dsa:
            indexer.set_stage(model, stage)
        with autocast(device, cfg.dtype):
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
        if "aux_free" in settings.schemes and bias_layers and stage != indexer.WARMUP:  # routers frozen in warm-up
            update_biases(bias_layers, [load for moe, load in zip(layers, loads) if moe in bias_layers],
                          settings.bias_gamma)
        seconds = time.perf_counter() - began
        record = {"step": step + 1, **values, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens_per_s": cfg.batch_size * cfg.seq_len / seconds,
                  **_load_record(loads, len(model.moe_layers()))}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record["val_loss"] = evaluate(model, val_stream, cfg, info)
        if log is not None:
            log.write(record)
        on_event({"event": "step", **record})
        interrupted = stop is not None and stop.requested
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or interrupted:
            _save(cfg, model, optimizer, info, corpus.files, step + 1, position, dropping_record)
            on_event({"event": "saved", "step": step + 1})
        if interrupted:
            on_event({"event": "interrupted", "step": step + 1})
            raise KeyboardInterrupt
    return record


def _save(cfg: TrainConfig, model: Transformer, optimizer: torch.optim.Optimizer, info: ParallelInfo,
          files: dict[str, bytes], step: int, position: int, dropping: dict[str, Any] | None) -> None:
    """Every rank joins the gathering of expert shards; the main rank writes one full checkpoint, which
    any number of processes can resume from (the same number when tokens are dropped: `dropping`)."""
    full_model, full_optimizer = model, optimizer.state_dict()
    device = next(model.parameters()).device
    if info.distributed:
        full_model = parallel.unshard_experts(model, info)
        full_optimizer = parallel.full_optimizer_state(optimizer, model, info)
    if info.is_main:
        checkpoint.save_checkpoint(cfg.out, full_model, files, {
            "step": step, "position": position, "optimizer": to_cpu(full_optimizer),
            "rng": checkpoint.rng_state(device), "train_config": run_record.record(cfg), "dropping": dropping})
        run_record.write_record(cfg.out, cfg)
    parallel.barrier(info)


@torch.no_grad()
def evaluate(model: Transformer, stream: data.TokenStream, cfg: TrainConfig,
             info: ParallelInfo = parallel.groups.SINGLE) -> float:
    """Mean next-token loss over the first eval_batches windows of the validation split."""
    was_training = model.training
    model.eval()
    total, position = 0.0, 0
    device = next(model.parameters()).device
    for _ in range(cfg.eval_batches):
        tokens, position = stream.windows(position, cfg.batch_size, cfg.seq_len)
        tokens = parallel.split_batch(tokens, info).to(device)
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
    saved = dict(state.get("train_config", {}))
    for name in run_record.PATH_SETTINGS:  # checkpoints from before run.json kept the paths as given
        saved[name] = run_record.absolute_path(saved.get(name))
    # Everything a step computes must match the run (--ep may change: the result does not depend on it,
    # except through token dropping, checked by the caller; the MUTABLE settings may change, reported).
    ours = run_record.record(cfg)
    for name in ours:
        # (balance: the CLI refuses a changed flag by name; a changed dropping rule is refused by the caller)
        if name in (*run_record.MUTABLE, "lr_anchor", "balance") or name not in saved or saved[name] == ours[name]:
            continue
        if name == "preset" and saved.get("config") is not None:
            continue
        shown = lambda v: "(not given)" if v is None else v  # noqa: E731
        raise TrainingError(f"--resume with {run_record.flag_of(name)} {shown(ours[name])}, but the run was "
                            f"started with {shown(saved[name])}")
    if state["step"] >= cfg.steps:
        raise TrainingError(f"{cfg.out} is already at step {state['step']} (--steps {cfg.steps}): nothing to do")
    return directory, state


def _continue_schedule(cfg: TrainConfig, state: dict[str, Any]) -> TrainConfig:
    """When --steps changed since the checkpoint, anchor the decay at the rate the old schedule had reached."""
    saved = state.get("train_config", {})
    old_steps = saved.get("steps", cfg.steps)
    if old_steps == cfg.steps:
        return replace(cfg, lr_anchor=tuple(saved["lr_anchor"]) if saved.get("lr_anchor") else cfg.lr_anchor)
    anchor = saved.get("lr_anchor")
    old = replace(cfg, steps=old_steps, lr_anchor=tuple(anchor) if anchor else None)
    return replace(cfg, lr_anchor=(state["step"], learning_rate(old, state["step"])))


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

"""`dsmoe train`: declare the flags (every default shown in --help), turn the ones given into a TrainConfig
(read back from the run's record on --resume), run the loop with a progress display."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..presets import PRESETS
from .common import CLIError, _fraction, _non_negative_float, _positive_float, _positive_int

# CLI dest -> the balance setting it overrides (BalanceSettings field)
_BALANCE = ("expert_alpha", "device_alpha", "comm_alpha", "seq_alpha", "mixtral_coef", "bias_gamma", "devices",
            "max_devices")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _patterns(text: str) -> tuple[str, ...]:
    patterns = tuple(p.strip() for p in text.split(",") if p.strip())
    if not patterns:
        raise argparse.ArgumentTypeError("expected comma-separated fnmatch patterns, e.g. 'mtp.*,*.gate.weight'")
    return patterns


def _add_train(sub: argparse._SubParsersAction) -> None:
    from ..ops.capacity import LEVELS
    from ..train.loop import TrainConfig
    from ..train.objective import SCHEMES, BalanceSettings

    d, b = TrainConfig(), BalanceSettings()
    p = sub.add_parser("train", help="train a model (default: tiny-v3 on the Python standard library)",
                       description="Train from scratch (--preset / --config, --set) or fine-tune a Hugging Face "
                                   "checkpoint (--init) on a built-in corpus (the Python standard library's source) "
                                   "or --data. Writes a Hugging Face-layout checkpoint, tokenizer.json, "
                                   "generation_config.json, metrics.jsonl and plots to --out. "
                                   "'dsmoe train --out DIR --resume' continues a run with its recorded settings.")

    def opt(flag: str, default: Any, help_: str = "", shown: str | None = None, **kw: Any) -> None:
        # default None: only the flags given are known as given (a resumed run keeps its recorded settings)
        shown = shown or ("none" if default in (None, (), {}) else default)
        p.add_argument(flag, default=None, help=f"{help_}{' ' if help_ else ''}(default: {shown})".replace("%", "%%"),
                       **kw)

    # the model
    opt("--preset", d.preset, "a named architecture", choices=sorted(PRESETS), metavar="NAME")
    opt("--config", None, "a preset name, a config.json or a checkpoint directory (Hub or transformers style); "
        "replaces --preset", metavar="FILE|PRESET")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                       help="override a config.json field, repeatable (e.g. --set num_hidden_layers=6 "
                            "--set n_routed_experts=64); values are JSON (default: none)")
    opt("--init", None, "fine-tune this Hugging Face checkpoint: its weights (FP8 dequantised), tokenizer.json, "
        "generation_config.json, routing biases and MTP modules", type=Path, metavar="DIR")
    opt("--train-only", None, "train only the parameters matching these comma-separated fnmatch patterns over "
        "dsmoe or Hub names, e.g. 'mtp.*' or '*.gate.weight'", type=_patterns, metavar="PATTERNS")
    opt("--freeze", None, "freeze the parameters matching these patterns, e.g. '*experts*'", type=_patterns,
        metavar="PATTERNS")
    # the run
    opt("--out", None, "run directory", shown="runs/NAME: the preset, config or --init folder's name", type=Path,
        metavar="DIR")
    p.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its last checkpoint with its recorded settings; only "
                          "--steps, --save-every, --eval-every, --ep, --device and --checkpoint-activations may change")
    opt("--steps", d.steps, type=_positive_int, metavar="N")
    opt("--seed", d.seed, type=int, metavar="S")
    opt("--save-every", d.save_every, "checkpoint every K steps; the newest 2 are kept", type=_positive_int,
        metavar="K")
    opt("--eval-every", d.eval_every, "validation loss every K steps", type=_positive_int, metavar="K")
    opt("--data", None, "a folder of .txt/.py/.md files, one such file, a .jsonl, a .parquet, or token shards "
        "from dsmoe tokenize (streamed from disk)", shown="the Python standard library's source", type=Path, metavar="PATH")
    opt("--field", "text", "the text's field in a .jsonl, or column in a .parquet", dest="data_field",
        metavar="NAME")
    p.add_argument("--strict-data", action="store_true", default=None,
                   help="refuse a file that is not valid UTF-8 (default: skip it with a warning naming it)")
    opt("--batch-size", d.batch_size, type=_positive_int, metavar="B")
    opt("--seq-len", d.seq_len, type=_positive_int, metavar="T")
    opt("--vocab-size", None, "tokenizer size trained for a new model", shown="the config's vocab_size",
        type=_positive_int, metavar="V")
    opt("--lr", d.lr, "peak learning rate", type=_positive_float, metavar="LR")
    opt("--warmup", d.warmup, "linear warmup steps, then a cosine decay", type=_non_negative_int, metavar="N")
    opt("--min-lr-ratio", d.min_lr_ratio, "final learning rate / --lr", type=_fraction, metavar="R")
    opt("--weight-decay", d.weight_decay, type=_non_negative_float, metavar="WD")
    opt("--dtype", d.dtype, "bf16: autocast over fp32 master weights", choices=("fp32", "bf16"))
    opt("--device", d.device, "where to train: cpu, cuda, cuda:N or auto (cuda if available, else cpu); under "
        "torchrun a bare cuda is cuda:LOCAL_RANK and the ranks talk over NCCL", metavar="DEVICE")
    p.add_argument("--checkpoint-activations", action="store_true", default=None,
                   help="recompute each decoder block's activations in the backward pass: less memory, about "
                        "one more forward per step (default: off)")
    opt("--mtp-weight", d.mtp_weight, "weight of the multi-token-prediction loss (V3)", type=_non_negative_float,
        metavar="LAMBDA")
    opt("--ep", 1, "expert-parallel ranks; under torchrun with N processes, N = E x data-parallel ranks",
        type=_positive_int, metavar="E")
    # load balancing and token dropping
    p.add_argument("--balance", default=None, metavar="LIST",
                     help=f"comma-separated balancing schemes from {', '.join(SCHEMES)} "
                          "(default: what the model's paper used)")
    for name, help_, default in (("expert-alpha", "expert-level loss weight", b.expert_alpha),
                                 ("device-alpha", "device-level loss weight", b.device_alpha),
                                 ("comm-alpha", "communication loss weight", b.comm_alpha),
                                 ("seq-alpha", "sequence-wise loss weight", b.seq_alpha),
                                 ("mixtral-coef", "Mixtral aux loss weight (default: the config's, else 0.02)", None),
                                 ("bias-gamma", "aux-loss-free bias step", b.bias_gamma)):
        shown = "" if default is None else \
            " (default: the config's aux_loss_alpha, else 0.001; V2 with groups: 0.003)" if name == "expert-alpha" \
            else f" (default: {default})"
        p.add_argument(f"--{name}", type=_non_negative_float, default=None, metavar="X", help=help_ + shown)
    p.add_argument("--devices", type=_positive_int, default=None, metavar="D",
                     help="simulated devices for the device / communication losses and --drop-level device "
                          "(default: V2's n_group, else 1)")
    p.add_argument("--max-devices", type=_positive_int, default=None, metavar="M",
                     help="devices a token may reach (communication loss) (default: V2's topk_group, else 1)")
    opt("--capacity-factor", None, "drop (token, expert) pairs past CF x the average load of an expert or device, "
        "in training only (DeepSeek-V2: 1.0 with --drop-level device)", shown="none, no dropping", type=_positive_float,
        metavar="CF")
    opt("--drop-level", d.drop_level, "what a capacity applies to: each expert, or each of --devices groups",
        choices=LEVELS)
    opt("--indexer-warmup-steps", d.indexer_warmup_steps, "V3.2: the first N steps train only the lightning "
        "indexers (dense attention, KL to the main attention), then the whole model trains sparse",
        type=_non_negative_int, metavar="N")
    opt("--drop-protect", d.drop_protect, "share of the run's sequences that are never dropped (0.1: every 10th; "
        "DeepSeek-V2: about 10%)", type=_fraction, metavar="F")
    p.set_defaults(run=_run_train)


_FIELDS = ("preset", "config", "init", "train_only", "freeze", "out", "steps", "seed", "save_every", "eval_every",
           "data", "data_field", "strict_data", "batch_size", "seq_len", "vocab_size", "lr", "warmup", "min_lr_ratio",
           "weight_decay", "dtype", "device", "checkpoint_activations",
           "mtp_weight", "ep", "capacity_factor", "drop_level", "drop_protect", "indexer_warmup_steps")


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """TrainConfig field -> value for the flags present on the command line (balance settings as a dict)."""
    from ..train.model_source import parse_overrides

    given = {name: getattr(args, name) for name in _FIELDS if getattr(args, name) is not None}
    if args.set is not None:
        given["overrides"] = parse_overrides(args.set)
    balance = {key: getattr(args, key) for key in _BALANCE if getattr(args, key) is not None}
    if args.balance is not None:
        balance["schemes"] = tuple(s.strip() for s in args.balance.split(",") if s.strip())
    if balance:
        given["balance"] = balance
    if "preset" in given and "config" in given:
        raise CLIError("--preset and --config both name the architecture: give one")
    if "preset" in given:  # one spelling of the architecture in the record
        given["config"] = given.pop("preset")
    if "init" in given and "config" in given:
        raise CLIError("--init trains the checkpoint's own architecture: drop --preset / --config")
    return given


def build_config(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The run's TrainConfig and, on --resume, the notes on what this command changes. The default --out is
    runs/NAME (NAME: the preset, the config file's folder or the --init checkpoint's folder)."""
    from ..train.loop import TrainConfig

    given = given_settings(args)
    if "out" not in given:
        name = given.get("init") or given.get("config") or TrainConfig.preset
        path = Path(str(name))
        label = name if name in PRESETS else path.parent.name if path.suffix == ".json" else path.name
        given["out"] = Path("runs") / (label or "run")
    if not args.resume:
        return TrainConfig(**given), []
    return _resumed(given)


def _resumed(given: dict[str, Any]) -> tuple[Any, list[str]]:
    from ..train import run_record

    recorded = run_record.read_record(given["out"])
    merged, notes = run_record.merge_for_resume(recorded, given)
    merged["resume"] = True
    return run_record.config_from_record(merged), notes


def _finished_run(cfg: Any, given: dict[str, Any]) -> int | None:
    """The step of the finished run already in cfg.out when this command (without --resume) asks for exactly
    that run, so a documented command can be run twice; None otherwise (the loop then refuses an occupied
    --out or continues a --resume)."""
    from ..train import checkpoint, run_record

    current = cfg.out / checkpoint.CURRENT
    if cfg.resume or not current.exists():
        return None
    try:
        merged, notes = run_record.merge_for_resume(run_record.read_record(cfg.out), given)
        step = int(current.resolve().name.removeprefix("step-"))
    except (run_record.TrainingError, ValueError):
        return None
    return step if not notes and step >= merged["steps"] else None


def _run_train(args: argparse.Namespace) -> int:
    import os

    from .. import parallel
    from ..train.data import DataError
    from ..train.loop import TrainingError, train
    from ..train.placement import training_device
    from .train_console import Console

    try:
        cfg, notes = build_config(args)
        config = cfg.model_config()
        finished = _finished_run(cfg, given_settings(args))
    except (TrainingError, DataError) as err:
        raise CLIError(str(err)) from None
    if finished is not None:
        print(f"{cfg.out} already holds this run, finished at step {finished}: nothing to do (--resume --steps N "
              "trains it longer; another --out starts a new run)", file=sys.stderr)
        return 0
    try:
        device = training_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    except TrainingError as err:
        raise CLIError(str(err)) from None
    info = parallel.init_distributed(cfg.ep, config.n_routed_experts,
                                     backend="nccl" if device.type == "cuda" else "gloo")
    console = Console(cfg, quiet=not info.is_main)
    for note in notes:
        console.line(f"--resume: {note}")
    try:
        with console:
            final = train(cfg, console.on_event, info, interruptible=True, device=device)
    except (TrainingError, DataError) as err:
        raise CLIError(str(err)) from None
    except KeyboardInterrupt:
        console.close()
        step = console.saved_step
        if step is not None and step >= cfg.steps and info.is_main:
            print(f"dsmoe: interrupted while plotting; the run is complete at step {step} "
                  f"(dsmoe plot {cfg.out} draws the plots)", file=sys.stderr)
            raise SystemExit(130) from None
        if step is not None and info.is_main:
            print(f"dsmoe: interrupted; step {step} is saved: continue with dsmoe train --out {cfg.out} --resume",
                  file=sys.stderr)
            raise SystemExit(130) from None
        raise
    finally:
        parallel.destroy()
    if not info.is_main:
        return 0
    val = final.get("val_loss")
    print(f"done: step {final['step']}, loss {final['lm_loss']:.3f}"
          f"{'' if val is None else f', val {val:.3f}'}; checkpoint, metrics.jsonl and plots in {cfg.out}",
          file=sys.stderr)
    return 0

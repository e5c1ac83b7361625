"""`dsmoe train`: the training loop with a progress display."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..presets import PRESETS, get_preset
from .common import CLIError, _fraction, _non_negative_float, _positive_float, _positive_int

# ---------------------------------------------------------------------------------------------- train

def _add_train(sub: argparse._SubParsersAction) -> None:
    from ..ops.capacity import LEVELS
    from ..train.loop import TrainConfig
    from ..train.objective import SCHEMES

    d = TrainConfig()
    p = sub.add_parser("train", help="train a model (default: tiny-v3 on the Python standard library)",
                       description="Train on a built-in corpus (the Python standard library's source) or --data. "
                                   "Writes a Hugging Face-layout checkpoint, tokenizer.json, metrics.jsonl and "
                                   "plots to --out; --resume continues from the last checkpoint.")
    p.add_argument("--preset", default=d.preset, choices=sorted(PRESETS))
    p.add_argument("--steps", type=_positive_int, default=d.steps, metavar="N")
    p.add_argument("--seed", type=int, default=d.seed, metavar="S")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="run directory (default runs/PRESET)")
    p.add_argument("--save-every", type=_positive_int, default=d.save_every, metavar="K")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--data", type=Path, default=None, metavar="PATH",
                   help="folder of .txt/.py/.md files or a .jsonl with a 'text' field")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size, metavar="B")
    p.add_argument("--seq-len", type=_positive_int, default=d.seq_len, metavar="T")
    p.add_argument("--lr", type=float, default=d.lr, metavar="LR")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=d.dtype)
    p.add_argument("--eval-every", type=_positive_int, default=d.eval_every, metavar="K")
    p.add_argument("--mtp-weight", type=_non_negative_float, default=d.mtp_weight, metavar="LAMBDA",
                   help="weight of the multi-token-prediction loss (V3 presets)")
    p.add_argument("--balance", default=None, metavar="LIST",
                   help=f"comma-separated balancing schemes from {', '.join(SCHEMES)} "
                        "(default: what the model's paper used)")
    for name, help_ in (("expert-alpha", "expert-level loss weight"), ("device-alpha", "device-level loss weight"),
                        ("comm-alpha", "communication loss weight"), ("seq-alpha", "sequence-wise loss weight"),
                        ("mixtral-coef", "Mixtral aux loss weight"), ("bias-gamma", "aux-loss-free bias step")):
        p.add_argument(f"--{name}", type=_non_negative_float, default=None, metavar="X", help=help_)
    p.add_argument("--devices", type=_positive_int, default=None, metavar="D",
                   help="simulated devices for the device / communication losses and --drop-level device")
    p.add_argument("--max-devices", type=_positive_int, default=None, metavar="M",
                   help="devices a token may reach (communication loss)")
    p.add_argument("--capacity-factor", type=_positive_float, default=None, metavar="CF",
                   help="drop (token, expert) pairs past CF x the average load of an expert or device, in "
                        "training only (default: no dropping; DeepSeek-V2: 1.0 with --drop-level device)")
    p.add_argument("--drop-level", choices=LEVELS, default=d.drop_level,
                   help="what a capacity applies to: each expert, or each of --devices groups of experts")
    p.add_argument("--drop-protect", type=_fraction, default=d.drop_protect, metavar="F",
                   help="share of the run's sequences that are never dropped (0.1: every 10th; DeepSeek-V2: "
                        "about 10%%)")
    p.add_argument("--indexer-warmup-steps", type=int, default=d.indexer_warmup_steps, metavar="N",
                   help="V3.2 presets: first N steps train only the lightning indexers (dense attention, KL to the "
                        "main attention), then sparse training of the whole model (default 0)")
    p.add_argument("--ep", type=_positive_int, default=1, metavar="E",
                   help="expert-parallel ranks; under torchrun with N processes, N = E x data-parallel ranks")
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .. import parallel
    from ..train.data import DataError
    from ..train.loop import TrainConfig, TrainingError, train

    overrides = {key: getattr(args, key) for key in ("expert_alpha", "device_alpha", "comm_alpha", "seq_alpha",
                                                      "mixtral_coef", "bias_gamma", "devices", "max_devices")}
    if args.balance is not None:
        overrides["schemes"] = tuple(s.strip() for s in args.balance.split(",") if s.strip())
    cfg = TrainConfig(preset=args.preset, steps=args.steps, seed=args.seed,
                      out=args.out or Path("runs") / args.preset, save_every=args.save_every, resume=args.resume,
                      data=args.data, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      dtype=args.dtype, eval_every=args.eval_every, mtp_weight=args.mtp_weight, balance=overrides,
                      ep=args.ep, capacity_factor=args.capacity_factor, drop_level=args.drop_level,
                      drop_protect=args.drop_protect, indexer_warmup_steps=args.indexer_warmup_steps)
    info = parallel.init_distributed(args.ep, get_preset(args.preset).n_routed_experts)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                        TimeRemainingColumn(), console=Console(stderr=True, quiet=not info.is_main),
                        transient=True, disable=not (sys.stderr.isatty() and info.is_main))  # live bar: a terminal
    task = progress.add_task("preparing", total=cfg.steps, info="")

    def on_event(event: dict) -> None:
        kind = event["event"]
        if kind == "status":
            progress.update(task, description=event["message"])
        elif kind == "start":
            progress.update(task, description="training", completed=event["step"],
                            info=f"{event['params'] / 1e6:.1f}M params")
        elif kind == "step":
            val = f"  val {event['val_loss']:.3f}" if "val_loss" in event else ""
            dropped = f"  dropped {event['dropped']:.1%}" if "dropped" in event else ""
            progress.update(task, completed=event["step"], info=(
                f"loss {event['loss']:.3f}{val}  maxvio {event['max_vio_mean']:.2f}{dropped}  "
                f"{event['tokens_per_s']:,.0f} tok/s"))
            if "val_loss" in event:  # a permanent line per evaluation, above the live bar
                progress.console.print(f"step {event['step']:>5}  loss {event['loss']:.4f}  "
                                       f"val {event['val_loss']:.4f}  maxvio {event['max_vio_mean']:.2f}{dropped}")

    try:
        with progress:
            final = train(cfg, on_event, info)
    except (TrainingError, DataError) as err:
        raise CLIError(str(err)) from None
    finally:
        parallel.destroy()
    if not info.is_main:
        return 0
    print(f"done: step {final['step']}, loss {final['loss']:.3f}, val {final.get('val_loss', float('nan')):.3f}; "
          f"checkpoint, metrics.jsonl and plots in {cfg.out}", file=sys.stderr)
    return 0

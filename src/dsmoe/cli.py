"""The `dsmoe` command. The only module that prints.

Each subcommand is a `_add_<name>(subparsers)` function that declares its arguments and sets `run`;
adding one is a new function and one line in `build_parser`. Expected failures (bad input, missing
files, invalid configs) print one line `dsmoe: error: <message>` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from .calc import DEFAULT_CONTEXT, ArchStats, arch_stats, format_bytes, format_count
from .config import ModelConfig
from .presets import PRESETS, get_preset

PROG = "dsmoe"
EXIT_USAGE = 2


class CLIError(Exception):
    """An expected failure: reported as one line, no traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see '{self.prog} --help')")


def _fail(message: str) -> NoReturn:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


# ---------------------------------------------------------------------------------------------- helpers

def load_config(spec: str) -> ModelConfig:
    """A preset name, or a checkpoint directory / config.json path (read with ModelConfig.from_hf)."""
    if spec in PRESETS:
        return get_preset(spec)
    path = Path(spec)
    if not path.exists():
        raise CLIError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing directory")
    try:
        return ModelConfig.from_hf(path)
    except (ValueError, OSError) as err:
        raise CLIError(str(err)) from None
    except (TypeError, AttributeError, KeyError) as err:
        # A config.json of the wrong shape (a list, a string where an object belongs, ...).
        raise CLIError(f"{spec}: not a usable config.json ({type(err).__name__}: {err})") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# ---------------------------------------------------------------------------------------------- info

def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameters, KV cache and FLOPs of a model",
                       description="Closed-form architecture figures: total / activated / MTP parameters, "
                                   "KV cache per token against an MHA model of the same heads, forward FLOPs.")
    p.add_argument("model", metavar="PRESET_OR_DIR",
                   help=f"a preset ({', '.join(PRESETS)}) or a directory with config.json")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--seq-len", type=_positive_int, default=DEFAULT_CONTEXT, metavar="N",
                   help=f"context length for the attention FLOPs (default {DEFAULT_CONTEXT})")
    p.add_argument("--ep", type=_positive_int, default=None, metavar="N",
                   help="also plan N-way expert parallelism: per-rank parameters and memory, all-to-all bytes")
    p.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from .parallel import ep_plan

    config = load_config(args.model)
    stats = arch_stats(config, context=args.seq_len)
    plan = ep_plan(config, args.ep) if args.ep else None
    if args.json:
        out = {"model": args.model, **dataclasses.asdict(stats)}
        if plan is not None:
            out["ep"] = plan
        print(json.dumps(out, indent=2))
    else:
        _print_info(args.model, config, stats)
        if plan is not None:
            _print_ep_plan(plan)
    return 0


def _print_ep_plan(plan: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"expert parallel over {plan['ep']} ranks", show_header=False, title_justify="left")
    table.add_column("figure", style="bold")
    table.add_column("value", justify="right")
    table.add_row("experts per rank (each MoE layer)", str(plan["experts_per_rank"]))
    table.add_row("parameters per rank", f"{_count(plan['params_per_rank'])}  "
                  f"(replicated {format_count(plan['replicated_params'])} + experts "
                  f"{format_count(plan['expert_params_per_rank'])})")
    table.add_row("weights per rank (bf16)", format_bytes(plan["weight_bytes_per_rank"]))
    table.add_row("training state per rank", f"{format_bytes(plan['train_bytes_per_rank'])}  "
                  "(fp32 weights, grads and two Adam moments)")
    table.add_row("ranks a token reaches", f"{plan['expected_ranks_per_token']:.2f} expected, "
                  f"{plan['max_ranks_per_token']} at most")
    table.add_row("all-to-all / token / MoE layer", f"{format_bytes(plan['alltoall_bytes_per_token_per_layer'])} "
                  f"expected, {format_bytes(plan['alltoall_bytes_per_token_per_layer_max'])} at most (dispatch + combine)")
    table.add_row("all-to-all / token, all layers", format_bytes(plan["alltoall_bytes_per_token_total"]))
    table.caption = plan["routing_mapping"] + "".join(f"\nwarning: {w}" for w in plan["warnings"])
    Console().print(table)


def _count(n: int) -> str:
    return f"{format_count(n)}  ({n:,})"


def _print_info(name: str, config: ModelConfig, s: ArchStats) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{name}  ({config.model_type})", show_header=False, title_justify="left")
    table.add_column("figure", style="bold")
    table.add_column("value", justify="right")
    moe = (f"{config.n_routed_experts} routed ({config.num_experts_per_tok} active) + "
           f"{config.n_shared_experts} shared" if config.is_moe else "dense")
    table.add_row("layers", f"{s.num_layers} ({s.num_layers - s.num_moe_layers} dense, {s.num_moe_layers} MoE)")
    table.add_row("experts per MoE layer", moe)
    table.add_row("attention", "MLA" if config.uses_mla else
                  f"GQA ({config.num_attention_heads} heads, {config.kv_heads} kv heads)")
    table.add_row("total parameters", _count(s.total_params))
    table.add_row("activated per token", f"{_count(s.activated_params)}  "
                  f"{100 * s.activated_params / s.total_params:.1f}%")
    table.add_row("  without embedding", _count(s.activated_nonembedding_params))
    table.add_row("embedding", _count(s.embedding_params) + ("  tied to head" if config.tie_word_embeddings else ""))
    if config.num_nextn_predict_layers:
        table.add_row(f"MTP modules ({config.num_nextn_predict_layers})",
                      _count(s.mtp_params))
    if s.checkpoint_numel != s.total_params:
        table.add_row("checkpoint tensors", _count(s.checkpoint_numel))
    table.add_row("KV cache / token", f"{s.kv_cache_per_token:,} elements  "
                  f"{format_bytes(s.kv_cache_bytes_per_token)} bf16")
    table.add_row("  MHA equivalent", f"{s.mha_kv_cache_per_token:,} elements  "
                  f"{format_bytes(s.mha_kv_cache_bytes_per_token)} bf16")
    table.add_row("  ratio", "1.0x (this is MHA)" if s.kv_cache_ratio == 1 else
                  f"{s.kv_cache_ratio:.1f}x smaller  ({100 * (1 - 1 / s.kv_cache_ratio):.1f}% less)")
    table.add_row(f"forward FLOPs / token @ {s.context_length}", f"{format_count(s.flops_per_token)}  "
                  f"(matmul {format_count(s.matmul_flops_per_token)}, "
                  f"attention {format_count(s.attention_flops_per_token)})")
    if config.num_nextn_predict_layers:
        table.caption = ("MTP modules share the embedding and output head with the main model (counted 0); "
                         "checkpoint tensors add the Hub's per-module copies of both and the router biases.")
    elif s.router_bias_numel:
        table.caption = "checkpoint tensors add the router correction biases (buffers, not parameters)."
    Console().print(table)


# ---------------------------------------------------------------------------------------------- generate

def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream text from a checkpoint directory",
                       description="Generate text with a Hugging Face-layout checkpoint and its tokenizer.json. "
                                   "Text streams to stdout; tokens/s goes to stderr at the end.")
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (config.json, "
                   "*.safetensors, tokenizer.json)")
    p.add_argument("--prompt", required=True, metavar="TEXT")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128, metavar="N")
    p.add_argument("--temperature", type=_non_negative_float, default=0.0, metavar="T",
                   help="0 = greedy (default)")
    p.add_argument("--top-k", type=_positive_int, default=None, metavar="K")
    p.add_argument("--top-p", type=float, default=None, metavar="P")
    p.add_argument("--seed", type=int, default=None, metavar="S")
    p.add_argument("--speculative", action="store_true",
                   help="greedy decoding with the MTP module drafting one token ahead (DeepSeek-V3)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="parameter dtype (default: the checkpoint's)")
    p.add_argument("--ep", type=_positive_int, default=1, metavar="N",
                   help="shard the routed experts over N processes (launch with torchrun --nproc_per_node N)")
    p.set_defaults(run=_run_generate)


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def load_tokenizer(directory: Path):
    from tokenizers import Tokenizer

    path = directory / "tokenizer.json"
    if not path.is_file():
        raise CLIError(f"{path}: no tokenizer.json in the model directory")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises its own exception type for malformed files
        raise CLIError(f"{path}: not a usable tokenizer ({err})") from None


def _run_generate(args: argparse.Namespace) -> int:
    import time

    import torch

    from . import parallel
    from .checkpoint import load_pretrained
    from .generate import GenerationStats, stream

    if args.speculative and args.temperature != 0:
        raise CLIError("--speculative decodes greedily: leave --temperature at 0")
    if args.speculative and args.ep > 1:
        raise CLIError("--speculative is not supported with --ep")
    directory = Path(args.model)
    if not directory.is_dir():
        raise CLIError(f"{directory}: no such model directory")
    tokenizer = load_tokenizer(directory)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    model = load_pretrained(directory, dtype=dtype)
    info = parallel.init_distributed(args.ep, model.config.n_routed_experts)
    sync = None
    if info.distributed:
        parallel.shard_experts(model, info)
        sync = lambda t: parallel.broadcast_from_main(t, info)  # noqa: E731
    out = sys.stdout if info.is_main else open(os.devnull, "w")
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise CLIError("the prompt encodes to no tokens")
    eos = model.config.eos_token_id
    if eos is None:
        eos = tokenizer.token_to_id("<|endoftext|>")
    stats = GenerationStats()
    began = time.perf_counter()
    new: list[int] = []
    shown = ""
    for tokens in stream(model, torch.tensor([ids]), args.max_new_tokens, args.temperature, args.top_k,
                         args.top_p, eos, args.seed, args.speculative, stats, sync):
        new += tokens[0].tolist()
        # Decode everything so far and print the new suffix: byte-level BPE tokens can split a
        # multi-byte character, which decodes to U+FFFD until its last byte arrives.
        text = tokenizer.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd") and text.startswith(shown):
            out.write(text[len(shown):])
            out.flush()
            shown = text
    text = tokenizer.decode(new, skip_special_tokens=True)
    out.write(text[len(shown):] + "\n")
    elapsed = time.perf_counter() - began
    line = f"{len(new)} tokens in {elapsed:.2f}s: {stats.tokens_per_s:.1f} tokens/s"
    if args.speculative:
        line += f", MTP draft acceptance {100 * stats.acceptance_rate:.0f}% ({stats.accepted}/{stats.drafted})"
    if info.is_main:
        print(line, file=sys.stderr)
    parallel.destroy()
    return 0


# ---------------------------------------------------------------------------------------------- train

def _add_train(sub: argparse._SubParsersAction) -> None:
    from .train.loop import TrainConfig
    from .train.objective import SCHEMES

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
                   help="simulated devices for the device / communication losses")
    p.add_argument("--max-devices", type=_positive_int, default=None, metavar="M",
                   help="devices a token may reach (communication loss)")
    p.add_argument("--ep", type=_positive_int, default=1, metavar="E",
                   help="expert-parallel ranks; under torchrun with N processes, N = E x data-parallel ranks")
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from . import parallel
    from .train.data import DataError
    from .train.loop import TrainConfig, TrainingError, train

    overrides = {key: getattr(args, key) for key in ("expert_alpha", "device_alpha", "comm_alpha", "seq_alpha",
                                                      "mixtral_coef", "bias_gamma", "devices", "max_devices")}
    if args.balance is not None:
        overrides["schemes"] = tuple(s.strip() for s in args.balance.split(",") if s.strip())
    cfg = TrainConfig(preset=args.preset, steps=args.steps, seed=args.seed,
                      out=args.out or Path("runs") / args.preset, save_every=args.save_every, resume=args.resume,
                      data=args.data, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      dtype=args.dtype, eval_every=args.eval_every, mtp_weight=args.mtp_weight, balance=overrides,
                      ep=args.ep)
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
            progress.update(task, completed=event["step"], info=(
                f"loss {event['loss']:.3f}{val}  maxvio {event['max_vio_mean']:.2f}  "
                f"{event['tokens_per_s']:,.0f} tok/s"))
            if "val_loss" in event:  # a permanent line per evaluation, above the live bar
                progress.console.print(f"step {event['step']:>5}  loss {event['loss']:.4f}  "
                                       f"val {event['val_loss']:.4f}  maxvio {event['max_vio_mean']:.2f}")

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


# ---------------------------------------------------------------------------------------------- bench

def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="forward, training step and decode throughput against transformers",
                       description="Build a random DeepSeek-V3-shaped model (about 90M parameters) in transformers, "
                                   "load the same weights into dsmoe, and time both in one process, interleaved: "
                                   "forward and training-step tokens/s, greedy decode tokens/s, peak memory, and "
                                   "dsmoe's forward FLOP/s against a measured matmul. Needs transformers.")
    p.add_argument("--quick", action="store_true", help="fewer repeats; decode at batch 1, context 256 only")
    p.add_argument("--json", action="store_true", help="print the full results as one JSON object on stdout")
    p.add_argument("--dtype", choices=("fp32", "bf16", "both"), default="fp32")
    p.add_argument("--seq-len", type=_positive_int, default=512, metavar="T", help="forward / train length")
    p.add_argument("--batch-size", type=_positive_int, default=4, metavar="B", help="forward / train batch")
    p.add_argument("--repeats", type=_positive_int, default=None, metavar="N",
                   help="timed rounds per measurement (default 3, --quick 2)")
    p.add_argument("--new-tokens", type=_positive_int, default=8, metavar="N", help="decode steps timed")
    p.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .bench import BenchConfig, TransformersMissing, run_bench

    dtypes = ("fp32", "bf16") if args.dtype == "both" else (args.dtype,)
    overrides = dict(dtypes=dtypes, seq_len=args.seq_len, batch_size=args.batch_size, new_tokens=args.new_tokens)
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
    cfg = BenchConfig.quick(**overrides) if args.quick else BenchConfig(**overrides)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), console=Console(stderr=True), transient=True,
                        disable=not sys.stderr.isatty())
    task = progress.add_task("bench", total=None)
    try:
        with progress:
            result = run_bench(cfg, lambda what, done, total: progress.update(task, description=what,
                                                                               completed=done, total=total))
    except TransformersMissing as err:
        raise CLIError(str(err)) from None
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_bench(result)
    return 0


def _print_bench(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m, mach = result["model"], result["machine"]
    console = Console()
    table = Table(title=f"dsmoe vs transformers: DeepSeek-V3 shape, {format_count(m['total_params'])} params "
                        f"({format_count(m['activated_params'])} activated), torch {mach['torch']}, "
                        f"{mach['threads']} threads", title_justify="left")
    for col in ("measurement", "dtype", "shape", "dsmoe tok/s", "transformers tok/s", "ratio",
                "dsmoe peak RSS", "transformers peak RSS"):
        table.add_column(col, justify="left" if col in ("measurement", "dtype", "shape") else "right")
    mem = lambda b: "n/a" if b is None else format_bytes(b)  # noqa: E731
    for r in result["rows"]:
        table.add_row(r["measurement"], r["dtype"], r["shape"], f"{r['dsmoe']['tokens_per_s']:,.1f}",
                      f"{r['transformers']['tokens_per_s']:,.1f}", f"{r['ratio']:.2f}x",
                      mem(r["dsmoe"]["peak_rss_bytes"]), mem(r["transformers"]["peak_rss_bytes"]))
    console.print(table)
    for r in result["rows"]:
        if r["measurement"] == "forward":
            peak = result["matmul_peak_flops"][r["dtype"]]
            console.print(f"{r['dtype']} forward: dsmoe {r['dsmoe_flops_per_s'] / 1e9:.1f} GFLOP/s = "
                          f"{100 * r['dsmoe_peak_fraction']:.0f}% of the measured matmul peak {peak / 1e9:.1f} GFLOP/s "
                          f"(transformers {r['transformers_flops_per_s'] / 1e9:.1f} GFLOP/s)")
    for dname, by_kind in result["experts_implementation"].items():
        for kind in ("forward", "train"):
            times = ", ".join(f"{k} {v:.2f}s" for k, v in by_kind[kind]["seconds"].items())
            console.print(f"{dname} transformers experts implementation for {kind}: {by_kind[kind]['chosen']} "
                          f"(one {kind}: {times})")
    for dname, p in result["parity"].items():
        decode = [k[len("decode_"):-len("_tokens_equal")] for k, v in p.items()
                  if k.endswith("_tokens_equal") and not v]
        console.print(f"{dname} parity: forward logits max |diff| {p['forward_logits_max_abs_diff']:.2e} "
                      f"(max |logit| {p['forward_logits_max_abs']:.2f}), {p['forward_positions_differing']} of "
                      f"{p['forward_positions']} positions differ by > 1e-3, argmax agrees at "
                      f"{100 * p['forward_argmax_agree_fraction']:.1f}%; greedy decode tokens "
                      + ("identical" if not decode else f"differ at {', '.join(decode)}"))
    for t in result["targets"]:
        value = f"{100 * t['value']:.0f}%" if "peak" in t["target"] else f"{t['value']:.2f}x"
        console.print(f"target {t['target']} ({t['dtype']}): {value} -> {'met' if t['met'] else 'NOT met'}")


# ---------------------------------------------------------------------------------------------- entry

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="DeepSeek V1/V2/V3 and Mixtral MoE models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_info(sub)
    _add_generate(sub)
    _add_train(sub)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (CLIError, ValueError, OSError) as err:
        _fail(str(err))


if __name__ == "__main__":
    raise SystemExit(main())

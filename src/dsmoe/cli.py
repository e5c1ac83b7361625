"""The `dsmoe` command. The only module that prints.

Each subcommand is a `_add_<name>(subparsers)` function that declares its arguments and sets `run`;
adding one is a new function and one line in `build_parser`. Expected failures (bad input, missing
files, invalid configs) print one line `dsmoe: error: <message>` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
    p.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    config = load_config(args.model)
    stats = arch_stats(config, context=args.seq_len)
    if args.json:
        out = {"model": args.model, **dataclasses.asdict(stats)}
        print(json.dumps(out, indent=2))
    else:
        _print_info(args.model, config, stats)
    return 0


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


# ---------------------------------------------------------------------------------------------- entry

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="DeepSeek V1/V2/V3 and Mixtral MoE models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_info(sub)
    # train / generate / bench: one _add_<name>(sub) each.
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (CLIError, ValueError, OSError) as err:
        _fail(str(err))


if __name__ == "__main__":
    raise SystemExit(main())

"""`dsmoe info`: the architecture calculator, and the expert-parallel plan with --ep."""

from __future__ import annotations

import argparse
import dataclasses
import json

from ..calc import DEFAULT_CONTEXT, ArchStats, arch_stats, format_bytes, format_count
from ..config import ModelConfig
from ..presets import PRESETS
from .common import _count, _positive_int, load_config

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
    from ..parallel import ep_plan

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
    if config.model_type == "deepseek_v4":
        from .info_v4 import v4_attention_label

        table.add_row("attention", v4_attention_label(config))
    else:
        table.add_row("attention", (f"MLA + DSA (indexer {config.index_n_heads} heads x {config.index_head_dim}, "
                                f"top-{config.index_topk} keys)") if config.uses_dsa else "MLA" if config.uses_mla else
                      f"GQA ({config.num_attention_heads} heads, {config.kv_heads} kv heads)")
    table.add_row("total parameters", _count(s.total_params))
    table.add_row("activated per token", f"{_count(s.activated_params)}  "
                  f"{100 * s.activated_params / s.total_params:.1f}%")
    table.add_row("  without embedding", _count(s.activated_nonembedding_params))
    table.add_row("embedding", _count(s.embedding_params) + ("  tied to head" if config.tie_word_embeddings else ""))
    if config.num_nextn_predict_layers and config.model_type != "deepseek_v4":  # V4's MTP is not built
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
    if config.uses_dsa:
        table.add_row(f"  attention @ {s.context_length}", f"{format_count(s.attention_flops_per_token)} sparse "
                      f"(top-{config.index_topk} + indexer {format_count(s.indexer_flops_per_token)}), "
                      f"{format_count(s.dense_attention_flops_per_token)} dense "
                      f"({s.dense_attention_flops_per_token / s.attention_flops_per_token:.1f}x)")
        table.add_row("  KV cache of which indexer keys", f"{config.index_head_dim * config.num_hidden_layers:,} "
                      "elements")
    if config.num_nextn_predict_layers and config.model_type != "deepseek_v4":
        table.caption = ("MTP modules share the embedding and output head with the main model (counted 0); "
                         "checkpoint tensors add the Hub's per-module copies of both and the router biases.")
    elif s.router_bias_numel:
        table.caption = "checkpoint tensors add the router correction biases (buffers, not parameters)."
    Console().print(table)
    if config.model_type == "deepseek_v4":
        from .info_v4 import print_v4_kv_table

        print_v4_kv_table(config)

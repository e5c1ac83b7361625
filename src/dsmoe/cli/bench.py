"""`dsmoe bench`: dsmoe against transformers on the same weights."""

from __future__ import annotations

import argparse
import json
import sys

from ..calc import format_bytes, format_count
from .common import CLIError, _positive_int, add_device_argument, resolve_device

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
    add_device_argument(p)
    p.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..bench import BenchConfig, TransformersMissing, run_bench

    dtypes = ("fp32", "bf16") if args.dtype == "both" else (args.dtype,)
    device = resolve_device(args.device)
    overrides = dict(device=str(device), dtypes=dtypes, seq_len=args.seq_len, batch_size=args.batch_size, new_tokens=args.new_tokens)
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
    # Redirected to a file, rich would squeeze the table into 80 columns and cut the figures.
    console = Console(width=None if sys.stdout.isatty() else 200)
    table = Table(title=f"dsmoe vs transformers: DeepSeek-V3 shape, {format_count(m['total_params'])} params "
                        f"({format_count(m['activated_params'])} activated), torch {mach['torch']}, "
                        f"{mach['threads']} threads", title_justify="left")
    for col in ("measurement", "dtype", "shape", "dsmoe tok/s", "transformers tok/s", "ratio", "ceiling",
                "dsmoe peak RSS", "transformers peak RSS"):
        table.add_column(col, justify="left" if col in ("measurement", "dtype", "shape") else "right")
    mem = lambda b: "n/a" if b is None else format_bytes(b)  # noqa: E731
    for r in result["rows"]:
        table.add_row(r["measurement"], r["dtype"], r["shape"], f"{r['dsmoe']['tokens_per_s']:,.1f}",
                      f"{r['transformers']['tokens_per_s']:,.1f}", f"{r['ratio']:.2f}x",
                      f"{r['ceiling']:.2f}x", mem(r["dsmoe"]["peak_rss_bytes"]), mem(r["transformers"]["peak_rss_bytes"]))
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
                      f"{100 * p['forward_argmax_agree_fraction']:.1f}%; training loss {p['train_loss']['dsmoe']:.6f} vs "
                      f"{p['train_loss']['transformers']:.6f}; greedy decode tokens "
                      + ("identical" if not decode else f"differ at {', '.join(decode)}"))
    console.print(f"memory bandwidth (fp32 matrix-vector, {result['config']['bandwidth_mebibytes']} MiB): "
                  f"{result['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")
    for r in result["rows"]:
        if r["measurement"] == "decode":
            console.print(f"{r['dtype']} decode {r['shape']}: a step reads at least {format_bytes(r['step_bytes'])}, "
                          f"{r['step_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s over a matrix of that size")
    gpu = mach.get("gpu")
    if gpu:
        console.print(f"GPU {gpu['name']}: datasheet bf16 {(gpu['bf16_flops'] or 0) / 1e12:.0f} TFLOP/s, HBM "
                      f"{(gpu['hbm_bytes_per_s'] or 0) / 1e12:.2f} TB/s ({gpu['matched'] or 'not in the table'})")
    for r in result["rows"]:
        if "dsmoe_mfu_bf16_peak" in r:
            console.print(f"{r['dtype']} {r['measurement']} {r['shape']}: dsmoe MFU {100 * r['dsmoe_mfu_bf16_peak']:.1f}% "
                          "of the GPU's bf16 peak")
        if "dsmoe_hbm_fraction" in r:
            console.print(f"{r['dtype']} decode {r['shape']}: dsmoe reads {100 * r['dsmoe_hbm_fraction']:.1f}% of the "
                          "HBM bandwidth bound (least bytes a step must read / step time)")
    console.print("ceiling = the best ratio possible against transformers' time on this machine: forward / train "
                  "FLOPs at the matmul peak, decode step bytes at the bandwidth above")
    for t in result["targets"]:
        value = f"{100 * t['value']:.0f}%" if "peak" in t["target"] else f"{t['value']:.2f}x"
        line = f"target {t['target']} ({t['dtype']}): {value} -> {'met' if t['met'] else 'NOT met'}"
        if "ceiling" in t:
            line += f" (ceiling {t['ceiling']:.2f}x: {'reachable' if t['reachable'] else 'out of reach'} on this machine)"
        console.print(line)

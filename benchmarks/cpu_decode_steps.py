"""The CPU decode step four ways, side by side in one process (issue 16): where its time goes.

    python benchmarks/cpu_decode_steps.py [--checkpoint DIR] [--threads 2] [--contexts 256 2048] [--reps 21]
                                          [--dtypes fp32 bf16] [--no-compile] [--json OUT]

On dsmoe bench's random DeepSeek-V3-shaped model (dsmoe.bench.MODEL, 91.6M parameters; built with transformers
into a temporary directory unless --checkpoint names one), batch 1, one greedy decode step after a prompt of
each context length, timed round-robin (A, B, C, D, A, ...; each sample rewrites the same cache slot), medians:

* pytorch        the eager step with PyTorch's operators only (dsmoe.ops.cpu_kernels.cpu_kernels(False));
* eager+kernels  the eager step (`model(token, cache=...)`) with the decode kernels inside its modules;
* kernel step    dsmoe.kernel_step.KernelDecodeStep, what dsmoe.generate uses on the CPU;
* compiled       dsmoe.decode_graph.CompiledDecodeStep (torch.compile; compiled before timing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import dsmoe
from dsmoe.decode_graph import CompiledDecodeStep
from dsmoe.kernel_step import KernelDecodeStep
from dsmoe.ops.cpu_kernels import cpu_kernels

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measure(model, context: int, reps: int, compile_step: bool) -> dict[str, float]:
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(context))
    with torch.no_grad():
        cache = model.make_cache(1, context + 1)
        token = model(ids, cache=cache)[:, -1].argmax(-1)
        kernel_step = KernelDecodeStep(model, cache)

        def pytorch():
            with cpu_kernels(False):
                model(token[:, None], cache=cache, start=context, check=False)

        steps = {"pytorch": pytorch,
                 "eager+kernels": lambda: model(token[:, None], cache=cache, start=context, check=False),
                 "kernel step": lambda: kernel_step(token, context)}
        if compile_step:
            compiled = CompiledDecodeStep(model, cache)
            compiled(token, context)  # compiles
            steps["compiled"] = lambda: compiled(token, context)
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(reps):
            for name, step in steps.items():
                began = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - began)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 2048])
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from dsmoe.bench import MODEL, build_checkpoint

            checkpoint = Path(tmp)
            build_checkpoint(checkpoint, MODEL)
        rows = []
        for dtype in args.dtypes:
            model = dsmoe.load_pretrained(checkpoint, dtype=DTYPES[dtype]).eval()
            for context in args.contexts:
                ms = measure(model, context, args.reps, not args.no_compile)
                rows.append({"dtype": dtype, "context": context, "step_ms": ms})
                print(f"{dtype} after {context}: " + "  ".join(f"{k} {v:.2f} ms" for k, v in ms.items()),
                      file=sys.stderr, flush=True)
    names = list(rows[0]["step_ms"])
    print("| dtype | context | " + " | ".join(names) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in names) + " |")
    for r in rows:
        print(f"| {r['dtype']} | {r['context']} | " + " | ".join(f"{r['step_ms'][n]:.2f} ms" for n in names) + " |")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

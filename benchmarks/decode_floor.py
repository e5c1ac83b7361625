"""How much of a dsmoe decode step is matrix products, against the step time issue 6's 5x target allows.

    OMP_NUM_THREADS=2 python benchmarks/decode_floor.py [--json OUT] [--reps N] [--shapes 1x256 8x256 ...]

On `dsmoe bench`'s model (fp32, loaded from the same random transformers checkpoint), for each
(batch, context): one greedy decode step of dsmoe and of transformers over caches prefilled once, timed
alternately (A, B, A, B, ...; the step rewrites the same cache slot each time, so every sample does the
same work), best and median of --reps. Then the aten operations of one dsmoe step are recorded (a
TorchDispatchMode) and its matrix products alone (mm, bmm, grouped mm, with their real weights and activations, in
order) are replayed: the floor of this implementation, what the step would cost if everything else
were free.
When it is above transformers' step / 5, no trimming of the other operations can reach 5x; only fewer or
faster matrix products (fewer bytes: lower precision; or another kernel) could.
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
from torch.utils._python_dispatch import TorchDispatchMode

import dsmoe
from dsmoe.bench import MODEL, TARGETS, build_checkpoint

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default}
if hasattr(torch.ops.aten, "_grouped_mm"):  # the routed experts of several tokens (torch >= 2.9)
    MATMULS.add(torch.ops.aten._grouped_mm.default)


class _Recorder(TorchDispatchMode):
    """Every aten call below autograd, with its arguments, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _seconds(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(ours, hf, batch: int, context: int, reps: int) -> dict:
    gen = torch.Generator().manual_seed(batch * 100_003 + context)
    ids = torch.randint(0, MODEL["vocab_size"], (batch, context), generator=gen)
    with torch.no_grad():
        cache = ours.make_cache(batch, context + 1)
        token = ours(ids, cache=cache)[:, -1].argmax(-1)[:, None]
        hf_cache = hf(ids, use_cache=True, logits_to_keep=1).past_key_values

        def ours_step():
            return ours(token, cache=cache, start=context, check=False)

        def hf_step():
            logits = hf(token, past_key_values=hf_cache, use_cache=True).logits
            hf_cache.crop(-1)  # back to the prompt: the next sample decodes the same position
            return logits

        diff = (ours_step()[:, -1] - hf_step()[:, -1].float()).abs().max().item()
        times = {"dsmoe": [], "transformers": []}
        for _ in range(reps):
            for name, fn in (("dsmoe", ours_step), ("transformers", hf_step)):
                fn()  # untimed call first: the other library just evicted this one's weights from the caches
                times[name] += _seconds(fn, 1)
        recorder = _Recorder()
        with recorder:
            ours_step()
        matmuls = [c for c in recorder.calls if c[0] in MATMULS]

        def replay(calls):
            def run():
                for func, args, kwargs in calls:
                    func(*args, **kwargs)
            return run
        replay(matmuls)()
        floor = _seconds(replay(matmuls), reps)
    best = {name: min(t) for name, t in times.items()}
    return {"batch": batch, "context": context, "max_abs_logit_diff": diff,
            "aten_ops_per_step": len(recorder.calls), "matmuls_per_step": len(matmuls),
            "dsmoe_step_s": {"best": best["dsmoe"], "median": statistics.median(times["dsmoe"])},
            "transformers_step_s": {"best": best["transformers"], "median": statistics.median(times["transformers"])},
            "dsmoe_matmuls_only_s": {"best": min(floor), "median": statistics.median(floor)},
            "target_step_s": best["transformers"] / TARGETS["decode"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--reps", type=int, default=10, help="samples per timing (default 10)")
    parser.add_argument("--shapes", nargs="+", default=["1x256", "8x256", "1x2048", "8x2048"],
                        help="batch x context (default 1x256 8x256 1x2048 8x2048)")
    args = parser.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    except ValueError:
        parser.error(f"--shapes takes BATCHxCONTEXT, e.g. 8x256; got {' '.join(args.shapes)}")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_checkpoint(Path(tmp), MODEL)
        ours = dsmoe.load_pretrained(tmp).eval()
    hf.set_experts_implementation("eager")  # the faster one for an fp32 forward here (dsmoe bench picks it)
    rows = []
    print(f"{'shape':>8} {'ops':>5} {'dsmoe ms':>9} {'its matmuls':>12} {'transformers':>13} "
          f"{'ratio':>6} {'ratio at floor':>15} {'5x needs':>9}")
    for batch, context in shapes:
        r = measure(ours, hf, batch, context, args.reps)
        rows.append(r)
        ms = lambda key: 1e3 * r[key]["best"]  # noqa: E731
        print(f"{batch}x{context:<6} {r['aten_ops_per_step']:>5} {ms('dsmoe_step_s'):>9.2f} "
              f"{ms('dsmoe_matmuls_only_s'):>12.2f} "
              f"{ms('transformers_step_s'):>13.2f} "
              f"{r['transformers_step_s']['best'] / r['dsmoe_step_s']['best']:>5.2f}x "
              f"{r['transformers_step_s']['best'] / r['dsmoe_matmuls_only_s']['best']:>14.2f}x "
              f"{1e3 * r['target_step_s']:>9.2f}", flush=True)
    print("ms: best of --reps; 'ratio at floor': transformers' step / dsmoe's matmuls alone", file=sys.stderr)
    if args.json:
        meta = {"torch": torch.__version__, "transformers": transformers.__version__,
                "threads": torch.get_num_threads(), "reps": args.reps, "model": MODEL, "dtype": "float32",
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Greedy decode throughput on CPU: dsmoe absorbed MLA vs dsmoe naive MLA vs transformers.

    python benchmarks/decode.py [--quick] [--json OUT] [--repeats N] [--new-tokens N] [--budget-s S]
                                [--step-reps N] [--batches 1 8] [--contexts 256 2048] [--threads 2]

One random DeepSeek-V3-shaped model (hidden 512, 4 layers, 8 heads, q_lora 192, kv_lora 128, 64 routed
experts top-6 + 2 shared, 8 groups top-4, vocab 8192) is built as a `transformers.DeepseekV3ForCausalLM`,
saved, and loaded twice from the same files: by `dsmoe.load_pretrained` and by transformers'
`from_pretrained`. For every (batch, context) the three implementations run interleaved
(A, B, C, A, B, C, ...) after one warm-up, and the median over rounds is reported (3 rounds, or fewer when a
shape has used up --budget-s: the largest shape takes minutes per round on 2 busy cores):

* prefill       time to the first new token (prompt forward + first argmax, cache allocation included)
* ms/step       median time between consecutive new tokens (one decode forward for the whole batch);
                decode tok/s = batch / that. The median step shrugs off the stalls a shared machine causes.
* best ms/step  the fastest single step over all rounds: what a step costs when the machine leaves the two
                threads alone (on 2 busy cores, OpenMP's two-thread barriers make whole rounds 10-50x slower)
* tok/s (wall)  (n - 1) * batch / (time of the last token - time of the first): every step, stalls included

Prefill, ms/step and tok/s (wall) are medians over the rounds. Then one decode forward per implementation
is timed alone, --step-reps times interleaved, over caches prefilled once (no prefill per sample, so
samples are cheap and the fastest is the least disturbed): the cleanest per-step figure, with each
implementation's logits compared to absorbed's. Timings on a shared machine are noisy: read the ratios
between rows of one run, not the absolute figures.

The script also checks that the three produce the same greedy tokens, and reports the cache memory:
dsmoe's latent cache (used at the prompt length, and what `stream` preallocates for prompt + new tokens),
what transformers' DynamicCache holds right after its prefill (sum of the tensors in its layers), and the
size an MHA model with the same heads would need (`dsmoe.calc.arch_stats`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import dsmoe
from dsmoe.calc import arch_stats, format_bytes
from dsmoe.bench import MODEL as BENCH_MODEL
from dsmoe.generate import stream

# dsmoe bench's model with narrower experts (52.7M parameters): the decode tables were measured on this one.
MODEL = dict(BENCH_MODEL, moe_intermediate_size=128)
IMPLS = ("dsmoe absorbed", "dsmoe naive", "transformers")


def build_checkpoint(directory: Path, seed: int = 0) -> None:
    """A random transformers DeepseekV3ForCausalLM of shape MODEL, saved to `directory` (dsmoe.bench's
    builder: norm weights and router biases randomised so that routing is not degenerate)."""
    from dsmoe.bench import build_checkpoint as build

    build(directory, MODEL, seed)


def load_transformers(directory: Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    gc = model.generation_config
    gc.eos_token_id = None  # a random model must not stop early: every run makes exactly n tokens
    gc.pad_token_id = 0
    for key in ("temperature", "top_p", "top_k"):
        setattr(gc, key, None)
    return model


def set_absorb(model: dsmoe.Transformer, absorb: bool | None) -> None:
    for block in model.layers:
        block.attn.absorb = absorb


class _Clock:
    """A transformers streamer that only records when each put happens (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_dsmoe(model: dsmoe.Transformer, ids: torch.Tensor, n: int) -> dict:
    began = time.perf_counter()
    times, tokens = [], []
    for step in stream(model, ids, n):  # (B, 1) per step, greedy
        times.append(time.perf_counter())
        tokens.append(step)
    return {"tokens": torch.cat(tokens, dim=1), "prefill_s": times[0] - began, "step_s": _steps(times)}


def _steps(times: list[float]) -> list[float]:
    """Seconds between consecutive new tokens: one decode forward (and argmax) each."""
    return [b - a for a, b in zip(times, times[1:])]


def cache_tensor_bytes(cache) -> tuple[int, int]:
    """(bytes of every tensor in a transformers Cache's layers, tokens held by its first layer)."""
    total, tokens = 0, 0
    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
        if not tokens and isinstance(getattr(layer, "keys", None), torch.Tensor):
            tokens = layer.keys.shape[-2]
    return total, tokens


def run_transformers(model, ids: torch.Tensor, n: int) -> dict:
    clock = _Clock()
    began = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             streamer=clock, return_dict_in_generate=True)
    times = clock.times[1:]  # clock.times[0]: the prompt, put before the prefill
    cache_bytes, cache_tokens = cache_tensor_bytes(out.past_key_values)
    if out.sequences.shape[1] != ids.shape[1] + n:
        raise RuntimeError(f"transformers stopped after {out.sequences.shape[1] - ids.shape[1]} of {n} tokens")
    return {"tokens": out.sequences[:, ids.shape[1]:], "prefill_s": times[0] - began, "step_s": _steps(times),
            "cache_bytes": cache_bytes, "cache_tokens": cache_tokens}


def bench_shape(runners: dict, batch: int, context: int, n: int, repeats: int, vocab: int,
                budget_s: float | None = None) -> dict:
    """Interleaved rounds (A, B, C), up to `repeats` of them; with a budget, no new round starts once the
    shape has taken budget_s seconds (at least one round always runs)."""
    ids = prompt_ids(batch, context, vocab)
    runs: dict[str, list[dict]] = {name: [] for name in runners}
    began = time.perf_counter()
    for _ in range(repeats):
        for name, run in runners.items():  # interleaved: A, B, C, A, B, C, ...
            runs[name].append(run(ids, n))
        if budget_s is not None and time.perf_counter() - began > budget_s:
            break
    done = len(runs[IMPLS[0]])
    reference = runs[IMPLS[0]][0]["tokens"]
    result = {"batch": batch, "context": context, "new_tokens": n, "repeats": done,
              "seconds": time.perf_counter() - began, "impls": {}}
    for name, rs in runs.items():
        wall = [(n - 1) * batch / sum(r["step_s"]) for r in rs]  # whole decode: (n - 1) steps
        step = [statistics.median(r["step_s"]) for r in rs]  # typical step: robust to short stalls
        best = min(min(r["step_s"]) for r in rs)  # fastest step: robust to long stalls (a busy machine)
        mismatch = max(int((r["tokens"] != reference).sum()) for r in rs)
        entry = {
            "prefill_s": statistics.median(r["prefill_s"] for r in rs),
            "prefill_s_min": min(r["prefill_s"] for r in rs),
            "decode_tok_s": batch / statistics.median(step),
            "decode_tok_s_best": batch / best,
            "decode_tok_s_wall": statistics.median(wall),
            "step_ms": 1e3 * statistics.median(step),
            "step_ms_best": 1e3 * best,
            "prefill_s_all": [r["prefill_s"] for r in rs],
            "step_ms_rounds": [1e3 * s for s in step],  # median step of each round
            "decode_tok_s_wall_all": wall,
            "tokens_identical_to_absorbed": mismatch == 0,
            "mismatched_tokens": mismatch,
        }
        if "cache_bytes" in rs[0]:
            entry["cache_bytes_at_end"] = rs[0]["cache_bytes"]
            entry["cache_tokens_at_end"] = rs[0]["cache_tokens"]
        result["impls"][name] = entry
    return result


def prompt_ids(batch: int, context: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(batch * 10007 + context))


def bench_steps(ours: dsmoe.Transformer, hf, batch: int, context: int, reps: int, vocab: int) -> dict:
    """One decode forward at position `context`, timed alone over caches prefilled once: A, B, C interleaved
    `reps` times, each step rewriting the same slot (transformers' cache is cropped back after each).
    No prefill per sample, so many samples are cheap; the fastest is the least disturbed by other load.
    Also measures what transformers' DynamicCache holds after its prefill."""
    ids = prompt_ids(batch, context, vocab)
    token = ids[:, -1:]
    with torch.no_grad():
        cache = ours.make_cache(batch, context + 1)
        ours(ids, cache=cache)
        out = hf(ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
        pkv = out.past_key_values
        hf_bytes, hf_tokens = cache_tensor_bytes(pkv)
        mask, positions = torch.ones(batch, context + 1, dtype=torch.long), torch.full((batch, 1), context)

        def ours_step(absorb: bool | None) -> torch.Tensor:
            set_absorb(ours, absorb)
            return ours(token, cache=cache, start=context, check=False)[:, -1]  # as generate() steps

        def hf_step() -> torch.Tensor:
            logits = hf(token, attention_mask=mask, past_key_values=pkv, position_ids=positions, use_cache=True,
                        logits_to_keep=1).logits[:, -1]
            pkv.crop(-1)
            return logits

        steps = {IMPLS[0]: lambda: ours_step(None), IMPLS[1]: lambda: ours_step(False), IMPLS[2]: hf_step}
        times: dict[str, list[float]] = {name: [] for name in steps}
        logits = {}
        for _ in range(reps):
            for name, step in steps.items():
                began = time.perf_counter()
                logits[name] = step()
                times[name].append(time.perf_counter() - began)
        set_absorb(ours, None)
    reference = logits[IMPLS[0]]
    return {
        "reps": reps,
        "impls": {name: {"step_ms_best": 1e3 * min(t), "step_ms_median": 1e3 * statistics.median(t),
                         "step_ms_all": [1e3 * x for x in t],
                         "max_abs_logit_diff": float((logits[name] - reference).abs().max())}
                  for name, t in times.items()},
        "transformers_cache_bytes_after_prefill": hf_bytes,
        "transformers_cache_tokens_after_prefill": hf_tokens,
    }


def cache_report(model: dsmoe.Transformer, result: dict) -> dict:
    """Cache bytes at the prompt length, in the model dtype (fp32 here)."""
    config, B, T, n = model.config, result["batch"], result["context"], result["new_tokens"]
    elem = model.embed.weight.element_size()
    stats = arch_stats(config, context=T)
    if "steps" in result:  # measured right after transformers' prefill
        hf_bytes = result["steps"]["transformers_cache_bytes_after_prefill"]
    else:  # scaled from the cache generate returned (it grows by one token a step)
        hf = result["impls"]["transformers"]
        hf_bytes = int(hf["cache_bytes_at_end"] / hf["cache_tokens_at_end"] * T)
    return {
        "dsmoe_latent_bytes": stats.kv_cache_per_token * elem * B * T,
        "dsmoe_allocated_bytes": model.make_cache(B, T + n).nbytes(),  # what stream() preallocates
        "transformers_dynamic_cache_bytes": hf_bytes,
        "mha_equivalent_bytes": stats.mha_kv_cache_per_token * elem * B * T,
        "mha_over_latent": stats.kv_cache_ratio,
    }


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 190))  # piped output: do not wrap at 80 columns

    table = Table(title="Greedy decode, fp32 (medians over repeats; decode tok/s = batch / median step)")
    for col in ("batch", "context", "rounds", "implementation", "prefill s", "ms/step", "best ms/step", "decode tok/s",
                "tok/s (wall)", "vs naive", "vs transformers", "best vs naive", "best vs transformers", "same tokens"):
        table.add_column(col, justify="left" if col == "implementation" else "right")
    for r in results:
        impls = r["impls"]
        for i, (name, e) in enumerate(impls.items()):
            table.add_row(
                str(r["batch"]) if i == 0 else "", str(r["context"]) if i == 0 else "",
                str(r["repeats"]) if i == 0 else "", name,
                f"{e['prefill_s']:.2f}", f"{e['step_ms']:.1f}", f"{e['step_ms_best']:.1f}", f"{e['decode_tok_s']:.1f}",
                f"{e['decode_tok_s_wall']:.1f}",
                f"{e['decode_tok_s'] / impls['dsmoe naive']['decode_tok_s']:.2f}x",
                f"{e['decode_tok_s'] / impls['transformers']['decode_tok_s']:.2f}x",
                f"{e['decode_tok_s_best'] / impls['dsmoe naive']['decode_tok_s_best']:.2f}x",
                f"{e['decode_tok_s_best'] / impls['transformers']['decode_tok_s_best']:.2f}x",
                "yes" if e["tokens_identical_to_absorbed"] else f"no ({e['mismatched_tokens']} differ)",
                end_section=i == len(impls) - 1)
    console.print(table)

    mem = Table(title="Attention cache at the prompt length (fp32)")
    for col in ("batch", "context", "dsmoe latent", "dsmoe allocated (T+n)", "transformers DynamicCache",
                "MHA equivalent"):
        mem.add_column(col, justify="right")
    for r in results:
        c = r["cache"]
        mem.add_row(str(r["batch"]), str(r["context"]), format_bytes(c["dsmoe_latent_bytes"]),
                    format_bytes(c["dsmoe_allocated_bytes"]), format_bytes(c["transformers_dynamic_cache_bytes"]),
                    f"{format_bytes(c['mha_equivalent_bytes'])} ({c['mha_over_latent']:.1f}x)")
    console.print(mem)

    if any("steps" in r for r in results):
        reps = next(r["steps"]["reps"] for r in results if "steps" in r)
        steps = Table(title=f"One decode forward after prefill, timed alone ({reps} interleaved samples each)")
        for col in ("batch", "context", "implementation", "best ms", "median ms", "tok/s (best)", "best vs naive",
                    "best vs transformers", "max |logit diff|"):
            steps.add_column(col, justify="left" if col == "implementation" else "right")
        for r in results:
            if "steps" not in r:
                continue
            impls = r["steps"]["impls"]
            for i, (name, e) in enumerate(impls.items()):
                steps.add_row(
                    str(r["batch"]) if i == 0 else "", str(r["context"]) if i == 0 else "", name,
                    f"{e['step_ms_best']:.1f}", f"{e['step_ms_median']:.1f}",
                    f"{1e3 * r['batch'] / e['step_ms_best']:.1f}",
                    f"{impls['dsmoe naive']['step_ms_best'] / e['step_ms_best']:.2f}x",
                    f"{impls['transformers']['step_ms_best'] / e['step_ms_best']:.2f}x",
                    f"{e['max_abs_logit_diff']:.1e}", end_section=i == len(impls) - 1)
        console.print(steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="contexts 64 and 256, 8 new tokens, one round, 5 step samples")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--repeats", type=int, help="timed runs per implementation and shape (default 3)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per run (default 32)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    parser.add_argument("--contexts", type=int, nargs="+", help="prompt lengths (default 256 2048)")
    parser.add_argument("--budget-s", type=float, default=150.0,
                        help="start no new round of a shape after this many seconds on it (default 150; 0: no limit)")
    parser.add_argument("--step-reps", type=int,
                        help="samples of the single-step timing per implementation and shape (default 10; 0: skip)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    n = args.new_tokens or (8 if args.quick else 32)
    step_reps = args.step_reps if args.step_reps is not None else (5 if args.quick else 10)
    contexts = args.contexts or ([64, 256] if args.quick else [256, 2048])
    if n < 2:
        parser.error("--new-tokens must be >= 2 (decode speed is measured after the first token)")
    if max(contexts) + n > MODEL["max_position_embeddings"]:
        parser.error(f"context + new tokens must fit in {MODEL['max_position_embeddings']} positions")
    torch.set_num_threads(args.threads)
    try:
        import transformers
    except ImportError:
        parser.error("the comparison needs transformers (pip install -e '.[test]')")
    transformers.utils.logging.disable_progress_bar()
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(Path(tmp))
        ours = dsmoe.load_pretrained(tmp, dtype=torch.float32).eval()
        hf = load_transformers(Path(tmp))

    def absorbed(ids, n):
        set_absorb(ours, None)
        return run_dsmoe(ours, ids, n)

    def naive(ids, n):
        set_absorb(ours, False)
        return run_dsmoe(ours, ids, n)

    runners = {IMPLS[0]: absorbed, IMPLS[1]: naive, IMPLS[2]: lambda ids, n: run_transformers(hf, ids, n)}
    warm = torch.randint(0, MODEL["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1))
    for run in runners.values():  # warm-up once
        run(warm, 4)

    started = time.perf_counter()
    results = []
    for batch in args.batches:
        for context in contexts:
            r = bench_shape(runners, batch, context, n, repeats, MODEL["vocab_size"], args.budget_s or None)
            if step_reps:
                r["steps"] = bench_steps(ours, hf, batch, context, step_reps, MODEL["vocab_size"])
            r["cache"] = cache_report(ours, r)
            results.append(r)
            rates = ", ".join(f"{k} {e['decode_tok_s']:.1f}" for k, e in r["impls"].items())
            print(f"batch {batch} context {context}: {r['repeats']} rounds in {r['seconds']:.0f} s; decode tok/s: "
                  f"{rates}", file=sys.stderr)
    set_absorb(ours, None)
    print_table(results)

    print(f"load average before / after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} "
          f"({os.cpu_count()} CPUs); {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.json:
        meta = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version(),
            "command": " ".join(["python", "benchmarks/decode.py", *(argv if argv is not None else sys.argv[1:])]),
            "model": MODEL, "dtype": "float32",
            "transformers_attn_implementation": hf.config._attn_implementation,
            "transformers_experts_implementation": getattr(hf.config, "_experts_implementation", None),
            "seconds": time.perf_counter() - started,
            "load_average_before_after": [load_before[0], os.getloadavg()[0]], "cpu_count": os.cpu_count(),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

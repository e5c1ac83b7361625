"""Markdown tables for BENCHMARKS.md from the saved results, so the document shows exactly what was measured.

    python benchmarks/tables.py    # reads benchmarks/results/{bench,decode,decode-floor}-cpu2.json, prints markdown
"""

from __future__ import annotations

import json
from pathlib import Path

from dsmoe.calc import format_bytes

RESULTS = Path(__file__).parent / "results"
DECODE_IMPLS = ("dsmoe absorbed", "dsmoe naive", "transformers")


def _md(header: list[str], rows: list[list[str]], right_from: int) -> str:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def bench_tables(bench: dict) -> str:
    mem = lambda b: "n/a" if b is None else format_bytes(b)  # noqa: E731
    rows = [[r["measurement"], r["dtype"], r["shape"], f"{r['dsmoe']['tokens_per_s']:,.1f}",
             f"{r['transformers']['tokens_per_s']:,.1f}", f"**{r['ratio']:.2f}x**", f"{r['ceiling']:.2f}x",
             mem(r["dsmoe"]["peak_rss_bytes"]), mem(r["transformers"]["peak_rss_bytes"])] for r in bench["rows"]]
    main = _md(["measurement", "dtype", "shape", "dsmoe tok/s", "transformers tok/s", "dsmoe / transformers",
                "ceiling", "dsmoe peak RSS", "transformers peak RSS"], rows, right_from=3)
    targets = []
    for t in bench["targets"]:
        peak = "peak" in t["target"]
        value = f"{100 * t['value']:.0f}%" if peak else f"{t['value']:.2f}x"
        ceiling = "—" if peak else f"{t['ceiling']:.2f}x"
        reachable = "—" if peak else ("yes" if t["reachable"] else "**no**")
        targets.append([t["target"], t["dtype"], value, ceiling, "yes" if t["met"] else "**no**", reachable])
    return main + "\n\n" + _md(["target (issue 6)", "dtype", "measured (worst shape)", "ceiling (worst shape)",
                                "met?", "reachable here?"], targets, right_from=2)


def decode_tables(decode: dict) -> str:
    gen, step, cache = [], [], []
    for r in decode["results"]:
        imp = r["impls"]
        steps = r["steps"]["impls"]
        for i, name in enumerate(DECODE_IMPLS):
            m, s = imp[name], steps[name]
            lead = [str(r["batch"]), str(r["context"])] if i == 0 else ["", ""]
            same = "yes" if m.get("tokens_identical_to_absorbed", True) else f"no ({m['mismatched_tokens']})"
            gen.append(lead + [name, f"{m['prefill_s']:.2f}", f"{m['step_ms']:.1f}", f"{m['step_ms_best']:.1f}",
                               f"{m['decode_tok_s']:.1f}", f"{m['decode_tok_s_wall']:.1f}",
                               f"{m['decode_tok_s'] / imp['dsmoe naive']['decode_tok_s']:.2f}x",
                               f"{m['decode_tok_s'] / imp['transformers']['decode_tok_s']:.2f}x", same])
            step.append(lead + [name, f"{s['step_ms_best']:.1f}", f"{s['step_ms_median']:.1f}",
                                f"{1e3 * r['batch'] / s['step_ms_best']:.1f}",
                                f"{steps['dsmoe naive']['step_ms_best'] / s['step_ms_best']:.2f}x",
                                f"{steps['transformers']['step_ms_best'] / s['step_ms_best']:.2f}x",
                                f"{s['max_abs_logit_diff']:.1e}"])
        c = r["cache"]
        cache.append([str(r["batch"]), str(r["context"]), format_bytes(c["dsmoe_latent_bytes"]),
                      format_bytes(c["dsmoe_allocated_bytes"]), format_bytes(c["transformers_dynamic_cache_bytes"]),
                      f"{format_bytes(c['mha_equivalent_bytes'])} ({c['mha_over_latent']:.0f}x)"])
    return "\n\n".join([
        _md(["batch", "context", "implementation", "prefill s", "ms/step", "best ms/step", "decode tok/s",
             "tok/s (wall)", "vs naive", "vs transformers", "same tokens"], gen, right_from=3),
        _md(["batch", "context", "implementation", "best ms", "median ms", "tok/s (best)", "best vs naive",
             "best vs transformers", "max \\|logit diff\\|"], step, right_from=3),
        _md(["batch", "context", "dsmoe latent", "dsmoe allocated (T + n)", "transformers DynamicCache",
             "MHA equivalent"], cache, right_from=2),
    ])


def floor_table(floor: dict) -> str:
    rows = []
    for r in floor["rows"]:
        ms = lambda key: f"{1e3 * r[key]['best']:.2f}"  # noqa: E731
        hf = r["transformers_step_s"]["best"]
        rows.append([f"{r['batch']}x{r['context']}", str(r["aten_ops_per_step"]), str(r["matmuls_per_step"]),
                     ms("dsmoe_step_s"), ms("dsmoe_matmuls_only_s"), ms("transformers_step_s"),
                     f"{1e3 * r['target_step_s']:.2f}", f"**{hf / r['dsmoe_step_s']['best']:.2f}x**",
                     f"{hf / r['dsmoe_matmuls_only_s']['best']:.2f}x"])
    return _md(["batch x context", "aten ops / step", "of which matmuls", "dsmoe step ms", "its matmuls alone ms",
                "transformers step ms", "5x needs ms", "dsmoe / transformers", "at the matmul floor"], rows,
               right_from=1)


def main() -> None:
    print(bench_tables(json.loads((RESULTS / "bench-cpu2.json").read_text())))
    print()
    print(decode_tables(json.loads((RESULTS / "decode-cpu2.json").read_text())))
    print()
    print(floor_table(json.loads((RESULTS / "decode-floor-cpu2.json").read_text())))


if __name__ == "__main__":
    main()

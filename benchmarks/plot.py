"""Plot the saved benchmark results: dsmoe / transformers speed ratios per measurement.

    python benchmarks/plot.py   # reads benchmarks/results/{bench,decode}-cpu2.json, writes benchmarks/results/speedups.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dsmoe.bench import TARGETS  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    bench = json.loads((RESULTS / "bench-cpu2.json").read_text())
    decode = json.loads((RESULTS / "decode-cpu2.json").read_text())
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))

    rows = bench["rows"]
    labels = [f"{r['measurement']}\n{r['dtype']} {r['shape']}" for r in rows]
    colors = ["tab:blue" if r["dtype"] == "fp32" else "tab:orange" for r in rows]
    x = range(len(rows))
    left.bar(x, [r["ratio"] for r in rows], color=colors)
    # What issue 6 asks for, and the most any implementation could reach against transformers' time here.
    left.scatter(x, [TARGETS[r["measurement"]] for r in rows], marker="_", s=300, color="red", label="target")
    if all("ceiling" in r for r in rows):
        left.scatter(x, [r["ceiling"] for r in rows], marker="v", color="black", label="ceiling (this machine)")
    left.axhline(1.0, color="black", linewidth=0.8)
    left.set_yscale("log")
    left.set_xticks(x, labels, fontsize=6.5, rotation=60, ha="right")
    left.set(ylabel="dsmoe / transformers (tokens/s)", title="dsmoe bench, 91.6M V3-shaped (blue fp32, orange bf16)")
    left.legend(fontsize=7)

    shapes = [f"{r['batch']}x{r['context']}" for r in decode["results"]]
    impls = ("dsmoe absorbed", "dsmoe naive")
    for k, impl in enumerate(impls):
        ratios = [r["impls"][impl]["decode_tok_s"] / r["impls"]["transformers"]["decode_tok_s"] for r in decode["results"]]
        left_edge = [i + (k - 0.5) * 0.4 for i in range(len(shapes))]
        right.bar(left_edge, ratios, width=0.4, label=impl)
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set_xticks(range(len(shapes)), shapes)
    right.set(xlabel="batch x context", ylabel="decode tokens/s vs transformers",
              title="greedy decode, 52.7M V3-shaped, fp32")
    right.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "speedups.png", dpi=110)


if __name__ == "__main__":
    main()

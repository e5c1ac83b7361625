"""metrics.jsonl (one JSON object per step) and the end-of-run plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON line per step. On resume, lines past the resumed step (written after the last
    checkpoint by the interrupted run) are dropped so the log reads as one uninterrupted run."""

    def __init__(self, path: Path, truncate_after: int = 0) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(path) if r["step"] <= truncate_after] if truncate_after else []
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a crash ends the log
    return records


def plot_run(out: Path) -> list[Path]:
    """loss.png (train / validation / MTP losses; MaxVio, and the dropped share when tokens were dropped) and
    expert_load.png (layers x experts, mean load over the last quarter of the run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(out / "metrics.jsonl")
    if not records:
        return []
    steps = [r["step"] for r in records]
    fig, (ax, ax_vio) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "total"), ("lm_loss", "next-token"), ("mtp_loss", "MTP")):
        if key in records[0]:
            ax.plot(steps, [r[key] for r in records], label=label, linewidth=1)
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="validation", markersize=3)
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()
    if "indexer_loss" in records[0]:  # V3.2: the indexer's KL is orders of magnitude below the LM loss
        ax_kl = ax.twinx()
        ax_kl.plot(steps, [r["indexer_loss"] for r in records], color="tab:purple", linewidth=1)
        ax_kl.set_ylabel("indexer KL", color="tab:purple")
    ax.grid(alpha=0.3)
    ax_vio.plot(steps, [r.get("max_vio_mean", 0.0) for r in records], linewidth=1)
    ax_vio.set(xlabel="step", ylabel="MaxVio (mean over MoE layers)", title="load imbalance")
    ax_vio.grid(alpha=0.3)
    if "dropped" in records[-1]:  # token dropping: the share of (token, expert) pairs dropped, on its own axis
        ax_drop = ax_vio.twinx()
        ax_drop.plot(steps, [100 * r.get("dropped", 0.0) for r in records], color="tab:red", linewidth=1)
        ax_drop.set_ylabel("pairs dropped (%)", color="tab:red")
        ax_vio.set_title("load imbalance and token dropping")
    fig.tight_layout()
    paths = [out / "loss.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    loads = [r["expert_load"] for r in records[-max(1, len(records) // 4):] if r.get("expert_load")]
    if loads:
        layers, experts = len(loads[0]), len(loads[0][0])
        mean = [[sum(step[l][e] for step in loads) / len(loads) for e in range(experts)] for l in range(layers)]
        fig, ax = plt.subplots(figsize=(max(6, experts * 0.25), 1.2 + 0.5 * layers))
        image = ax.imshow(mean, aspect="auto", cmap="viridis")
        ax.set(xlabel="expert", ylabel="MoE layer", title="tokens per expert (mean, last quarter of the run)")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        paths.append(out / "expert_load.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths

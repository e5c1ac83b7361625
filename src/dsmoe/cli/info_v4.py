"""`dsmoe info` on a DeepSeek-V4 model: the KV cache of one sequence at 128K and 1M tokens per layer type,
beside DeepSeek-V3's latent cache and an MHA cache of the same heads (see dsmoe.calc_v4)."""

from __future__ import annotations

from ..calc import format_bytes
from ..calc_v4 import BF16_BYTES, CONTEXTS, kv_cache_rows
from ..config import ModelConfig


def v4_attention_label(config: ModelConfig) -> str:
    counts = {t: config.layer_types.count(t) for t in dict.fromkeys(config.layer_types)}
    short = {"sliding_attention": "sliding", "compressed_sparse_attention": "CSA",
             "heavily_compressed_attention": "HCA"}
    parts = ", ".join(f"{n} {short[t]}" for t, n in counts.items())
    return (f"shared-KV MQA ({config.num_attention_heads} heads x {config.head_dim}), window "
            f"{config.sliding_window}; {parts}; mHC x{config.hc_mult}")


def print_v4_kv_table(config: ModelConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="KV cache of one sequence (bf16)", title_justify="left")
    table.add_column("layers")
    for ctx in CONTEXTS:
        table.add_column(f"@ {ctx // 1024}K" if ctx < 1 << 20 else f"@ {ctx >> 20}M", justify="right")
        table.add_column("per token", justify="right")
    per_ctx = [kv_cache_rows(config, ctx) for ctx in CONTEXTS]
    for i, row in enumerate(per_ctx[0]):
        rate = config.compress_rates.get(row.kind)
        name = {"sliding_attention": "sliding", "compressed_sparse_attention": f"CSA (m={rate})",
                "heavily_compressed_attention": f"HCA (m={rate})"}.get(row.kind, row.kind)
        label = name if row.kind not in config.compress_rates and row.kind != "sliding_attention" else \
            f"{name} x{row.layers} layers"
        cells = []
        for rows in per_ctx:
            r = rows[i]
            cells += [format_bytes(r.elements * BF16_BYTES), f"{r.per_token:,.0f} el"]
        table.add_row(label, *cells)
    table.caption = ("per layer type: sliding keeps its window; CSA adds an entry (head_dim) and an indexer key "
                     "per m tokens; HCA an entry per m' tokens. V3 row: 576 latent elements per token per layer "
                     "over as many layers.")
    Console().print(table)

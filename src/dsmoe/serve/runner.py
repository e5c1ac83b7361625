"""One model step of the engine: a ragged batch of token chunks in, next-token logits out.

The runner knows tensors and block tables, not requests: the engine hands it, per sequence, the new tokens,
the position of the first, the sequence's block table and whether it wants logits after the last token.
It packs them into one row (dsmoe.model.paged), writes their keys into the pool and returns the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import Transformer
from ..model.attention import GQAttention, MLAttention
from ..kernel_step import MLAStepPlan, paged_decode_hidden_states
from ..ops.cpu_kernels import kernels
from ..model.paged import Chunk, PagedBatch, paged_hidden_states, paged_mtp_hidden
from .blocks import CachePool

# Families whose every layer the paged forward reproduces exactly (plain causal GQA / MLA blocks).
SERVABLE_MODEL_TYPES = ("deepseek", "deepseek_v2", "deepseek_v3", "mixtral")


def sliding_window(config) -> int | None:
    """The config's attention window (the typed field, or config.json's key kept in `extra`); None when
    it is absent or no shorter than the context (then it hides nothing)."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        window = config.extra.get("sliding_window")
    return window if window is not None and window < config.max_position_embeddings else None


def check_servable(model: Transformer) -> None:
    """Raise ValueError naming the feature when the paged forward cannot reproduce this model (sparse or
    compressed attention, a windowed MLA model, another block type): refused up front, never wrong tokens."""
    config = model.config
    if config.model_type not in SERVABLE_MODEL_TYPES:
        raise ValueError(f"the serving engine does not support model_type {config.model_type!r} yet "
                         f"(supported: {', '.join(SERVABLE_MODEL_TYPES)})")
    window = sliding_window(config)
    if window is not None and config.uses_mla:
        raise ValueError(f"the serving engine implements sliding-window attention for GQA models only "
                         f"(an MLA model with sliding_window={window})")
    for i, block in enumerate(model.layers):
        if type(block.attn) not in (GQAttention, MLAttention):
            raise ValueError(f"the serving engine cannot run layer {i}'s attention {type(block.attn).__name__}")
        if getattr(block.attn, "indexer", None) is not None:  # V3.2's sparse attention (another branch)
            raise ValueError(f"the serving engine does not implement sparse attention (layer {i}'s indexer)")


@dataclass
class Work:
    """One sequence's share of a step: `tokens` at positions start..start+len(tokens), whose keys go to the
    blocks of `table` (covering at least start+len(tokens) positions); logits: how many of the last tokens
    want next-token logits (0 or 1; 2 to verify a speculative draft)."""

    tokens: list[int]
    start: int
    table: list[int]
    logits: int


class ModelRunner:
    """Runs packed steps of `model` over `pool` (same device and dtype as the model's parameters)."""

    def __init__(self, model: Transformer, pool: CachePool) -> None:
        check_servable(model)
        if pool.config.num_hidden_layers != model.config.num_hidden_layers:
            raise ValueError("the cache pool was built for another model configuration")
        param = model.embed.weight
        if pool.dtype != param.dtype or pool.layers[0][0].device != param.device:
            raise ValueError(f"cache pool ({pool.dtype}, {pool.layers[0][0].device}) and model "
                             f"({param.dtype}, {param.device}) differ in dtype or device")
        self.model, self.pool = model, pool
        self.device = param.device
        if self.device.type == "cpu":  # built (once per machine, ~45 s) or loaded now, not at the first request
            kernels()
        # the flattened weights of the whole-step CPU operator (kernel_step.MLAStepPlan), for MLA models
        self._plan = (MLAStepPlan(model) if self.device.type == "cpu" and pool.layers and len(pool.layers[0]) == 1
                      and MLAStepPlan.applies(model) else None)
        self.window = sliding_window(model.config)

    def metadata(self, work: list[Work]) -> tuple[torch.Tensor, PagedBatch, list[int]]:
        """Packed ids (M,), the attention metadata, and the packed rows whose logits are wanted."""
        P = self.pool.block_size
        ids, positions, slots, want = [], [], [], []
        dec_rows, dec_tables, dec_lens, chunks = [], [], [], []
        for w in work:
            row = len(ids)
            pos = range(w.start, w.start + len(w.tokens))
            ids += w.tokens
            positions += pos
            slots += [w.table[p // P] * P + p % P for p in pos]
            context = w.start + len(w.tokens)
            if len(w.tokens) == 1:
                dec_rows.append(row)
                dec_tables.append(w.table[:-(-context // P)])
                dec_lens.append(context)
            else:
                table = torch.tensor(w.table[:-(-context // P)], dtype=torch.long, device=self.device)
                chunks.append(Chunk(row, len(w.tokens), table, context))
            want += range(len(ids) - int(w.logits), len(ids))
        meta = PagedBatch(self._tensor(positions), self._tensor(slots), chunks=tuple(chunks), window=self.window)
        if dec_rows:
            width = max(map(len, dec_tables))
            padded = [t + [t[0]] * (width - len(t)) for t in dec_tables]  # padding keys are masked out
            meta.decode_rows, meta.decode_tables = self._tensor(dec_rows), self._tensor(padded)
            meta.decode_lens = self._tensor(dec_lens)
        return self._tensor(ids), meta.with_masks(), want

    @torch.no_grad()
    def run(self, work: list[Work], keep_hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run one step -> fp32 logits (n, V) of the rows the works asked for, in their order; with
        keep_hidden also the final-normed hidden states of every packed token (M, D) (for the MTP drafter)."""
        ids, meta, want = self.metadata(work)
        hidden = None
        if meta.only_decodes and self.device.type == "cpu":  # up to 8 decodes: straight through the CPU kernels
            hidden = paged_decode_hidden_states(self.model, ids, meta, self.pool.layers, self._plan)
        if hidden is None:
            hidden = paged_hidden_states(self.model, ids, meta, self.pool.layers)  # (M, D)
        logits = self.model.head(hidden[self._tensor(want)]).float()
        return (logits, hidden) if keep_hidden else logits

    @torch.no_grad()
    def run_mtp(self, work: list[Work], h_prev: torch.Tensor) -> torch.Tensor:
        """The first MTP module over a packed step: work[i].tokens are the tokens *after* its positions,
        h_prev (M, D) the main model's hidden states at them; keys in the pool's MTP layer (the last).
        -> fp32 draft logits (n, V) for the rows the works asked for."""
        if self.pool.extra_layers < 1 or not self.model.mtp:
            raise RuntimeError("speculative decoding needs a model with an MTP module and a pool with its layer")
        ids, meta, want = self.metadata(work)
        h = paged_mtp_hidden(self.model, 0, h_prev, ids, meta, self.pool.layers[len(self.model.layers)])
        return self.model.head(self.model.mtp[0].norm(h[self._tensor(want)])).float()

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

"""Training DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2 report, section 2.1.1).

Two stages, chosen per step by the trainer (`--indexer-warmup-steps N`):

* dense warm-up (steps < N): the main attention stays dense and every parameter but the indexers' is frozen;
  the only loss is the indexer's KL divergence to the main attention's distribution (summed over heads,
  L1-normalised), over every visible key.
* sparse training (steps >= N): each query attends to its top-k keys; the model trains with the language-
  modelling loss (and the usual MTP / balance terms) through the sparse attention, while the indexer keeps
  its KL loss restricted to the selected keys. The indexer's inputs are detached from the main graph
  (model/dsa.py), so the indexer learns from its KL loss only and the model from the LM loss only: the two
  are summed into one backward without mixing.

The loss itself is computed inside the model's forward (model.dsa.indexer_kl) and stored on each indexer;
this module switches the stages and collects it.
"""

from __future__ import annotations

import torch

from ..model import Transformer
from ..model.dsa import LightningIndexer

WARMUP, SPARSE = "warmup", "sparse"


def indexers(model: Transformer) -> list[LightningIndexer]:
    """Every lightning indexer of the model (main layers, then MTP blocks)."""
    return [m for m in model.modules() if isinstance(m, LightningIndexer)]


def stage_for(step: int, warmup_steps: int) -> str:
    """The stage of 0-based `step`: the dense warm-up for the first warmup_steps steps, then sparse."""
    return WARMUP if step < warmup_steps else SPARSE


def set_stage(model: Transformer, stage: str | None) -> None:
    """Switch the model to `stage` (WARMUP / SPARSE), or back to plain inference (None): the indexers' dense
    flag and loss mode, and which parameters train (WARMUP: the indexers' only). ValueError for a model
    without DSA or an unknown stage."""
    found = indexers(model)
    if not found:
        raise ValueError(f"indexer training needs a model with DeepSeek Sparse Attention (deepseek_v32), got "
                         f"{model.config.model_type}")
    if stage not in (WARMUP, SPARSE, None):
        raise ValueError(f"indexer stage must be {WARMUP!r}, {SPARSE!r} or None, got {stage!r}")
    own = {id(p) for indexer in found for p in indexer.parameters()}
    for p in model.parameters():
        p.requires_grad_(stage != WARMUP or id(p) in own)
    for indexer in found:
        indexer.dense = stage == WARMUP
        indexer.loss_mode = None if stage is None else ("dense" if stage == WARMUP else "sparse")
        indexer.last_loss = None


def indexer_loss(model: Transformer) -> torch.Tensor:
    """Mean over the indexers of the KL loss each stored in the last forward (and clears them). RuntimeError
    when no forward ran since set_stage."""
    losses = [ix.last_loss for ix in indexers(model) if ix.last_loss is not None]
    if not losses:
        raise RuntimeError("no indexer loss was computed: call set_stage(model, ...) and run a forward first")
    for ix in indexers(model):
        ix.last_loss = None
    return torch.stack(losses).mean()


def drop_frozen_grads(model: Transformer) -> None:
    """Frozen parameters get no optimizer update at all (AdamW skips a None gradient, weight decay included),
    even where a collective filled in zeros."""
    for p in model.parameters():
        if not p.requires_grad:
            p.grad = None

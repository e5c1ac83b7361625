"""Held-out evaluation of a trained model: perplexity, bits per byte, expert load, MTP draft acceptance.

Sliding windows (as in transformers' perplexity guide): windows of `seq_len` tokens, each scoring only the
`stride` tokens the previous one did not, so every token after the first is scored exactly once with at
least seq_len - stride tokens of context (stride = seq_len - 1, the default: nearly disjoint windows; a
smaller stride: more context, more compute).

    perplexity    = exp(sum of -log p(token) / scored tokens)
    bits per byte = sum of -log2 p(token) / UTF-8 bytes of the text   (comparable across tokenizers)

Expert load is counted over the scored positions of every MoE layer: MaxVio = (max load - mean) / mean
(DeepSeek-V3 section 4.5.2) and the experts that got no token. For a model with MTP modules, depth k's
draft at position i (predicting token i + k + 1 from the true tokens up to i + k) is *accepted* when it
equals the main model's greedy choice for that token, which is what speculative decoding accepts; its
accuracy against the text is reported beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..model import Transformer
from . import balance


@dataclass
class EvalResult:
    tokens: int  # scored tokens
    bytes: int  # UTF-8 bytes of the text
    nll: float  # sum of -ln p over the scored tokens (nats)
    expert_load: list[list[int]] = field(default_factory=list)  # per MoE layer of the main model, (E,)
    mtp_accepted: list[int] = field(default_factory=list)  # per depth: drafts equal to the main model's choice
    mtp_correct: list[int] = field(default_factory=list)  # per depth: drafts equal to the text's token
    mtp_drafts: list[int] = field(default_factory=list)  # per depth: drafts made

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    def layer_metrics(self) -> list[dict[str, float]]:
        """balance.load_metrics (max_vio, cv, dead, min, max) of each MoE layer's load."""
        return [balance.load_metrics(torch.tensor(load, dtype=torch.float64)) for load in self.expert_load]

    def as_dict(self) -> dict:
        layers = self.layer_metrics()
        out = {"tokens": self.tokens, "bytes": self.bytes, "loss": self.loss, "perplexity": self.perplexity,
               "bits_per_byte": self.bits_per_byte, "max_vio": [m["max_vio"] for m in layers],
               "dead_experts": [int(m["dead"]) for m in layers], "expert_load": self.expert_load}
        if self.mtp_drafts:
            out["mtp_acceptance"] = [a / max(1, n) for a, n in zip(self.mtp_accepted, self.mtp_drafts)]
            out["mtp_accuracy"] = [c / max(1, n) for c, n in zip(self.mtp_correct, self.mtp_drafts)]
        return out


def windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) of each window over n_tokens. The first window is tokens
    [0, seq_len) and scores 1..seq_len-1; each next one scores the following min(stride, seq_len - 1) tokens
    and ends there, seq_len tokens long, so every scored token has at least one token of context and
    tokens 1..n_tokens-1 are each scored once. ValueError for seq_len < 2, stride < 1 or fewer than 2 tokens."""
    if seq_len < 2 or stride < 1:
        raise ValueError(f"need --seq-len >= 2 and --stride >= 1; got {seq_len} and {stride}")
    if n_tokens < 2:
        raise ValueError(f"the text encodes to {n_tokens} token(s): nothing to score")
    step = min(stride, seq_len - 1)
    out, scored_to = [], 1  # token 0 has no context: never scored
    while scored_to < n_tokens:
        end = min(scored_to + step if out else seq_len, n_tokens)
        out.append((max(0, end - seq_len), end, scored_to))
        scored_to = end
    return out


@torch.no_grad()
def evaluate_tokens(model: Transformer, ids: torch.Tensor, n_bytes: int, seq_len: int, stride: int | None = None,
                    on_window=None) -> EvalResult:
    """Score `ids` (1-D) with `model` in sliding windows. n_bytes: UTF-8 size of the text they encode.
    on_window(done, total): progress callback."""
    was_training = model.training
    model.eval()
    stride = seq_len if stride is None else stride
    ids = ids.long().to(model.embed.weight.device)  # the windows run where the model lives
    plan = windows(ids.numel(), seq_len, stride)
    main_layers = model.moe_layers()
    loads = [torch.zeros(moe.gate.n_experts, dtype=torch.long) for moe in main_layers]
    depth = len(model.mtp)
    result = EvalResult(0, n_bytes, 0.0, mtp_accepted=[0] * depth, mtp_correct=[0] * depth, mtp_drafts=[0] * depth)
    for done, (begin, end, first) in enumerate(plan):
        window = ids[begin:end].unsqueeze(0)  # (1, L)
        length = end - begin
        v4 = model.config.model_type == "deepseek_v4"  # V4's MTP reads the streams (1, L, N, D)
        h = model.streams(window) if v4 else model.hidden_states(window)  # (1, L, [N,] D)
        logits = (model.head(model.norm(model.hc_head(h))) if v4 else model.head(h)).float()[0]  # (L, V)
        rows = torch.arange(first - 1 - begin, length - 1)  # rows predicting the scored tokens first..end-1
        log_p = F.log_softmax(logits[rows], dim=-1)
        result.nll -= float(log_p.gather(1, window[0, rows + 1].unsqueeze(1)).sum())
        result.tokens += rows.numel()
        for load, moe in zip(loads, main_layers):
            picked = moe.last_routing.indices.view(length, -1)[rows]  # positions whose next token is scored
            load += torch.bincount(picked.flatten(), minlength=load.numel())
        greedy = logits.argmax(-1)  # (L,)
        prev = h
        for k in range(1, depth + 1):  # depth k at row i predicts token i + k + 1 from tokens up to i + k
            usable = length - k  # rows 0..length-k-1 have their input token i + k in the window
            if usable < 2:
                break
            prev = model.mtp_hidden(k - 1, prev[:, :usable], window[:, k:k + usable])
            draft = (model.mtp_logits(k - 1, prev) if v4 else model.head(model.mtp[k - 1].norm(prev)).float()
                     )[0].argmax(-1)  # (usable,)
            i = torch.arange(usable - 1)  # token i + k + 1 exists
            i = i[i + k + 1 >= first - begin]  # only tokens scored by this window
            result.mtp_drafts[k - 1] += i.numel()
            result.mtp_accepted[k - 1] += int((draft[i] == greedy[i + k]).sum())
            result.mtp_correct[k - 1] += int((draft[i] == window[0, i + k + 1]).sum())
        if on_window is not None:
            on_window(done + 1, len(plan))
    result.expert_load = [load.tolist() for load in loads]
    if depth == 0:
        result.mtp_accepted = result.mtp_correct = result.mtp_drafts = []
    model.train(was_training)
    return result

"""Shared helpers of the serving-engine tests: tiny models, prompts, the reference, event collection."""

from __future__ import annotations

import threading

import torch

import dsmoe
from dsmoe.presets import get_preset
from dsmoe.serve.blocks import CachePool
from dsmoe.serve.engine import Engine
from dsmoe.serve.protocol import RequestOutput


def tiny_model(preset: str, **changes) -> dsmoe.Transformer:
    torch.manual_seed(0)
    config = get_preset(preset).replace(initializer_range=0.08, num_hidden_layers=2, **changes)
    model = dsmoe.Transformer(config).eval()
    for moe in model.moe_layers():
        if moe.gate.bias is not None:
            moe.gate.bias.uniform_(-0.05, 0.05)
    return model


def make_prompts(n: int, lo: int = 1, hi: int = 40, seed: int = 1, vocab: int = 4096) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def generate_alone(model, prompt: list[int], max_tokens: int, **kw) -> list[int]:
    return dsmoe.generate(model, [prompt], max_tokens, **kw)[0][len(prompt):]


class Collector:
    """Gathers each request's tokens and final event."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.final: dict[str, RequestOutput] = {}
        self.lock = threading.Lock()

    def __call__(self, rid: str):
        def on_event(out: RequestOutput) -> None:
            with self.lock:
                assert rid not in self.final, f"event for {rid} after its final one"
                self.tokens.setdefault(rid, []).extend(out.token_ids)
                if out.finished:
                    self.final[rid] = out
        return on_event


def make_engine(model, tokens: int = 4096, block_size: int = 4, **kw) -> Engine:
    pool = CachePool.from_tokens(model.config, tokens, block_size=block_size, dtype=model.embed.weight.dtype)
    return Engine(model, pool, **kw)


def drain(engine: Engine, limit: int = 5000) -> int:
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < limit and len(engine.running) <= engine.max_running
    return steps

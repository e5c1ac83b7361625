"""The MLA figure: at one fixed cache memory, how many concurrent 2k-token sequences the latent cache admits
against the same model with a decompressed K/V cache, and the generation throughput each reaches.

    python benchmarks/serve_mla.py [--seq-len 2048] [--new-tokens 32] [--mha-sequences 2] [--cache-memory SIZE]
                                   [--dtype fp32|bf16] [--threads 2] [--json OUT]

One random DeepSeek-V3-shaped model (benchmarks/decode.py's: hidden 512, 4 layers, 8 heads, kv_lora 128,
rope 32, nope 64, v 64) is served twice by the same engine (dsmoe.serve.engine.Engine, with a token budget
that admits every prompt in one step) from a cache pool of the same size:

* latent        what MLA caches: kv_lora_rank + qk_rope_head_dim values per token and layer;
* decompressed  per-head keys (qk_nope + qk_rope) and values (v_head_dim), as an MHA cache would hold them.

The cache memory defaults to what holds --mha-sequences sequences of --seq-len positions in the decompressed
layout. Each engine is given one request more than its pool can hold at once (prompts of seq-len - new-tokens
random tokens, new-tokens greedy tokens, EOS ignored); "admitted" is how many run at once (the last one
waits for room). Once every admitted sequence decodes, the two engines step alternately (one decode step of
each in turn, so that both see the same machine load) and the generation throughput of each is its running
sequences / its median step time; the prefill is reported apart. The predicted ratio is the calculator's (dsmoe.calc:
`kv_cache_ratio`, MHA with d_h = qk_nope_head_dim as in DeepSeek-V2's Table 1) and the decompressed layout's own
(qk_head_dim + v_head_dim per head).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import dsmoe
from dsmoe.bench import MODEL as BENCH_MODEL
from dsmoe.calc import arch_stats, format_bytes
from dsmoe.config import ModelConfig
from dsmoe.serve.blocks import CachePool, bytes_per_block
from dsmoe.serve.engine import Engine
from dsmoe.serve.protocol import SamplingParams

MODEL = dict(BENCH_MODEL, moe_intermediate_size=128, model_type="deepseek_v3", scoring_func="sigmoid",
             topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def prefill(model: dsmoe.Transformer, layout: str, memory: int, seq_len: int, new_tokens: int, block_size: int,
            seed: int = 0) -> tuple[Engine, dict]:
    """An engine over a pool of `memory` bytes, given capacity + 1 requests, stepped until its running
    sequences all decode (the prompts are admitted in one step: the token budget holds them all)."""
    dtype = model.embed.weight.dtype
    pool = CachePool.from_memory(model.config, memory, block_size, dtype, layout=layout)
    per_seq = -(-(seq_len - 1) // block_size)  # the last sampled token is never cached
    capacity = pool.num_blocks // per_seq
    engine = Engine(model, pool, max_running=max(capacity, 1), max_waiting=capacity + 1,
                    max_tokens_per_step=max(capacity, 1) * seq_len, prefix_caching=False)
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    for i in range(capacity + 1):
        prompt = torch.randint(0, model.config.vocab_size, (seq_len - new_tokens,), generator=g).tolist()
        engine.add(str(i), prompt, params, lambda out: None)
    t = time.perf_counter()
    while not engine.running or any(len(s.tokens) - s.computed > 1 for s in engine.running):
        engine.step()
    return engine, dict(layout=layout, pool_blocks=pool.num_blocks, pool_bytes=pool.nbytes(), capacity=capacity,
                        admitted=len(engine.running), waiting=len(engine.waiting),
                        prefill_s=time.perf_counter() - t)


def decode_side_by_side(engines: list[Engine], rows: list[dict]) -> None:
    """Alternate one decode step of each engine while every one still runs its full batch; the median
    step time of each gives its generation throughput (running sequences / step time)."""
    times: list[list[float]] = [[] for _ in engines]
    while all(len(e.running) == r["admitted"] for e, r in zip(engines, rows)):
        for e, ts in zip(engines, times):
            t = time.perf_counter()
            e.step()
            ts.append(time.perf_counter() - t)
    for r, ts in zip(rows, times):
        r["decode_steps"] = len(ts)
        r["step_ms_median"] = 1e3 * statistics.median(ts)
        r["step_ms_best"] = 1e3 * min(ts)
        r["decode_tok_s"] = r["admitted"] / statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--mha-sequences", type=int, default=2,
                    help="size the pool to hold this many sequences in the decompressed layout")
    ap.add_argument("--cache-memory", default=None, help="fixed pool size (overrides --mha-sequences), e.g. 80MiB")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig(**MODEL)
    dtype = DTYPES[args.dtype]
    model = dsmoe.Transformer(config).to(dtype).eval()
    per_seq_blocks = -(-(args.seq_len - 1) // args.block_size)
    if args.cache_memory is None:
        memory = args.mha_sequences * per_seq_blocks * bytes_per_block(config, args.block_size, dtype, "decompressed")
    else:
        from dsmoe.serve.blocks import parse_size
        memory = parse_size(args.cache_memory)
    stats = arch_stats(config)
    layout_ratio = (bytes_per_block(config, 1, dtype, "decompressed") / bytes_per_block(config, 1, dtype, "latent"))
    print(f"model: DeepSeek-V3-shaped, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{args.dtype}, {args.threads} threads; cache memory {format_bytes(memory)}; sequences of "
          f"{args.seq_len} positions ({args.seq_len - args.new_tokens} prompt + {args.new_tokens} new)", flush=True)
    engines, rows = zip(*(prefill(model, layout, memory, args.seq_len, args.new_tokens, args.block_size)
                          for layout in ("latent", "decompressed")))
    decode_side_by_side(list(engines), list(rows))
    lat, dec = rows
    print("\n| cache layout | values / token / layer | pool blocks | sequences admitted | prefill s | "
          "decode step ms (median) | decode tok/s |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        itemsize = model.embed.weight.element_size()
        width = bytes_per_block(config, 1, dtype, r["layout"]) // (config.num_hidden_layers * itemsize)
        print(f"| {r['layout']} | {width} | {r['pool_blocks']} | {r['admitted']} | {r['prefill_s']:.1f} | "
              f"{r['step_ms_median']:.0f} | {r['decode_tok_s']:.1f} |")
    print(f"\nadmitted ratio {lat['admitted'] / dec['admitted']:.2f}x; predicted: decompressed layout "
          f"{layout_ratio:.2f}x, calculator's MHA equivalent (kv_cache_ratio) {stats.kv_cache_ratio:.2f}x; "
          f"generation throughput ratio {lat['decode_tok_s'] / dec['decode_tok_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), memory=memory, layout_ratio=layout_ratio,
                           calc_kv_cache_ratio=stats.kv_cache_ratio, rows=rows, load=os.getloadavg()), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The MLA figure: at one fixed cache memory, how many concurrent 2k-token sequences the latent cache admits
against the same model with a decompressed K/V cache, and the generation throughput each reaches.

    python benchmarks/serve_mla.py [--seq-len 2048] [--new-tokens 32] [--mha-sequences 2] [--cache-memory SIZE]
                                   [--dtype fp32|bf16] [--threads 2] [--json OUT]

One random DeepSeek-V3-shaped model (benchmarks/decode.py's: hidden 512, 4 layers, 8 heads, kv_lora 128,
rope 32, nope 64, v 64) is served twice by the same engine (dsmoe.serve.engine.Engine, a token budget that admits every prompt in one step) from a cache pool of
the same size:

* latent        what MLA caches: kv_lora_rank + qk_rope_head_dim values per token and layer;
* decompressed  per-head keys (qk_nope + qk_rope) and values (v_head_dim), as an MHA cache would hold them.

The cache memory defaults to what holds --mha-sequences sequences of --seq-len positions in the decompressed
layout. Each engine is given one request more than its pool can hold at once (prompts of seq-len - new-tokens
random tokens, new-tokens greedy tokens, EOS ignored); "admitted" is the most sequences running at once, and
generation throughput is measured over the steps where that many sequences all decode (tokens / seconds of
those steps; the prefill is reported apart). The predicted ratio is the calculator's (dsmoe.calc:
`kv_cache_ratio`, MHA with d_h = qk_nope_head_dim as in DeepSeek-V2's Table 1) and the decompressed layout's own
(qk_head_dim + v_head_dim per head).
"""

from __future__ import annotations

import argparse
import json
import os
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


def run(model: dsmoe.Transformer, layout: str, memory: int, seq_len: int, new_tokens: int, block_size: int,
        seed: int = 0) -> dict:
    """Serve capacity + 1 requests from a pool of `memory` bytes; return admission and throughput figures."""
    dtype = model.embed.weight.dtype
    pool = CachePool.from_memory(model.config, memory, block_size, dtype, layout=layout)
    per_seq = -(-(seq_len - 1) // block_size)  # the last sampled token is never cached
    capacity = pool.num_blocks // per_seq
    # a budget that admits every prompt in one step, so that all of them then decode together
    engine = Engine(model, pool, max_running=max(capacity, 1), max_waiting=capacity + 1,
                    max_tokens_per_step=max(capacity, 1) * seq_len, prefix_caching=False)
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    for i in range(capacity + 1):
        prompt = torch.randint(0, model.config.vocab_size, (seq_len - new_tokens,), generator=g).tolist()
        engine.add(str(i), prompt, params, lambda out: None)
    max_running, prefill_s, decode_s, decode_tokens, finished = 0, 0.0, 0.0, 0, False
    began = time.perf_counter()
    while not finished:
        batch_decodes = all(len(s.tokens) - s.computed == 1 for s in engine.running)
        running_before = len(engine.running)
        t = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t
        max_running = max(max_running, len(engine.running), running_before)
        if batch_decodes and running_before == capacity and len(engine.running) == capacity:
            decode_s += dt
            decode_tokens += capacity
        elif decode_tokens == 0:
            prefill_s += dt
        finished = (len(engine.running) < capacity and decode_tokens > 0) or not engine.has_work()
    return dict(layout=layout, pool_blocks=pool.num_blocks, pool_bytes=pool.nbytes(), capacity=capacity,
                admitted=max_running, waiting_at_end=len(engine.waiting), preemptions=engine.stats().preemptions,
                prefill_s=prefill_s, decode_s=decode_s, decode_tokens=decode_tokens,
                decode_tok_s=decode_tokens / decode_s if decode_s else 0.0, total_s=time.perf_counter() - began)


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
    rows = [run(model, layout, memory, args.seq_len, args.new_tokens, args.block_size)
            for layout in ("latent", "decompressed")]
    lat, dec = rows
    print("\n| cache layout | values / token / layer | pool blocks | sequences admitted | prefill s | "
          "decode tok/s |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        width = bytes_per_block(config, 1, dtype, r["layout"]) // (config.num_hidden_layers * model.embed.weight.element_size())
        print(f"| {r['layout']} | {width} | {r['pool_blocks']} | {r['admitted']} | {r['prefill_s']:.1f} | "
              f"{r['decode_tok_s']:.1f} |")
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

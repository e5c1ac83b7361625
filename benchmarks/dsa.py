"""DeepSeek Sparse Attention (V3.2) against dense MLA on the same model: prefill forward and cached decode at long
context, where the context is several times index_topk.

One random V3.2-shaped layer (attention-heavy: 64 heads as V3.2 has 128; V3.2's ratios 2C + R : N + R + V =
544 : 160 and index_n_heads * index_head_dim = 256 << heads * (N + R + V); dense MLP);
"dense" is the same model with every key selected (the indexer skipped: exactly dense MLA, naive prefill with
SDPA's fused kernel and absorbed decode), "sparse" is DSA (indexer scores over all keys, then the gathered absorbed
attention over the top-k rows). Timings are the best of a few rounds, interleaved, in one process; compare the
ratio column, not the milliseconds across runs.

    OMP_NUM_THREADS=2 python benchmarks/dsa.py [--contexts 1024,2048,4096,8192] [--topk 128] [--rounds 3]
        [--decode-steps 8] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from dsmoe import ModelConfig, Transformer
from dsmoe.calc import attention_flops_per_token


def bench_config(topk: int, max_len: int) -> ModelConfig:
    return ModelConfig(
        model_type="deepseek_v32", vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
        num_attention_heads=64, q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=128,
        first_k_dense_replace=1, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
        index_n_heads=4, index_head_dim=64, index_topk=topk, max_position_embeddings=max_len)


def _set_dense(model: Transformer, dense: bool) -> None:
    for block in model.layers:
        block.attn.indexer.dense = dense


def _time(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


@torch.no_grad()
def run(contexts: list[int], topk: int, rounds: int, decode_steps: int) -> list[dict]:
    torch.manual_seed(0)
    model = Transformer(bench_config(topk, max(contexts) + decode_steps + 1)).eval()
    rows = []
    for L in contexts:
        ids = torch.randint(0, 1024, (1, L))
        best = {}
        for _ in range(rounds):
            for mode in ("dense", "sparse"):
                _set_dense(model, mode == "dense")
                t = _time(lambda: model.hidden_states(ids, check=False))
                best[f"prefill_{mode}"] = min(best.get(f"prefill_{mode}", t), t)
                cache = model.make_cache(1, L + decode_steps)
                model.hidden_states(ids, cache, check=False)
                token = ids[:, -1:]

                def decode():
                    for i in range(decode_steps):
                        model.hidden_states(token, cache, start=L + i, check=False)

                t = _time(decode) / decode_steps
                best[f"decode_{mode}"] = min(best.get(f"decode_{mode}", t), t)
        config = model.config
        rows.append({
            "context": L, "index_topk": topk, **{k: v * 1e3 for k, v in best.items()},
            "prefill_speedup": best["prefill_dense"] / best["prefill_sparse"],
            "decode_speedup": best["decode_dense"] / best["decode_sparse"],
            # the calculator's per-token attention FLOPs at this context (decode step; prefill averages ~half)
            "attn_flops_ratio": (attention_flops_per_token(config, L, sparse=False)
                                 / attention_flops_per_token(config, L)),
        })
    _set_dense(model, False)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="1024,2048,4096,8192")
    parser.add_argument("--topk", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="contexts 512,1024, topk 64, one round")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.quick:
        contexts, args.topk, args.rounds, args.decode_steps = [512, 1024], 64, 1, 4
    rows = run(contexts, args.topk, args.rounds, args.decode_steps)
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "load": os.getloadavg(), "rows": rows}, indent=2))
        return
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}\n")
    print("| context | top-k | prefill dense ms | prefill sparse ms | speedup | decode dense ms/step | "
          "decode sparse ms/step | speedup | attention FLOPs dense/sparse (per token) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['context']} | {r['index_topk']} | {r['prefill_dense']:.0f} | {r['prefill_sparse']:.0f} | "
              f"{r['prefill_speedup']:.2f}x | {r['decode_dense']:.2f} | {r['decode_sparse']:.2f} | "
              f"{r['decode_speedup']:.2f}x | {r['attn_flops_ratio']:.1f}x |")


if __name__ == "__main__":
    main()

"""dsmoe against llama.cpp on the same weights (issue 16): same model check, prefill, decode, peak RSS.

    pip download --no-binary :all: --no-deps llama-cpp-python -d /tmp/llama && pip install gguf
    python benchmarks/vs_llamacpp.py --llama-sdist /tmp/llama/llama_cpp_python-*.tar.gz \\
        [--llama-cpp DIR] [--work /tmp/dsmoe-vs-llamacpp] [--threads 2] [--rounds 3] [--decode-tokens 32]
        [--dtypes fp32 bf16] [--check-tokens 512] [--json benchmarks/results/vs-llamacpp-cpu2.json]

The checkpoint is dsmoe bench's random DeepSeek-V3-shaped model (dsmoe.bench.MODEL: 91.6M parameters, 64 routed
experts top-6 in 8 groups top-4 + 2 shared, MLA kv_lora 128, vocab 8192), saved by transformers with a
byte-level BPE tokenizer, `scoring_func` / `topk_method` written into config.json, and converted by llama.cpp's
convert_hf_to_gguf.py to GGUF F32 and BF16 (benchmarks/llamacpp.py; llama.cpp's `deepseek2` architecture).

1. Same model: a 64-token random prompt, `--check-tokens` greedy tokens from llama-server (flash attention off,
   f32 K/V cache, its log-probs of the top 10 tokens at every step) against dsmoe on the same weights at the
   same dtype: the greedy tokens, and on llama.cpp's tokens (teacher-forced) the largest |log-prob difference|
   over those top-10 entries and the KL(llama.cpp || dsmoe) restricted to them, mean and max over positions.
2. Speed and memory, batch 1, --threads threads each, every measurement in a fresh process, interleaved run by
   run (round r: for each measurement, for each dtype, dsmoe then llama.cpp):
   * dsmoe prefills in chunks of PREFILL_CHUNK (512) positions, as llama.cpp does in ubatches of 512;
   * prefill 512: 512 prompt tokens into an empty cache, tokens/s (dsmoe: time to the first new token through
     `dsmoe.generate.stream`; llama.cpp: `llama-bench -p 512 -n 0`);
   * decode after 256 / 2048: --decode-tokens greedy steps after a prompt of that length, tokens/s over all
     steps (dsmoe: `stream`, from its first token to its last; llama.cpp: `llama-bench -n N -d 256`);
   * peak RSS: the process's peak (getrusage of the child) in the decode-after-2048 run; for dsmoe also the
     peak while decoding only (VmHWM reset after the prefill; the reset also clears what getrusage reports, so
     the run's peak is the larger of VmHWM before the reset and getrusage) and the peak of a process that only
     imports torch and dsmoe (the PyTorch runtime, which issue 16's RSS target subtracts).
   llama.cpp runs llama-bench's defaults otherwise (f16 K/V cache: llama-bench has no f32 cache type; flash
   attention auto). MLA's cache is 160 values per token per layer here (2.6 MB at 2048 tokens in f16), so its
   type barely moves time or memory. The medians over rounds are reported.

Heavy (minutes on 2 cores, ~1 GiB of files under --work): not part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import llamacpp
from serve_http import free_port, launch, stop_server, wait_ready

GGUF_TYPES = {"fp32": "f32", "bf16": "bf16"}
MEASUREMENTS = ("prefill", "decode@256", "decode@2048")
# dsmoe prefills a long prompt in chunks of this many positions, as llama.cpp does in micro-batches of its
# n_ubatch (llama-bench's default -ub 512): both then hold activations of 512 positions, not of the prompt.
PREFILL_CHUNK = 512


# ---------------------------------------------------------------------------------------------- pure helpers

def prompt_ids(length: int, vocab: int, seed: int) -> list[int]:
    """Deterministic random token ids (the same prompt for both implementations)."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(length)]


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare_logprobs(llama_steps: list[dict], ours: list[dict[int, float]]) -> dict:
    """llama-server completion_probabilities (per step: top_logprobs [{id, logprob}]) against dsmoe's log-probs
    at the same positions (per step: {token id: log-prob}) -> max |difference| over the listed tokens, and the
    KL(llama || dsmoe) restricted to them (sum p_l (log p_l - log p_d) over the listed tokens), mean and max."""
    import math

    worst, kls = 0.0, []
    for step, mine in zip(llama_steps, ours):
        kl = 0.0
        for entry in step["top_logprobs"]:
            lp, lq = entry["logprob"], mine[entry["id"]]
            worst = max(worst, abs(lp - lq))
            kl += math.exp(lp) * (lp - lq)
        kls.append(kl)
    return {"positions": len(kls), "max_abs_logprob_diff": worst, "kl_top_mean": statistics.fmean(kls),
            "kl_top_max": max(kls)}


def bench_args(measurement: str, prefill: int, decode_tokens: int) -> list[str]:
    """llama-bench arguments for one measurement ("prefill" or "decode@<depth>")."""
    if measurement == "prefill":
        return ["-p", str(prefill), "-n", "0"]
    depth = int(measurement.split("@")[1])
    return ["-p", "0", "-n", str(decode_tokens), "-d", str(depth)]


def ratio_table(summary: dict, dtypes: list[str]) -> list[str]:
    """Markdown rows: measurement | per dtype dsmoe tok/s, llama.cpp tok/s (medians), the ratio of the medians,
    the median of the rounds' own ratios (paired: robust to the machine's speed drifting between rounds)."""
    head = "| measurement | " + " | ".join(f"dsmoe {d} | llama.cpp {d} | ratio {d} | paired {d}" for d in dtypes) + " |"
    rows = [head, "| --- |" + " ---: |" * (4 * len(dtypes))]
    for m in MEASUREMENTS:
        cells = []
        for d in dtypes:
            ours, theirs = summary[d][m]["dsmoe"], summary[d][m]["llama.cpp"]
            paired = summary[d][m].get("paired_ratio")
            cells += [f"{ours:.1f}", f"{theirs:.1f}", f"{ours / theirs:.2f}x",
                      "" if paired is None else f"**{paired:.2f}x**"]
        rows.append(f"| {m} (tok/s) | " + " | ".join(cells) + " |")
    return rows


# ---------------------------------------------------------------------------------------------- processes

# A small launcher between this process and each measured one: Linux carries the parent's peak RSS into a
# child's ru_maxrss across fork + exec, and this process holds a model while checking; the launcher is small.
_LAUNCH = """
import os, sys
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"\\nMAXRSS_KIB {usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(cmd: list[str], env: dict) -> tuple[str, int]:
    """Run cmd -> (stdout, its own peak RSS in bytes, from wait4 in a small launcher process)."""
    done = subprocess.run([sys.executable, "-c", _LAUNCH, *cmd], check=False, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({done.returncode}): {done.stderr[-1500:]}")
    kib = [line.split()[1] for line in done.stderr.splitlines() if line.startswith("MAXRSS_KIB ")]
    return done.stdout, int(kib[-1]) * 1024


def llama_measure(bin_dir: Path, gguf: Path, dtype: str, measurement: str, args) -> dict:
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(args.threads), "-r", "1", "-o", "json",
           *bench_args(measurement, args.prefill, args.decode_tokens)]
    text, peak = run_measured(cmd, llamacpp.child_env(args.threads))
    test = json.loads(text)[0]
    return {"tokens_per_s": test["avg_ts"], "peak_rss_bytes": peak, "flash_attn": test.get("flash_attn"),
            "type_k": test.get("type_k")}


def dsmoe_measure(checkpoint: Path, dtype: str, measurement: str, args) -> dict:
    job = {"checkpoint": str(checkpoint), "dtype": dtype, "measurement": measurement, "prefill": args.prefill,
           "decode_tokens": args.decode_tokens, "threads": args.threads, "decode": args.decode}
    env = llamacpp.child_env(args.threads)
    env.setdefault("OMP_WAIT_POLICY", "active")  # what `dsmoe generate` sets (dsmoe._startup); llama.cpp spins too
    if args.decode == "pytorch":
        env["DSMOE_CPU_KERNELS"] = "0"
    text, peak = run_measured([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)], env)
    result = json.loads(text.strip().splitlines()[-1])
    # resetting VmHWM after the prefill also resets what wait4 reports: the run's peak is the larger of the two
    result["peak_rss_bytes"] = max(peak, result.pop("prefill_peak_rss_bytes", None) or 0)
    return result


def worker(job: dict) -> dict:
    """One dsmoe measurement in this process (run by dsmoe_measure in a fresh interpreter)."""
    import torch

    import dsmoe
    from dsmoe.generate import stream

    torch.set_num_threads(job["threads"])
    if job["measurement"] == "baseline":
        return {}
    model = dsmoe.load_pretrained(job["checkpoint"], dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[
        job["dtype"]]).eval()
    vocab = model.config.vocab_size
    for _ in stream(model, torch.tensor([prompt_ids(16, vocab, 1)]), 4):  # warm-up: allocator, kernels
        pass
    if job["measurement"] == "prefill":
        ids = torch.tensor([prompt_ids(job["prefill"], vocab, 2)])
        began = time.perf_counter()
        next(iter(stream(model, ids, 1, prefill_chunk=PREFILL_CHUNK)))
        return {"tokens_per_s": job["prefill"] / (time.perf_counter() - began)}
    depth = int(job["measurement"].split("@")[1])
    ids = torch.tensor([prompt_ids(depth, vocab, 3)])
    n = job["decode_tokens"]
    compiled = job.get("decode") == "compiled"
    if compiled:  # compile for these shapes first, untimed (llama-bench warms up too)
        for _ in stream(model, ids, n + 1, compiled=True, prefill_chunk=PREFILL_CHUNK):
            pass
    times = []
    for i, _ in enumerate(stream(model, ids, n + 1, compiled=compiled, prefill_chunk=PREFILL_CHUNK)):
        times.append(time.perf_counter())
        if i == 0:
            before = _peak()
            _reset_peak()
    return {"tokens_per_s": n / (times[-1] - times[0]), "decode_peak_rss_bytes": _peak(),
            "prefill_peak_rss_bytes": before}


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------------------------- same model

def check_same_model(bin_dir: Path, gguf: Path, checkpoint: Path, dtype: str, args) -> dict:
    """llama-server (exact settings) greedy tokens and top-10 log-probs against dsmoe at `dtype`."""
    import torch

    import dsmoe
    from dsmoe.generate import generate

    model = dsmoe.load_pretrained(checkpoint, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]).eval()
    prompt = prompt_ids(64, model.config.vocab_size, 4)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = launch(llamacpp.server_command(bin_dir, gguf, port, args.threads, 1, 64 + args.check_tokens + 16,
                                          exact=True), llamacpp.child_env(args.threads))
    try:
        wait_ready(proc, url)
        body = {"prompt": prompt, "n_predict": args.check_tokens, "temperature": 0, "top_k": 1, "n_probs": 10,
                "ignore_eos": True, "cache_prompt": False, "samplers": ["top_k"]}
        answer = httpx.post(url + "/completion", json=body, timeout=1800).json()
    finally:
        stop_server(proc)
    steps = answer["completion_probabilities"]
    theirs = [s["id"] for s in steps]
    torch.set_num_threads(args.threads)
    with torch.no_grad():
        mine = generate(model, torch.tensor([prompt]), len(theirs))[0, len(prompt):].tolist()  # prompt + new
        logits = model(torch.tensor([prompt + theirs]))[0, len(prompt) - 1:-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        ours = [{e["id"]: float(logprobs[i, e["id"]]) for e in s["top_logprobs"]} for i, s in enumerate(steps)]
        result = compare_logprobs(steps, ours)
        if dtype != "fp32":  # also: fp32 arithmetic on the same rounded weights (llama.cpp keeps f32 activations)
            wide = model.float()
            greedy = generate(wide, torch.tensor([prompt]), len(theirs))[0, len(prompt):].tolist()
            lp = torch.log_softmax(wide(torch.tensor([prompt + theirs]))[0, len(prompt) - 1:-1].float(), dim=-1)
            alt = compare_logprobs(steps, [{e["id"]: float(lp[i, e["id"]]) for e in s["top_logprobs"]}
                                           for i, s in enumerate(steps)])
            alt["greedy_identical"] = common_prefix(greedy, theirs)
            result["dsmoe_fp32_compute_on_rounded_weights"] = alt
    result.update({"greedy_tokens": len(theirs), "greedy_identical": common_prefix(mine, theirs),
                   "prompt_tokens": answer.get("tokens_evaluated"), "dtype": dtype, "gguf": gguf.name})
    return result


# ---------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--llama-cpp", type=Path, default=None, metavar="DIR",
                   help="a llama.cpp build: DIR, DIR/bin or DIR/build/bin holds llama-server and llama-bench")
    p.add_argument("--llama-sdist", type=Path, default=None, metavar="TAR",
                   help="llama-cpp-python sdist: unpacked and built under --work (cmake, Release, CPU)")
    p.add_argument("--llama-src", type=Path, default=None, metavar="DIR",
                   help="llama.cpp source (for convert_hf_to_gguf.py) when --llama-cpp is a build elsewhere")
    p.add_argument("--work", type=Path, default=Path("/tmp/dsmoe-vs-llamacpp"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(GGUF_TYPES))
    p.add_argument("--check-tokens", type=int, default=512)
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--decode", choices=["kernels", "compiled", "pytorch"], default="kernels",
                   help="dsmoe's decode step: kernels = dsmoe.generate's default on the CPU (KernelDecodeStep); "
                        "compiled = generate(compiled=True); pytorch = DSMOE_CPU_KERNELS=0, the eager PyTorch step")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    args.work.mkdir(parents=True, exist_ok=True)
    if args.llama_cpp is not None:
        bin_dir = llamacpp.find_bin(args.llama_cpp)
        src = args.llama_src or (args.llama_cpp if (args.llama_cpp / "convert_hf_to_gguf.py").is_file() else None)
        if src is None and args.llama_sdist is not None:
            src = llamacpp.source_dir(args.llama_sdist, args.work)
    elif args.llama_sdist is not None:
        src = llamacpp.source_dir(args.llama_sdist, args.work)
        bin_dir = llamacpp.build(src, args.work / "llama-build")
    else:
        p.error("give --llama-cpp DIR (a build) or --llama-sdist TAR (the llama-cpp-python sdist)")
    if src is None:
        p.error("convert_hf_to_gguf.py not found: give --llama-src DIR or --llama-sdist TAR")

    from dsmoe.bench import MODEL, build_checkpoint

    checkpoint = args.work / "checkpoint"
    if not (checkpoint / "model.safetensors").is_file():
        build_checkpoint(checkpoint, MODEL)
        llamacpp.write_bpe_tokenizer(checkpoint, MODEL["vocab_size"])
    ggufs = {d: llamacpp.convert(src, checkpoint, args.work / f"model-{GGUF_TYPES[d]}.gguf", GGUF_TYPES[d])
             for d in args.dtypes}

    loads = [os.getloadavg()]
    checks = {}
    if not args.skip_check:
        for d in args.dtypes:
            checks[d] = check_same_model(bin_dir, ggufs[d], checkpoint, d, args)
            print(f"same model {d}: {checks[d]}", file=sys.stderr, flush=True)

    runs: dict = {d: {m: {"dsmoe": [], "llama.cpp": []} for m in MEASUREMENTS} for d in args.dtypes}
    for r in range(args.rounds):
        for m in MEASUREMENTS:
            for d in args.dtypes:
                runs[d][m]["dsmoe"].append(dsmoe_measure(checkpoint, d, m, args))
                runs[d][m]["llama.cpp"].append(llama_measure(bin_dir, ggufs[d], d, m, args))
                print(f"round {r} {m} {d}: dsmoe {runs[d][m]['dsmoe'][-1]['tokens_per_s']:.1f} tok/s, llama.cpp "
                      f"{runs[d][m]['llama.cpp'][-1]['tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
        loads.append(os.getloadavg())
    _, baseline_rss = run_measured([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(
        {"measurement": "baseline", "threads": args.threads})], llamacpp.child_env(args.threads))

    summary: dict = {}
    for d in args.dtypes:
        summary[d] = {m: {impl: statistics.median(x["tokens_per_s"] for x in rs) for impl, rs in v.items()}
                      for m, v in runs[d].items()}
        for m, v in runs[d].items():  # each round's two runs are back to back: their ratio shares the machine's state
            summary[d][m]["paired_ratio"] = statistics.median(
                a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(v["dsmoe"], v["llama.cpp"]))
        deep = runs[d]["decode@2048"]
        summary[d]["peak_rss_bytes"] = {impl: max(x["peak_rss_bytes"] for x in rs) for impl, rs in deep.items()}
        summary[d]["dsmoe_decode_only_peak_rss_bytes"] = max(x.get("decode_peak_rss_bytes") or 0
                                                             for x in deep["dsmoe"])
    summary["torch_dsmoe_import_rss_bytes"] = baseline_rss

    print("\n".join(ratio_table(summary, args.dtypes)))
    for d in args.dtypes:
        rss = summary[d]["peak_rss_bytes"]
        net = (rss["dsmoe"] - baseline_rss) / rss["llama.cpp"]
        summary[d]["rss_ratio_less_runtime"] = net
        print(f"{d} peak RSS (decode after 2048): dsmoe {rss['dsmoe'] / 2**20:.0f} MiB "
              f"(import torch+dsmoe alone: {baseline_rss / 2**20:.0f} MiB; the rest / llama.cpp: {net:.2f}x), "
              f"llama.cpp {rss['llama.cpp'] / 2**20:.0f} MiB")
    for d, c in checks.items():
        print(f"same model {d}: greedy {c['greedy_identical']}/{c['greedy_tokens']} identical, max |dlogprob| "
              f"{c['max_abs_logprob_diff']:.2e}, top-10 KL mean {c['kl_top_mean']:.2e} max {c['kl_top_max']:.2e}")
        if "dsmoe_fp32_compute_on_rounded_weights" in c:
            a = c["dsmoe_fp32_compute_on_rounded_weights"]
            print(f"  dsmoe fp32 arithmetic on the {d} weights: greedy {a['greedy_identical']}/{c['greedy_tokens']}, "
                  f"max |dlogprob| {a['max_abs_logprob_diff']:.2e}, top-10 KL mean {a['kl_top_mean']:.2e}")
    if args.json:
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "load_average": loads, "args": {k: str(v) for k, v in vars(args).items()}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "checks": checks, "summary": summary, "runs": runs},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

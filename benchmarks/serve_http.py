"""Serving over HTTP: `dsmoe serve` against `transformers serve` and llama.cpp's `llama-server` on the same weights,
same client, same requests.

    python benchmarks/serve_http.py [--clients 1 8 32] [--requests-per-client 2] [--prompt-tokens 64]
                                    [--new-tokens 32] [--threads 2] [--cache-memory 256MiB]
                                    [--servers dsmoe transformers transformers-cb] [--rounds R] [--json OUT]

One random DeepSeek-V3-shaped model (benchmarks/decode.py's: hidden 512, 4 layers, 8 heads, q_lora 192,
kv_lora 128, 64 routed experts top-6 + 2 shared, vocab 8192) is saved as a transformers checkpoint with a
word-level tokenizer (one word per id, so a prompt of N words is N tokens for both servers) and no EOS (every
answer is exactly --new-tokens tokens). Each server runs in its own process with --threads intra-op threads;
all are started first and measured one after the other, never together; with --rounds R every measurement is
repeated R times, interleaved (round 1: every number of clients against every server, then round 2, ...), and
the table shows the round with the median output tokens/s.

For each number of concurrent clients C, C asyncio clients each send --requests-per-client streaming
/v1/completions requests one after the other (greedy, prompts of --prompt-tokens random words, different
for every request), and the script records per request:

* TTFT   time from sending the request to the first streamed text;
* TPOT   (time of the last text - time of the first) / (tokens - 1);
* output tokens/s   all completion tokens (from each stream's usage) / the wall time of the whole run at C.

transformers serve is run plainly ("transformers") and with --continuous-batching ("transformers-cb"): the
latter failed on DeepSeek-V3's MLA in transformers 5.23 (its paged cache sized keys by head_dim, not
qk_head_dim); a server that fails is reported with its error, not measured. CPU timings on a shared machine
are noisy: compare the rows of one run.

llama-server (`--servers llama-server --llama-cpp BUILD --llama-src SRC`, or `--llama-sdist TAR`; see
benchmarks/llamacpp.py) serves the GGUF conversion (--dtype: F32 or BF16) of the same checkpoint, one server per
number of clients C with `-np C`. With it in the run the checkpoint gets a byte-level BPE tokenizer that
llama.cpp reads, and every server receives the same prompts as token-id lists. transformers serve loads models with a device_map, which needs
`accelerate` installed (pip install accelerate); dsmoe does not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import llamacpp
from decode import MODEL, build_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer: id i <-> the word "w{i}", whitespace-split; no special tokens, no EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                                 "model_max_length": 4096}))
    for name in ("config.json", "generation_config.json"):  # no EOS anywhere: exactly --new-tokens per answer
        path = directory / name
        if path.is_file():
            cfg = json.loads(path.read_text())
            for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
                cfg.pop(key, None)
            path.write_text(json.dumps(cfg, indent=2))


def start_server(kind: str, directory: Path, port: int, threads: int, cache_memory: str,
                 llama: LlamaServer | None = None, clients: int = 8, dtype: str = "fp32") -> subprocess.Popen:
    """One server process on 127.0.0.1:port: dsmoe serve, transformers serve (plain or -cb), or llama-server
    with `clients` slots (-np) on llama.gguf."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if kind == "dsmoe":
        cmd = [sys.executable, "-m", "dsmoe", "serve", "--model", str(directory), "--port", str(port),
               "--served-model-name", "bench", "--cache-memory", cache_memory, "--max-running", "64",
               "--dtype", dtype]
    elif kind == "llama-server":
        if llama is None:
            raise ValueError("llama-server needs --llama-cpp (a build) and --llama-src or --llama-sdist")
        ctx = clients * llama.slot_tokens
        cmd = llamacpp.server_command(llama.bin_dir, llama.gguf, port, threads, clients, ctx)
    else:
        cmd = ["transformers", "serve", str(directory), "--port", str(port), "--host", "127.0.0.1",
               "--device", "cpu", "--dtype", "float32"]
        if kind == "transformers-cb":
            cmd.append("--continuous-batching")
    return launch(cmd, env)


def launch(cmd: list[str], env: dict) -> subprocess.Popen:
    """Start a server command in its own session, its output kept in a temporary file (server_log)."""
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def server_log(proc: subprocess.Popen) -> str:
    proc.log.seek(0)  # type: ignore[attr-defined]
    return proc.log.read()  # type: ignore[attr-defined]


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {server_log(proc)[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become ready")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str | list[int], new_tokens: int,
                      extra: dict | None = None) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    began = time.perf_counter()
    first = last = None
    tokens = None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if any(c.get("text") for c in chunk.get("choices") or []):
                now = time.perf_counter()
                first = now if first is None else first
                last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if first is None or tokens is None:
        raise RuntimeError("a stream without text or without usage")
    return {"ttft": first - began, "tpot": (last - first) / max(tokens - 1, 1), "tokens": tokens}


async def run_clients(url: str, model: str, clients: int, per_client: int, prompt_tokens: int, new_tokens: int,
                      vocab: int, seed: int, token_ids: bool = False, extra: dict | None = None) -> dict:
    """token_ids: send each prompt as a list of token ids instead of words (the same random ids either way).
    extra: additional request fields for one server (llama-server: ignore_eos, as its GPT-2 vocab has a
    default EOS id that a random model may emit)."""
    rng = random.Random(seed)
    ids = [[[rng.randrange(vocab) for _ in range(prompt_tokens)] for _ in range(per_client)] for _ in range(clients)]
    prompts = ids if token_ids else [[" ".join(f"w{t}" for t in p) for p in row] for row in ids]
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        async def worker(i: int) -> list[dict]:
            return [await one_request(client, url, model, p, new_tokens, extra) for p in prompts[i]]

        began = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - began
    ttft = sorted(r["ttft"] for r in results)
    tpot = sorted(r["tpot"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": sum(r["tokens"] for r in results),
            "seconds": wall, "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50": statistics.median(ttft), "ttft_p99": _p99(ttft),
            "tpot_p50": statistics.median(tpot), "tpot_p99": _p99(tpot)}


def median_rows(rows: list[dict]) -> list[dict]:
    """Per (server, clients): the round with the median output tokens/s (its latencies with it), plus every
    round's tokens/s under "rounds_tokens_per_s"."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["server"], r["clients"]), []).append(r)
    out = []
    for group in groups.values():
        ranked = sorted(group, key=lambda r: r["tokens_per_s"])
        out.append({**ranked[(len(ranked) - 1) // 2], "rounds_tokens_per_s": [r["tokens_per_s"] for r in group]})
    return out


def _p99(values: list[float]) -> float:
    return values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]


def print_table(rows: list[dict], failures: dict[str, str]) -> None:
    print("| server | dtype | clients | requests | output tok/s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['server']} | {r.get('dtype', 'fp32')} | {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | "
              f"{1000 * r['ttft_p50']:.0f} ms | {1000 * r['ttft_p99']:.0f} ms | {1000 * r['tpot_p50']:.1f} ms | "
              f"{1000 * r['tpot_p99']:.1f} ms |")
    for server, why in failures.items():
        print(f"\n{server}: not measured ({why})")


@dataclass
class LlamaServer:
    """Where llama-server is, and the GGUF conversion of the benchmark checkpoint it serves."""

    bin_dir: Path
    gguf: Path
    slot_tokens: int  # context per slot (-c = slots x this)


def prepare_llama(args, directory: Path, work: Path) -> LlamaServer:
    """Build or find llama.cpp and convert `directory` to GGUF at --dtype (benchmarks/llamacpp.py)."""
    if args.llama_cpp is not None:
        bin_dir = llamacpp.find_bin(args.llama_cpp)
        src = args.llama_src or (llamacpp.source_dir(args.llama_sdist, work) if args.llama_sdist else args.llama_cpp)
    elif args.llama_sdist is not None:
        src = llamacpp.source_dir(args.llama_sdist, work)
        bin_dir = llamacpp.build(src, work / "llama-build")
    else:
        raise SystemExit("serve_http.py: error: llama-server needs --llama-cpp DIR or --llama-sdist TAR")
    outtype = {"fp32": "f32", "bf16": "bf16"}[args.dtype]
    gguf = llamacpp.convert(src, directory, work / f"bench-{outtype}.gguf", outtype)
    return LlamaServer(bin_dir, gguf, args.prompt_tokens + args.new_tokens + 64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-memory", default="256MiB")
    p.add_argument("--servers", nargs="+", default=["dsmoe", "transformers", "transformers-cb"],
                   choices=["dsmoe", "transformers", "transformers-cb", "llama-server"])
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="dsmoe serve --dtype and the GGUF type for llama-server (transformers: always fp32)")
    p.add_argument("--llama-cpp", type=Path, default=None, metavar="DIR",
                   help="a llama.cpp build (DIR, DIR/bin or DIR/build/bin holds llama-server, llama-bench)")
    p.add_argument("--llama-src", type=Path, default=None, metavar="DIR",
                   help="llama.cpp source with convert_hf_to_gguf.py (default: --llama-cpp itself)")
    p.add_argument("--llama-sdist", type=Path, default=None, metavar="TAR",
                   help="the llama-cpp-python sdist: source (and, without --llama-cpp, a build in a temp dir)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat every (server, clients) measurement, interleaved; the table shows medians")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    with_llama = "llama-server" in args.servers

    rows: list[dict] = []
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "bench"
        build_checkpoint(directory)
        llama = None
        if with_llama:  # byte-level BPE that llama.cpp reads too; prompts go as token ids to every server
            llamacpp.write_bpe_tokenizer(directory, MODEL["vocab_size"])
            llama = prepare_llama(args, directory, Path(tmp))
        else:
            write_tokenizer(directory, MODEL["vocab_size"])
        # Every server process is started (and warmed up) first; then each round runs every number of clients
        # against every server in turn, so that each round sees all of them under the same machine load.
        instances = []  # (label, server, clients it serves or None for all, url, model, extra, process)
        try:
            for server in args.servers:
                extra = {"ignore_eos": True} if server == "llama-server" else None
                model = {"dsmoe": "bench", "llama-server": "bench"}.get(server, str(directory))
                # llama-server's slots are fixed at start: one server per number of clients (-np C)
                for clients in (args.clients if server == "llama-server" else [None]):
                    port = free_port()
                    url = f"http://127.0.0.1:{port}"
                    proc = start_server(server, directory, port, args.threads, args.cache_memory, llama,
                                        clients or max(args.clients), args.dtype)
                    label = server + (f" -np {clients}" if clients else "")
                    try:
                        wait_ready(proc, url)
                        asyncio.run(run_clients(url, model, 1, 1, 8, 4, MODEL["vocab_size"], seed=99,
                                                token_ids=with_llama, extra=extra))  # warm-up
                        instances.append((label, server, clients, url, model, extra, proc))
                    except Exception as err:  # a server that cannot run this model: reported, not measured
                        tail = " ".join(server_log(proc).split()[-60:])
                        failures[label] = f"{type(err).__name__}: {str(err)[:300]}; server log: ...{tail[-600:]}"
                        print(f"{label}: failed: {failures[label]}", file=sys.stderr, flush=True)
                        stop_server(proc)
            for r in range(args.rounds):
                for c in args.clients:
                    for label, server, clients, url, model, extra, proc in instances:
                        if clients not in (None, c) or label in failures:
                            continue
                        try:
                            row = asyncio.run(run_clients(url, model, c, args.requests_per_client,
                                                          args.prompt_tokens, args.new_tokens, MODEL["vocab_size"],
                                                          seed=c * 1000 + r, token_ids=with_llama, extra=extra))
                        except Exception as err:
                            tail = " ".join(server_log(proc).split()[-60:])
                            failures[label] = f"{type(err).__name__}: {str(err)[:300]}; log: ...{tail[-600:]}"
                            print(f"{label}: failed: {failures[label]}", file=sys.stderr, flush=True)
                            continue
                        row.update(server=label, round=r,
                                   dtype="fp32" if server.startswith("transformers") else args.dtype)
                        rows.append(row)
                        print(f"round {r} {label} x{c}: {row['tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
        finally:
            for *_, proc in instances:
                stop_server(proc)
    rows = median_rows(rows) if args.rounds > 1 else rows
    print_table(rows, failures)
    if args.json:
        meta = {"load_average": os.getloadavg(), "args": {k: str(v) for k, v in vars(args).items()}}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "failures": failures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

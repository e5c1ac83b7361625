"""llama.cpp as a benchmark peer: find or build it, convert a dsmoe benchmark checkpoint to GGUF, run its tools.

Nothing of llama.cpp ships with dsmoe. Its source comes from the `llama-cpp-python` sdist on the package index
(vendor/llama.cpp holds the C++ source and `convert_hf_to_gguf.py`):

    pip download --no-binary :all: --no-deps llama-cpp-python -d /tmp/llama
    python benchmarks/vs_llamacpp.py --llama-sdist /tmp/llama/llama_cpp_python-*.tar.gz   # builds into /tmp/llama

or point --llama-cpp at a llama.cpp source tree whose `build/bin` holds llama-server and llama-bench.
The converter needs the `gguf` package (pip install gguf) besides torch/transformers.

Two things the converter gets wrong on our checkpoints unless told (both handled here):
* transformers' DeepseekV3Config does not save `scoring_func` / `topk_method`; without them the GGUF gets no
  expert gating function and llama.cpp routes with softmax (DeepSeek-V3 routes with sigmoid + bias, noaux_tc).
* the converter refuses a byte-level BPE tokenizer whose pre-tokenizer hash it does not know; ours is a plain
  GPT-2-style byte-level tokenizer, so an unknown hash maps to llama.cpp's `gpt-2` pre-tokenizer rule.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

# config.json keys DeepSeek-V3's own checkpoints carry and transformers' export drops.
V3_ROUTING = {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}
TOOLS = ("llama-server", "llama-bench")


def add_routing_keys(config: dict) -> dict:
    """A copy of a DeepSeek-V3 config.json dict with `scoring_func` / `topk_method` set where missing.

    Only model_type deepseek_v3 (and V3.2) routes with sigmoid + noaux_tc; other configs are returned as they are.
    """
    if config.get("model_type") not in ("deepseek_v3", "deepseek_v32"):
        return dict(config)
    return {**V3_ROUTING, **config}


def patch_config(directory: Path) -> None:
    """Write add_routing_keys(config.json) back to directory/config.json."""
    path = Path(directory) / "config.json"
    path.write_text(json.dumps(add_routing_keys(json.loads(path.read_text())), indent=2))


def write_bpe_tokenizer(directory: Path, vocab_size: int) -> None:
    """A GPT-2-style byte-level BPE tokenizer with exactly `vocab_size` ids, written into `directory`.

    ids 0..255: the 256 byte symbols; then merges of two earlier tokens (lowercase letters first, then
    letters with a leading space), deterministic. No special tokens, no EOS: a benchmark answer always runs to
    its token budget. Both dsmoe (tokenizers) and llama.cpp (its `gpt2` BPE) read it the same way.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {_SYMBOL_OF[b]: b for b in range(256)}
    merges: list[tuple[str, str]] = []
    letters = [_sym(c) for c in "abcdefghijklmnopqrstuvwxyz"]
    pieces = list(letters) + [_sym(" ") + c for c in letters]
    for c in letters:  # " a".." z": a space before a letter
        merges.append((_sym(" "), c))
        vocab[_sym(" ") + c] = len(vocab)
    frontier = list(pieces)
    while len(vocab) < vocab_size:
        grown = []
        for left in frontier:
            for right in letters:
                if len(vocab) >= vocab_size:
                    break
                token = left + right
                if token not in vocab:
                    merges.append((left, right))
                    vocab[token] = len(vocab)
                    grown.append(token)
        frontier = grown
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(Path(directory) / "tokenizer.json"))
    (Path(directory) / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096, "add_bos_token": False,
         "add_eos_token": False}))
    for name in ("config.json", "generation_config.json"):  # no EOS anywhere
        path = Path(directory) / name
        if path.is_file():
            cfg = json.loads(path.read_text())
            for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
                cfg.pop(key, None)
            path.write_text(json.dumps(cfg, indent=2))


def _sym(char: str) -> str:
    return _SYMBOL_OF[ord(char)]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable symbol table (the ByteLevel pre-tokenizer's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_SYMBOL_OF = _bytes_to_unicode()


# ---------------------------------------------------------------------------------------------- llama.cpp

def source_dir(sdist: Path, into: Path) -> Path:
    """vendor/llama.cpp of a llama-cpp-python sdist, unpacked under `into` (once)."""
    name = Path(sdist).name.removesuffix(".tar.gz")
    src = into / name / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        with tarfile.open(sdist) as tar:
            tar.extractall(into, filter="data")
    if not (src / "convert_hf_to_gguf.py").is_file():
        raise FileNotFoundError(f"{sdist}: no vendor/llama.cpp/convert_hf_to_gguf.py inside")
    return src


def build(src: Path, build_dir: Path, jobs: int = 2) -> Path:
    """Configure (Release, CPU only, no curl) and build llama-server and llama-bench; returns build_dir/bin."""
    bin_dir = build_dir / "bin"
    if all((bin_dir / t).is_file() for t in TOOLS):
        return bin_dir
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_OPENSSL=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *TOOLS], check=True)
    return bin_dir


def find_bin(llama_cpp: Path) -> Path:
    """The directory holding llama-server and llama-bench: llama_cpp itself, its bin/ or its build/bin/."""
    for d in (llama_cpp, llama_cpp / "bin", llama_cpp / "build" / "bin"):
        if all((d / t).is_file() for t in TOOLS):
            return d
    raise FileNotFoundError(f"{llama_cpp}: no {' and '.join(TOOLS)} in it, its bin/ or build/bin/")


# Run by `python -c` with the llama.cpp source dir first on sys.path: the converter, with an unknown BPE
# pre-tokenizer hash read as GPT-2's rule instead of an error.
_CONVERT = """
import runpy, sys
src, args = sys.argv[1], sys.argv[2:]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion.base import TextModel
known = TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
TextModel.get_vocab_base_pre = pre
sys.argv = [src + "/convert_hf_to_gguf.py", *args]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(src: Path, checkpoint: Path, out: Path, outtype: str) -> Path:
    """checkpoint (a Hugging Face directory) -> GGUF file `out` of `outtype` (f32, bf16, ...).
    Writes the routing keys into config.json first (patch_config)."""
    patch_config(checkpoint)
    if not out.is_file():
        done = subprocess.run([sys.executable, "-c", _CONVERT, str(src), str(checkpoint), "--outfile", str(out),
                               "--outtype", outtype], check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf.py failed on {checkpoint}: {done.stderr[-2000:]}")
    return out


def gguf_metadata(path: Path, keys: tuple[str, ...]) -> dict:
    """Selected metadata fields of a GGUF file (needs the `gguf` package)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    found = {}
    for key in keys:
        field = reader.fields.get(key)
        if field is not None:
            value = field.parts[field.data[0]]
            found[key] = value.tobytes().decode() if value.dtype.kind == "u" and value.itemsize == 1 else value.tolist()
    return found


def server_command(bin_dir: Path, gguf: Path, port: int, threads: int, parallel: int, ctx: int,
                   exact: bool = False) -> list[str]:
    """llama-server on 127.0.0.1 with `parallel` slots sharing a context of `ctx` tokens. exact: flash
    attention off and an f32 K/V cache, for comparing numbers with dsmoe."""
    cmd = [str(bin_dir / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-c", str(ctx), "--no-webui"]
    if exact:
        cmd += ["-fa", "off", "-ctk", "f32", "-ctv", "f32"]
    return cmd


def child_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

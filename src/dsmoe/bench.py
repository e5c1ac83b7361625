"""Throughput of dsmoe against transformers on one DeepSeek-V3-shaped model, in one process.

A random `transformers.DeepseekV3ForCausalLM` (about 90M parameters by default) is saved to a temporary
directory and loaded into dsmoe with `load_pretrained`, so both run the same weights. Measured, for each
dtype, with the two implementations interleaved (A, B, A, B, ...), each timed call preceded by an untimed
call of the same implementation, median over repeats:

* forward     tokens/s of one no-grad forward over (batch, seq_len), full logits computed
* train       tokens/s of forward + next-token cross-entropy + backward (no optimizer step)
* decode      greedy tokens/s at (batch, context): n cached one-token steps after a prefill that is not
              timed (done once per shape; each repeat rewinds the cache to the prompt)
* peak memory the growth of the process's peak RSS during a measured call: the kernel's high-water mark
              (VmHWM) is reset through /proc/self/clear_refs before the call (Linux); None where that fails
* transformers runs with its fastest experts implementation ("grouped_mm" or "eager"), chosen per
              measurement by timing one forward (used for decode too) and one training step with each
* ceiling     the best dsmoe / transformers ratio any implementation could reach on this machine, given
              transformers' measured time: for forward and train, its FLOPs all at the measured matmul peak
              (a training step is counted as 3x the forward's FLOPs); for decode, the bytes a step must read
              at least (the weights one token activates plus the attention cache) at the bandwidth of a
              matrix-vector product over a matrix of that many bytes, repeated (so as cache-resident as such
              a working set can be: an optimistic bandwidth, hence a true upper bound on the ratio). A target
              above its ceiling cannot be met on this machine.
* FLOP/s      dsmoe's forward FLOPs / time as a fraction of a square matmul measured in the same process.
              FLOPs = tokens x (matmul_flops_per_token + attention_flops_per_token(context=seq_len) / 2):
              `dsmoe.calc.arch_stats`, where the attention term is for a query that sees `seq_len` keys, so a
              causal prefill does about half of it. The embedding lookup, norms and softmax are not counted.

On CUDA (BenchConfig.device, `dsmoe bench --device cuda`) both models and every input live on the GPU, each
timed call is bracketed by torch.cuda.synchronize, "peak memory" is the growth of torch.cuda.max_memory_allocated
during the call (the key stays peak_rss_bytes; result["peak_memory"] says which), the matmul peak and the memory
bandwidth are measured on the GPU, and each row also gets its MFU against the GPU's datasheet dense bf16 peak
(`gpu_peaks`; forward: FLOPs above, train step: 3x) and decode its fraction of the datasheet HBM bandwidth for
the bytes a step must read. This path is untested until scripts/gpu_check.sh has passed on a GPU.

transformers is a test extra: it is imported here lazily, and `TransformersMissing` is raised without it.
Library code: nothing is printed; progress goes to an optional callback.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .calc import arch_stats
from .checkpoint import load_pretrained
from .device import resolve_device, synchronize

# transformers.DeepseekV3Config keyword arguments: 91.6M parameters, 23.2M activated per token.
MODEL = dict(
    vocab_size=8192, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64,
    qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
    first_k_dense_replace=1, n_group=8, topk_group=4, max_position_embeddings=4096, initializer_range=0.02,
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("dsmoe", "transformers")
# Targets of issue 6: dsmoe / transformers ratios, and forward FLOP/s as a fraction of the fp32 matmul peak.
TARGETS = {"forward": 3.0, "train": 2.0, "decode": 5.0, "forward_peak_fraction_fp32": 0.40}

Progress = Callable[[str, int, int], None]  # (what is running, steps done, steps in all)


class TransformersMissing(ImportError):
    """The benchmark compares against transformers, which is not installed."""


@dataclass
class BenchConfig:
    dtypes: tuple[str, ...] = ("fp32",)
    batch_size: int = 4
    seq_len: int = 512
    decode_shapes: tuple[tuple[int, int], ...] = ((1, 256), (8, 256), (1, 2048), (8, 2048))  # (batch, context)
    new_tokens: int = 8
    repeats: int = 3
    matmul_size: int = 2048
    matmul_repeats: int = 5
    bandwidth_mebibytes: int = 256  # matrix streamed to measure memory bandwidth: far above the caches
    model: dict = field(default_factory=lambda: dict(MODEL))
    experts_implementations: tuple[str, ...] = ("grouped_mm", "eager")  # transformers candidates
    seed: int = 0
    device: str = "cpu"  # "cpu", "cuda", "cuda:N" or "auto"

    @classmethod
    def quick(cls, **overrides) -> BenchConfig:
        return cls(**{"decode_shapes": ((1, 256),), "repeats": 2, **overrides})


# ---------------------------------------------------------------------------------------------- measuring

class PeakRSS:
    """Peak resident memory growth of one call, from Linux's VmHWM (reset through clear_refs)."""

    def __init__(self) -> None:
        self.works = self._reset() is not None

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"no {key} in /proc/self/status")

    def _reset(self) -> int | None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return self._status("VmRSS")
        except OSError:
            return None

    def measure(self, fn: Callable[[], object]) -> tuple[float, int | None]:
        """(seconds, bytes the peak RSS grew by during fn)."""
        base = self._reset() if self.works else None
        began = time.perf_counter()
        fn()
        seconds = time.perf_counter() - began
        return seconds, (None if base is None else max(0, self._status("VmHWM") - base))


class CudaPeak:
    """PeakRSS's interface for a CUDA device: seconds between two synchronisations, and the growth of
    torch.cuda.max_memory_allocated during the call (the caching allocator's view: tensors, not the pool)."""

    works = True

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def measure(self, fn: Callable[[], object]) -> tuple[float, int | None]:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        began = time.perf_counter()
        fn()
        torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - began
        return seconds, max(0, torch.cuda.max_memory_allocated(self.device) - base)


# Datasheet dense (no sparsity) bf16 tensor-core FLOP/s and HBM bytes/s, matched on the device name.
GPU_PEAKS = {"H200": (989e12, 4.8e12), "H100 SXM": (989e12, 3.35e12), "H100 NVL": (835e12, 3.9e12),
             "H100 PCIe": (756e12, 2.0e12), "H100": (989e12, 3.35e12), "A100-SXM4-80GB": (312e12, 2.04e12),
             "A100": (312e12, 1.56e12), "L40S": (362e12, 0.864e12), "L4": (121e12, 0.3e12),
             "A10G": (70e12, 0.6e12)}


def gpu_peaks(device: torch.device) -> dict | None:
    """{"name", "bf16_flops", "hbm_bytes_per_s"} from the datasheet table above (first key contained in the
    device name), None on the CPU or for a GPU not in the table (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (flops, bandwidth) in GPU_PEAKS.items():
        if key in name:
            return {"name": name, "bf16_flops": flops, "hbm_bytes_per_s": bandwidth, "matched": key}
    return {"name": name, "bf16_flops": None, "hbm_bytes_per_s": None, "matched": None}


def matmul_peak(dtype: torch.dtype, size: int, repeats: int, device: torch.device = torch.device("cpu")) -> float:
    """FLOP/s of a (size x size) @ (size x size) matmul: the best of `repeats` after one warm-up (a peak,
    and the ceilings divide by it: an upper bound wants the fastest)."""
    a, b = torch.randn(size, size, device=device).to(dtype), torch.randn(size, size, device=device).to(dtype)
    return 2 * size**3 / _best_seconds(lambda: torch.mm(a, b), repeats, device)


def memory_bandwidth(repeats: int, mebibytes: float = 256, device: torch.device = torch.device("cpu")) -> float:
    """Bytes/s read by an fp32 matrix-vector product over `mebibytes` MiB of matrix, the best of `repeats` after
    one warm-up: what a decode step reading that many bytes of weights is bound by. A matrix that fits the
    caches reads faster than memory (here: ~100 GB/s at 2 MB, ~50 at 75 MB, ~29 from 128 MB up)."""
    rows = max(1, int(mebibytes * 2**20) // (4 * 4096))
    matrix, vector = torch.randn(rows, 4096, device=device), torch.randn(4096, device=device)
    return matrix.numel() * 4 / _best_seconds(lambda: torch.mv(matrix, vector), repeats, device)


def _best_seconds(fn: Callable[[], object], repeats: int, device: torch.device = torch.device("cpu")) -> float:
    """The fastest of `repeats` timed calls of fn, after one untimed warm-up call (synchronised on CUDA)."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - began)
    return min(times)


def decode_step_bytes(stats, batch: int, context: int, element_size: int) -> int:
    """A lower bound on the bytes one greedy decode step reads: the matmul weights a single token activates
    (a batch reads at least those) and every layer's attention cache for `batch` rows of `context` tokens."""
    weights = stats.matmul_flops_per_token // 2
    cache = stats.kv_cache_per_token * batch * context
    return (weights + cache) * element_size


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, meter: PeakRSS,
                tick: Callable[[], None]) -> dict[str, dict]:
    """Rounds of A, B, ...: per name the times, their median and peak RSS.

    Each timed call comes right after an untimed call of the same function: the first call after the other
    implementation ran is 2-2.5x slower here (a training step: 2.5 s, then 1.0 s; both libraries alike),
    most of it page faults on freshly mapped allocations, which a training or decode loop pays only once."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, int | None] = {name: None for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            fn()
            seconds, peak = meter.measure(fn)
            times[name].append(seconds)
            if peak is not None:
                peaks[name] = max(peaks[name] or 0, peak)
        tick()
    return {name: {"seconds": statistics.median(t), "times_s": t, "peak_rss_bytes": peaks[name]}
            for name, t in times.items()}


# ---------------------------------------------------------------------------------------------- models

@torch.no_grad()
def spread_norms_and_router_biases(model: torch.nn.Module) -> torch.nn.Module:
    """Norm weights uniform in [0.5, 1.5] and router correction biases in [-0.1, 0.1] instead of the
    ones / zeros a fresh model starts with, so that every tensor matters to the output and a comparison
    of two implementations on these weights can fail. Works on transformers and dsmoe models alike."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.uniform_(0.5, 1.5)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.uniform_(-0.1, 0.1)
    return model


def build_checkpoint(directory: Path, model_kwargs: dict, seed: int = 0):
    """A random transformers DeepseekV3ForCausalLM saved to `directory`; returned in eval mode (fp32).
    Norm weights and router biases are spread (spread_norms_and_router_biases) so routing is not degenerate."""
    try:
        import transformers
    except ImportError as err:
        raise TransformersMissing("dsmoe bench needs transformers: pip install -e .[test]") from err
    torch.manual_seed(seed)
    config = transformers.DeepseekV3Config(**model_kwargs)
    config.num_nextn_predict_layers = 0
    model = spread_norms_and_router_biases(transformers.DeepseekV3ForCausalLM(config).eval())
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # its "Writing model shards" bar would go to stderr
    try:
        model.save_pretrained(directory)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return model


def _forward_fns(ours, hf, ids: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    def dsmoe_fwd():
        with torch.no_grad():
            return ours(ids)

    def hf_fwd():
        with torch.no_grad():
            return hf(ids, use_cache=False).logits
    return {"dsmoe": dsmoe_fwd, "transformers": hf_fwd}


def next_token_targets(ids: torch.Tensor) -> torch.Tensor:
    """(B*T,) targets for logits (B*T, V) of ids (B, T): the next token, -100 (ignored) at each row's last
    position, as transformers' labels=ids does. The loss then runs over the logits as they come, with no
    shifted copy of a (B, T, vocab) tensor."""
    return F.pad(ids[:, 1:], (0, 1), value=-100).flatten()


def _train_fns(ours, hf, ids: torch.Tensor) -> dict[str, Callable[[], None]]:
    targets = next_token_targets(ids)

    def dsmoe_step():
        loss = F.cross_entropy(ours(ids).flatten(0, 1), targets, ignore_index=-100)
        loss.backward()
        ours.zero_grad(set_to_none=True)

    def hf_step():
        hf(ids, labels=ids, use_cache=False).loss.backward()
        hf.zero_grad(set_to_none=True)
    return {"dsmoe": dsmoe_step, "transformers": hf_step}


class _Decoder:
    """Greedy decoding of n tokens after a prefill done once; each run rewinds the cache to the prompt."""

    def __init__(self, ours, hf, ids: torch.Tensor, n: int) -> None:
        self.ours, self.hf, self.ids, self.n = ours, hf, ids, n
        B, T = ids.shape
        with torch.no_grad():
            self.cache = ours.make_cache(B, T + n)
            self.first = ours.head(ours.hidden_states(ids, self.cache)[:, -1]).argmax(-1)  # (B,)
            out = hf(ids, use_cache=True, logits_to_keep=1)
            self.hf_cache, self.hf_first = out.past_key_values, out.logits[:, -1].argmax(-1)
        self.tokens: dict[str, torch.Tensor] = {}

    def dsmoe(self) -> None:
        from .kernel_step import KernelDecodeStep

        (B, T), token, out = self.ids.shape, self.first, []
        with torch.no_grad():
            # as dsmoe.generate does: the kernel step on the CPU where it applies, else the eager step with ids
            # checked once (the prompt), not per sampled token
            kernel_step = (KernelDecodeStep(self.ours, self.cache) if self.ids.device.type == "cpu"
                           and KernelDecodeStep.supports(self.ours, self.cache, B) else None)
            for step in range(self.n):
                if kernel_step is not None:
                    logits = kernel_step(token, T + step)
                else:
                    logits = self.ours(token[:, None], cache=self.cache, start=T + step, check=False)[:, -1]
                token = logits.argmax(-1)
                out.append(token)
        self.tokens["dsmoe"] = torch.stack(out, dim=1)

    def transformers(self) -> None:
        T, token, out = self.ids.shape[1], self.hf_first, []
        with torch.no_grad():
            for _ in range(self.n):
                logits = self.hf(token[:, None], past_key_values=self.hf_cache, use_cache=True).logits
                token = logits[:, -1].argmax(-1)
                out.append(token)
        self.hf_cache.crop(-self.n)
        if self.hf_cache.get_seq_length() != T:
            raise RuntimeError(f"transformers cache holds {self.hf_cache.get_seq_length()} tokens after crop, not {T}")
        self.tokens["transformers"] = torch.stack(out, dim=1)


# ---------------------------------------------------------------------------------------------- run

def _row(kind: str, dtype: str, batch: int, tokens_per_call: int, shape: str, m: dict[str, dict]) -> dict:
    row = {"measurement": kind, "dtype": dtype, "batch": batch, "shape": shape}
    for name in IMPLS:
        row[name] = dict(m[name], tokens_per_s=tokens_per_call / m[name]["seconds"])
    row["ratio"] = row["dsmoe"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
    return row


def run_bench(cfg: BenchConfig, progress: Progress | None = None) -> dict:
    """Every measurement of the module docstring; returns one JSON-serialisable dict."""
    progress = progress or (lambda what, done, total: None)
    device = resolve_device(cfg.device, allow_meta=False)
    meter = CudaPeak(device) if device.type == "cuda" else PeakRSS()
    per_dtype = 2 + len(cfg.decode_shapes)
    total, done = 1 + len(cfg.dtypes) * (1 + per_dtype * cfg.repeats), 0

    def tick(what: str) -> Callable[[], None]:
        def step() -> None:
            nonlocal done
            done += 1
            progress(what, done, total)
        return step

    progress("building the model", 0, total)
    with tempfile.TemporaryDirectory(prefix="dsmoe-bench-") as tmp:
        hf32 = build_checkpoint(Path(tmp), cfg.model, cfg.seed)
        hf32 = hf32.to(device)
        models = {name: (load_pretrained(tmp, dtype=DTYPES[name], device=device),
                         hf32 if name == "fp32" else _cast(hf32, DTYPES[name])) for name in cfg.dtypes}
    tick("model built")()
    ours_config = next(iter(models.values()))[0].config
    stats = arch_stats(ours_config, context=cfg.seq_len)
    B, T = cfg.batch_size, cfg.seq_len
    fwd_flops = B * T * (stats.matmul_flops_per_token + stats.attention_flops_per_token / 2)
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, cfg.model["vocab_size"], (B, T), generator=gen).to(device)
    peaks = gpu_peaks(device)

    result: dict = {
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "device": str(device), "gpu": peaks, "cuda": torch.version.cuda},
        "config": {"batch_size": B, "seq_len": T, "decode_shapes": [list(s) for s in cfg.decode_shapes],
                   "new_tokens": cfg.new_tokens, "repeats": cfg.repeats, "dtypes": list(cfg.dtypes),
                   "bandwidth_mebibytes": cfg.bandwidth_mebibytes},
        "model": {"hf_config": dict(cfg.model), "total_params": stats.total_params,
                  "activated_params": stats.activated_params, "forward_flops": fwd_flops,
                  "flops_definition": "B*T*(matmul_flops_per_token + attention_flops_per_token(context=T)/2)"},
        "peak_rss_measured": meter.works,
        "peak_memory": "cuda max_memory_allocated growth" if device.type == "cuda" else "process peak RSS growth",
        "matmul_peak_flops": {}, "experts_implementation": {}, "rows": [], "parity": {},
    }
    progress("memory bandwidth", done, total)
    result["memory_bandwidth_bytes_per_s"] = memory_bandwidth(cfg.matmul_repeats, cfg.bandwidth_mebibytes, device)
    for dname in cfg.dtypes:
        ours, hf = models[dname]
        dtype = DTYPES[dname]
        progress(f"{dname}: matmul peak", done, total)
        result["matmul_peak_flops"][dname] = matmul_peak(dtype, cfg.matmul_size, cfg.matmul_repeats, device)

        with torch.no_grad():
            a, b = ours(ids), hf(ids, use_cache=False).logits.float()
        per_position = (a - b).abs().amax(dim=-1)  # (B, T)
        # A near-tie in top-k routing can flip on the last bit and move one position's logits a lot while
        # every other position agrees to 1e-6: count the positions that differ, not just the worst one.
        parity = {"forward_logits_max_abs_diff": per_position.max().item(),
                  "forward_logits_max_abs": b.abs().max().item(),
                  "forward_positions_differing": int((per_position > 1e-3).sum()),
                  "forward_positions": per_position.numel(),
                  "forward_argmax_agree_fraction": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}
        with torch.no_grad():  # the objective both training steps differentiate: transformers' own labels path
            ours_loss = F.cross_entropy(a.flatten(0, 1), next_token_targets(ids), ignore_index=-100).item()
            hf_loss = hf(ids, labels=ids, use_cache=False).loss.item()
        parity["train_loss"] = {"dsmoe": ours_loss, "transformers": hf_loss}
        del a, b
        tick(f"{dname}: parity")()

        what = f"{dname}: forward {B}x{T}"
        fns = _forward_fns(ours, hf, ids)
        experts = {"forward": _pick_experts_impl(hf, fns["transformers"], cfg.experts_implementations, device)}
        m = interleaved(fns, cfg.repeats, meter, tick(what))
        row = _row("forward", dname, B, B * T, f"{B}x{T}", m)
        row["dsmoe_flops_per_s"] = fwd_flops / m["dsmoe"]["seconds"]
        row["transformers_flops_per_s"] = fwd_flops / m["transformers"]["seconds"]
        row["dsmoe_peak_fraction"] = row["dsmoe_flops_per_s"] / result["matmul_peak_flops"][dname]
        row["transformers_peak_fraction"] = row["transformers_flops_per_s"] / result["matmul_peak_flops"][dname]
        row["ceiling"] = 1 / row["transformers_peak_fraction"]
        if peaks and peaks["bf16_flops"]:
            row["dsmoe_mfu_bf16_peak"] = row["dsmoe_flops_per_s"] / peaks["bf16_flops"]
        result["rows"].append(row)

        what = f"{dname}: train step {B}x{T}"
        fns = _train_fns(ours, hf, ids)
        progress(what + " (choosing the transformers experts implementation)", done, total)
        experts["train"] = _pick_experts_impl(hf, fns["transformers"], cfg.experts_implementations, device)
        m = interleaved(fns, cfg.repeats, meter, tick(what))
        row = _row("train", dname, B, B * T, f"{B}x{T}", m)
        row["ceiling"] = m["transformers"]["seconds"] * result["matmul_peak_flops"][dname] / (3 * fwd_flops)
        if peaks and peaks["bf16_flops"]:
            row["dsmoe_mfu_bf16_peak"] = 3 * fwd_flops / m["dsmoe"]["seconds"] / peaks["bf16_flops"]
        result["rows"].append(row)
        if experts["forward"]["chosen"] is not None:
            hf.set_experts_implementation(experts["forward"]["chosen"])  # decode: the forward's choice
        experts["decode"] = experts["forward"]
        result["experts_implementation"][dname] = experts

        for batch, context in cfg.decode_shapes:
            what = f"{dname}: decode batch {batch} context {context}"
            progress(what + " (prefill)", done, total)
            prompt = torch.randint(0, cfg.model["vocab_size"], (batch, context), generator=gen).to(device)
            dec = _Decoder(ours, hf, prompt, cfg.new_tokens)
            m = interleaved({"dsmoe": dec.dsmoe, "transformers": dec.transformers}, cfg.repeats, meter, tick(what))
            row = _row("decode", dname, batch, batch * cfg.new_tokens, f"{batch}x{context}+{cfg.new_tokens}", m)
            least = decode_step_bytes(stats, batch, context, dtype.itemsize)
            row["step_bytes"] = least
            # Best of 10: a working set near the cache size reads at memory or cache speed from run to run,
            # and a ceiling wants the fastest.
            row["step_bandwidth_bytes_per_s"] = memory_bandwidth(max(10, cfg.matmul_repeats), least / 2**20, device)
            if peaks and peaks["hbm_bytes_per_s"]:  # bytes a step must read / step time, against the datasheet HBM
                step_s = m["dsmoe"]["seconds"] / cfg.new_tokens
                row["dsmoe_hbm_fraction"] = least / step_s / peaks["hbm_bytes_per_s"]
            row["ceiling"] = m["transformers"]["seconds"] * row["step_bandwidth_bytes_per_s"] / (cfg.new_tokens * least)
            result["rows"].append(row)
            same = (dec.tokens["dsmoe"] == dec.tokens["transformers"]) & (dec.first == dec.hf_first)[:, None]
            parity[f"decode_{batch}x{context}_tokens_equal"] = bool(same.all())
            parity[f"decode_{batch}x{context}_tokens_equal_fraction"] = same.float().mean().item()
            del dec
        result["parity"][dname] = parity
        for row in result["rows"]:
            if row["dtype"] == dname:
                row["transformers_experts_implementation"] = experts[row["measurement"]]["chosen"]
    result["targets"] = targets(result)
    return result


def _cast(hf32, dtype: torch.dtype):
    import copy

    return copy.deepcopy(hf32).to(dtype)


def _pick_experts_impl(hf, fn: Callable[[], object], candidates: Sequence[str],
                       device: torch.device = torch.device("cpu")) -> dict:
    """Time fn once (after a warm-up) per transformers experts implementation; set and report the fastest."""
    if not hasattr(hf, "set_experts_implementation"):
        return {"chosen": None, "seconds": {}}
    timed = {}
    for impl in candidates:
        try:
            hf.set_experts_implementation(impl)
        except (ValueError, KeyError, ImportError):
            continue
        fn()
        synchronize(device)
        began = time.perf_counter()
        fn()
        synchronize(device)
        timed[impl] = time.perf_counter() - began
    chosen = min(timed, key=timed.get)
    hf.set_experts_implementation(chosen)
    return {"chosen": chosen, "seconds": timed}


def targets(result: dict) -> list[dict]:
    """Each target of issue 6 against the worst ratio measured for it (fp32 rows; bf16 reported beside)."""
    out = []
    for kind in ("forward", "train", "decode"):
        for dname in result["config"]["dtypes"]:
            ratios = [r["ratio"] for r in result["rows"] if r["measurement"] == kind and r["dtype"] == dname]
            ceilings = [r["ceiling"] for r in result["rows"] if r["measurement"] == kind and r["dtype"] == dname]
            if ratios:
                # A target holds for every shape, so it is reachable only if the lowest ceiling allows it.
                out.append({"target": f"{kind} >= {TARGETS[kind]:g}x transformers", "dtype": dname,
                            "value": min(ratios), "met": min(ratios) >= TARGETS[kind],
                            "ceiling": min(ceilings), "reachable": min(ceilings) >= TARGETS[kind]})
    for r in result["rows"]:
        if r["measurement"] == "forward" and r["dtype"] == "fp32":
            frac = r["dsmoe_peak_fraction"]
            out.append({"target": f"forward >= {100 * TARGETS['forward_peak_fraction_fp32']:.0f}% of matmul peak",
                        "dtype": "fp32", "value": frac, "met": frac >= TARGETS["forward_peak_fraction_fp32"]})
    return out

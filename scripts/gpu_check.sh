#!/usr/bin/env bash
# The GPU check of issue 17: one prepared run, under 8 minutes on one GPU.
#
#   bash scripts/gpu_check.sh            # from anywhere; runs in the repository root
#
# Steps (each under its own time limit; a failing step is recorded and the next one still runs):
#   install    bash scripts/install.sh --test; offline (a GPU machine with no registry) falls back to
#              `pip install --no-deps --no-build-isolation -e .`, then to PYTHONPATH=src
#   env        torch / CUDA / GPU name, and whether CUDA is usable at all (everything after needs it)
#   tests      DSMOE_TEST_DEVICE=cuda pytest -m "device or cuda": the device-agnostic tests on the GPU plus the
#              CUDA-only ones (CUDA graph decode step against the eager step)
#   load       load_pretrained(device="cuda") of a small checkpoint: torch.cuda.max_memory_allocated against
#              the model's bytes (no second copy on the GPU), FP8 dequantised on the GPU
#   train      a 20-step `dsmoe train --device cuda` run, if the trainer has --device (skipped with a note if not)
#   generate   `dsmoe generate --device cuda` in fp32, bf16 and bf16 --cuda-graph from a tiny checkpoint
#   bench      `dsmoe bench --device cuda --quick --dtype bf16 --json`
# Output: $OUT (the device machine's return folder) if set, else benchmarks/results/: gpu_check.log,
# gpu_check_summary.json (per step: status, seconds, and the figures), gpu_bench.json.
# Rehearsal without a GPU: GPU_CHECK_DEVICE=cpu GPU_CHECK_SKIP="install bench" bash scripts/gpu_check.sh runs the
# other steps on the CPU (skip install on a shared machine: it re-points the editable install at this checkout).
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
LOG="$DEST/gpu_check.log"
STEPS="$DEST/.gpu_check_steps"
WORK=$(mktemp -d /tmp/dsmoe-gpu-check.XXXXXX)
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
export PY WORK DEST DEVICE PYTHONUNBUFFERED=1
: >"$LOG"
: >"$STEPS"

# step NAME LIMIT_S CMD...: run, log, record "NAME RC SECONDS"
step() {
  local name=$1 limit=$2; shift 2
  case " ${GPU_CHECK_SKIP:-} " in *" $name "*) skip "$name" "GPU_CHECK_SKIP"; return 0;; esac
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" >>"$LOG"
  local began=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "$name $rc $((SECONDS - began))" >>"$STEPS"
  echo "=== $name: rc=$rc in $((SECONDS - began))s" | tee -a "$LOG"
  return $rc
}
skip() { echo "$1 skipped $2" >>"$STEPS"; echo "=== $1: skipped ($2)" | tee -a "$LOG"; }

install() {
  bash scripts/install.sh --test && return 0
  echo "install.sh failed (offline?): trying pip --no-deps" >&2
  "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . && return 0
  echo "pip failed too: running from src/ with PYTHONPATH" >&2
  return 1
}
export -f install
step install 240 bash -c install && [ "${GPU_CHECK_SKIP:-}" = "${GPU_CHECK_SKIP#*install}" ] || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

step env 60 "$PY" -c "
import json, torch, dsmoe
print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'available': torch.cuda.is_available(),
                  'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  'dsmoe': dsmoe.__file__}))
assert '$DEVICE' == 'cpu' or torch.cuda.is_available(), 'no CUDA GPU visible to torch'
" || { echo "no usable CUDA: stopping after env" | tee -a "$LOG"; CUDA_OK=0; }
CUDA_OK=${CUDA_OK:-1}

if [ "$CUDA_OK" = 1 ]; then
  DSMOE_TEST_DEVICE=$DEVICE step tests 200 "$PY" -m pytest -o addopts="" -q -p no:cacheprovider -m "device or cuda" -rs tests/

  step load 90 "$PY" - "$WORK" "$DEVICE" <<'PYEOF'
import json, sys, torch, dsmoe
from dsmoe.presets import get_preset
work = sys.argv[1]
config = get_preset("tiny-v3").replace(vocab_size=32000, num_hidden_layers=4)
dsmoe.save_pretrained(dsmoe.Transformer(config), f"{work}/load")
device = torch.device(sys.argv[2])
cuda = device.type == "cuda"
if cuda:
    torch.cuda.reset_peak_memory_stats()
model = dsmoe.load_pretrained(f"{work}/load", device=device, dtype=torch.bfloat16)
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
peak = torch.cuda.max_memory_allocated() if cuda else None
print(json.dumps({"load_model_bytes": size, "load_cuda_peak_bytes": peak,
                  "load_peak_over_model": peak / size if cuda else None}))
assert all(p.device.type == device.type for p in model.parameters())
assert not cuda or peak < 1.5 * size, f"peak {peak} for a {size}-byte model"
PYEOF

  if "$PY" -m dsmoe train --help 2>/dev/null | grep -q -- "--device "; then
    step train 120 "$PY" -m dsmoe train --preset tiny-v3 --steps 20 --device "$DEVICE" --out "$WORK/run"
  else
    skip train "dsmoe train has no --device yet (the trainer's CUDA path is not wired)"
  fi

  gen() {
    "$PY" - "$WORK/gen" <<'PYEOF' || return 1
import sys
sys.path.insert(0, "tests")
import torch, dsmoe
from tiny_assets import build_tokenizer
from dsmoe.presets import get_preset
torch.manual_seed(0)
dsmoe.save_pretrained(dsmoe.Transformer(get_preset("tiny-v3").replace(vocab_size=300)), sys.argv[1])
build_tokenizer(sys.argv[1])
PYEOF
    "$PY" -m dsmoe generate --model "$WORK/gen" --prompt "def add" --max-new-tokens 32 --device "$DEVICE" &&
      "$PY" -m dsmoe generate --model "$WORK/gen" --prompt "def add" --max-new-tokens 32 --device "$DEVICE" --dtype bf16 &&
      if [ "$DEVICE" != cpu ]; then
        "$PY" -m dsmoe generate --model "$WORK/gen" --prompt "def add" --max-new-tokens 32 --device "$DEVICE" --dtype bf16 --cuda-graph
      fi
  }
  bench() { "$PY" -m dsmoe bench --device "$DEVICE" --quick --dtype bf16 --json >"$DEST/gpu_bench.json"; }
  export -f gen bench
  step generate 90 bash -c gen
  step bench 240 bash -c bench
fi

"$PY" - "$STEPS" "$LOG" "$DEST" <<'PYEOF'
import json, re, sys
from pathlib import Path
steps_file, log, dest = map(Path, sys.argv[1:])
summary = {"steps": {}, "passed": True}
for line in steps_file.read_text().splitlines():
    name, rc, seconds = line.split(" ", 2)
    if rc == "skipped":
        summary["steps"][name] = {"status": "skipped", "note": seconds}
        continue
    summary["steps"][name] = {"status": "ok" if rc == "0" else f"failed (rc {rc})", "seconds": int(seconds)}
    summary["passed"] &= rc == "0" or name == "install"
text = log.read_text()
for line in text.splitlines():  # the JSON lines the env and load steps printed
    if line.startswith("{") and ('"torch"' in line or '"load_model_bytes"' in line):
        summary.update(json.loads(line))
tests = re.findall(r"^(\d+ passed.*)$", text, re.M)
summary["tests"] = tests[-1] if tests else None
bench = dest / "gpu_bench.json"
if bench.is_file() and bench.stat().st_size:
    try:
        b = json.loads(bench.read_text())
        summary["bench"] = {"machine": b["machine"], "rows": [
            {k: r.get(k) for k in ("measurement", "dtype", "shape", "ratio", "dsmoe_mfu_bf16_peak", "dsmoe_hbm_fraction")}
            | {"dsmoe_tokens_per_s": r["dsmoe"]["tokens_per_s"], "transformers_tokens_per_s": r["transformers"]["tokens_per_s"],
               "dsmoe_peak_bytes": r["dsmoe"]["peak_rss_bytes"]} for r in b["rows"]], "parity": b["parity"]}
    except (ValueError, KeyError) as err:
        summary["bench"] = f"unreadable: {err}"
(dest / "gpu_check_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: v for k, v in summary.items() if k != "bench"}, indent=2))
PYEOF
rm -f "$STEPS"
rm -rf "$WORK"

"""Crash-safe training checkpoints in a run directory.

    out/
      step-000200/          a complete checkpoint: config.json, model.safetensors, tokenizer.json,
                            generation_config.json, trainer_state.pt (optimizer, RNG states, data
                            position, step)
      current -> step-000200
      config.json -> current/config.json        (likewise the other files but trainer_state.pt)
      metrics.jsonl, *.png

A save writes a new `step-N.tmp/` directory, renames it to `step-N/` once every file is complete, then
repoints `current` by renaming a fresh symlink over it (atomic on POSIX). A crash at any moment leaves
`current` on the previous complete checkpoint, and the top-level names always resolve to one consistent
checkpoint — which is what `transformers.AutoModelForCausalLM.from_pretrained(out)` and
`dsmoe generate --model out` read.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import save_pretrained
from ..model import Transformer

CURRENT = "current"
STATE_FILE = "trainer_state.pt"
PUBLISHED = ("config.json", "model.safetensors", "tokenizer.json")
# Complete checkpoints kept on disk: the newest, and the one before it in case the newest turns out damaged
# (a disk error, a bad trainer_state.pt): `ln -sfn step-N current` then resumes from it.
KEEP = 2


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The RNG states a resumed run restores: torch's CPU generator, Python's and, when training on CUDA,
    that GPU's generator (a CPU ByteTensor, so the checkpoint loads anywhere)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore rng_state()'s states; the CUDA generator's only when resuming on CUDA from a CUDA run (a run
    moved between devices continues with the new device's generator as it is)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(out: Path, model: Transformer, files: str | dict[str, bytes], state: dict[str, Any]) -> Path:
    """Write checkpoint `state["step"]` and make it current. Returns its directory.

    files: name -> contents written beside the weights and published at the top level (tokenizer.json,
    generation_config.json, ...); a plain string is the tokenizer.json alone."""
    if isinstance(files, str):
        files = {"tokenizer.json": files.encode()}
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"step-{state['step']:06d}"
    tmp = out / f"{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # One shard whatever the size: the published top-level names must not depend on the model size.
    save_pretrained(model, tmp, max_shard_size=2**62)
    for name, content in files.items():
        (tmp / name).write_bytes(content)
    torch.save(state, tmp / STATE_FILE)
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. after a resume): replace it as a whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _point_current(out, final.name, files)
    _prune(out, keep=KEEP)
    return final


class DamagedCheckpoint(ValueError):
    """The current checkpoint exists but its trainer state cannot be read."""


def load_checkpoint(out: Path) -> tuple[Path, dict[str, Any]]:
    """The current checkpoint's directory and trainer state; FileNotFoundError when there is none,
    DamagedCheckpoint (naming the file and the older checkpoints to fall back to) when it is unreadable."""
    current = out / CURRENT
    if not current.exists() and not current.is_symlink():  # a dangling link is a damaged checkpoint below
        raise FileNotFoundError(f"{out}: no checkpoint to resume from (no {CURRENT})")
    directory = current.resolve()
    path = directory / STATE_FILE
    try:
        return directory, torch.load(path, weights_only=False, map_location="cpu")
    except Exception as err:  # missing, truncated, not a zip archive, unpickling errors: all mean unusable
        reason = "missing" if not path.exists() else f"unreadable: {type(err).__name__}"
        older = sorted(p.name for p in out.glob("step-*") if p.is_dir() and p.name != directory.name
                       and not p.name.endswith(".tmp") and (p / STATE_FILE).is_file())
        fallback = (f"; to resume from an older checkpoint: ln -sfn {older[-1]} {current}" if older
                    else "; no older checkpoint is left")
        raise DamagedCheckpoint(f"{path}: trainer state {reason}{fallback}") from None


def _point_current(out: Path, target: str, files: dict[str, bytes]) -> None:
    link = out / f".{CURRENT}.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    os.replace(link, out / CURRENT)
    for name in dict.fromkeys((*PUBLISHED, *files)):
        top = out / name
        if not top.is_symlink():
            top.unlink(missing_ok=True)
            top.symlink_to(Path(CURRENT) / name)
    _fsync_dir(out)


def _prune(out: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to the current one. Checkpoints past the current step were
    abandoned (the run was resumed from an older one, which then saved past them): they go, the older good
    ones stay."""
    current = (out / CURRENT).resolve().name
    steps = sorted(p for p in out.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    newer = [p for p in steps if p.name > current]
    older = [p for p in steps if p.name <= current]
    for old in [*older[:-keep], *newer]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    for stale in out.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Flush file contents and the directory entry, so a rename never publishes unwritten data."""
    for f in path.iterdir() if path.is_dir() else []:
        if f.is_file() and not f.is_symlink():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

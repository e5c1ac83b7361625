"""A run that remembers itself: the settings a run was started with, recorded in `out/run.json` (and in
every checkpoint's trainer state), read back by `--resume` so that `dsmoe train --out DIR --resume` alone
continues it.

A resumed run must compute what the uninterrupted one would, so a flag that changes a recorded setting is
refused, naming it. A few settings may change: how long to train (`--steps`: the learning-rate schedule
then decays continuously from the current rate to its floor at the new last step), how often to save and
evaluate, and the process layout (`--ep`, not recorded: any number of processes resumes a run).
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from ..files import atomic_write_text
from .errors import TrainingError

RUN_FILE = "run.json"
# May differ on --resume (reported); everything else recorded must match.
MUTABLE = ("steps", "save_every", "eval_every", "eval_batches", "strict_data", "device", "checkpoint_activations")
NOT_RECORDED = ("out", "resume", "ep")
_BALANCE_FLAGS = {"schemes": "--balance", "devices": "--devices", "max_devices": "--max-devices"}
_FLAGS = {"overrides": "--set", "preset": "--preset", "config": "--config", "data_field": "--field"}


def flag_of(name: str) -> str:
    """The command-line flag of a TrainConfig field (or a balance setting)."""
    return _FLAGS.get(name) or _BALANCE_FLAGS.get(name) or "--" + name.replace("_", "-")


def jsonable(value: Any) -> Any:
    """`value` as it reads back from JSON (paths as strings, tuples as lists), for comparing settings."""
    return json.loads(json.dumps(value, default=str))


PATH_SETTINGS = ("data", "init")


def absolute_path(value: Any) -> Any:
    """A path setting made absolute (None stays None), so a run resumes from any working directory."""
    return None if value is None else str(Path(value).expanduser().resolve())


def record(cfg: Any) -> dict[str, Any]:
    """The recorded settings of a TrainConfig: every field but those of one invocation (--out, --resume, --ep),
    paths made absolute (a run resumes from any working directory)."""
    out = {k: v for k, v in jsonable(asdict(cfg)).items() if k not in NOT_RECORDED}
    for name in PATH_SETTINGS:
        out[name] = absolute_path(out.get(name))
    return out


def write_record(out: Path, cfg: Any) -> None:
    """Write out/run.json (atomically) with the recorded settings of `cfg`."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RUN_FILE, json.dumps(record(cfg), indent=2) + "\n")


def read_record(out: Path) -> dict[str, Any]:
    """The run's recorded settings: run.json, else (runs from before it) the current checkpoint's trainer state.
    TrainingError when there is no run in `out`."""
    path = out / RUN_FILE
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TrainingError(f"{path}: unreadable run record ({err})") from None
    from . import checkpoint

    try:
        _, state = checkpoint.load_checkpoint(out)
    except (FileNotFoundError, checkpoint.DamagedCheckpoint) as err:
        raise TrainingError(str(err)) from None
    return {k: v for k, v in state.get("train_config", {}).items() if k not in NOT_RECORDED}


def _shown(value: Any) -> str:
    if value is None:
        return "(not given)"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "(none)"
    if isinstance(value, dict):
        return " ".join(f"{k}={json.dumps(v)}" for k, v in value.items()) or "(none)"
    return str(value)


def merge_for_resume(recorded: dict[str, Any], given: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The settings of a resumed run: the recorded ones, with the flags given on this command line
    (TrainConfig field -> value; balance settings as a partial dict). Returns (settings, notes on what
    changes). TrainingError naming the flag for a change to a setting that must stay."""
    merged, notes = dict(recorded), []
    for name, value in given.items():
        if name in NOT_RECORDED:
            merged[name] = value
            continue
        if name == "balance":
            old = dict(recorded.get("balance") or {})
            for key, v in value.items():
                if v is not None and jsonable(v) != old.get(key):
                    raise TrainingError(f"--resume: {flag_of(key)} {_shown(jsonable(v))} would change the run, "
                                        f"which was started with {_shown(old.get(key))}; drop the flag to continue "
                                        "it, or start a new run in another --out")
            continue
        old, new = recorded.get(name), jsonable(value)
        if name in PATH_SETTINGS:
            old, new = absolute_path(old), absolute_path(new)
        if name == "config" and old is None:
            old = recorded.get("preset")  # the run named its architecture with --preset (or took the default)
        if new == old:
            continue
        if name in MUTABLE:
            notes.append(f"{flag_of(name)} {_shown(old)} -> {_shown(new)}")
            merged[name] = value
            continue
        raise TrainingError(f"--resume: {flag_of(name)} {_shown(new)} would change the run, which was started with "
                            f"{_shown(old)}; drop the flag to continue it, or start a new run in another --out")
    return merged, notes


def config_from_record(settings: dict[str, Any]) -> Any:
    """A TrainConfig from recorded (JSON) settings: paths and tuples restored, unknown keys of other versions
    dropped."""
    from .loop import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in settings.items() if k in known}
    for name in ("data", "init", "out"):
        if values.get(name) is not None:
            values[name] = Path(values[name])
    for name in ("train_only", "freeze"):
        if name in values:
            values[name] = tuple(values[name])
    if values.get("lr_anchor") is not None:
        values["lr_anchor"] = tuple(values["lr_anchor"])
    if isinstance(values.get("balance"), dict) and values["balance"].get("schemes") is not None:
        values["balance"] = {**values["balance"], "schemes": tuple(values["balance"]["schemes"])}
    return TrainConfig(**values)

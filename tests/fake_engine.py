"""A scripted EngineLoop for HTTP tests (test-only): each request emits the tokens its script returns, one
per tick, so tests control UTF-8 splits, stop strings across tokens, slow streams, failures and overload."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from dsmoe.serve.protocol import EngineOverloaded, EngineStats, RequestOutput, RequestRejected, SamplingParams

Script = Callable[[list[int], SamplingParams], list[int]]


class ScriptedEngine:
    """script(prompt_ids, params) -> the ids to emit (cut at max_tokens, ended at the first EOS); raising
    inside it fails that request only. tick: seconds between steps. Blocks of `block_size` tokens are counted
    for the running requests, so tests can watch them come back."""

    def __init__(self, script: Script, max_context: int = 64, tick: float = 0.0, max_running: int = 4,
                 max_waiting: int = 8, block_size: int = 4, raise_at_step: Callable[[list[int]], bool] | None = None):
        self.script, self.max_context, self.tick = script, max_context, tick
        self.max_running, self.max_waiting, self.block_size = max_running, max_waiting, block_size
        self.raise_at_step = raise_at_step
        self.waiting: list = []
        self.running: dict[str, dict] = {}
        self.aborted: list[str] = []
        self.submitted: list[tuple[str, list[int], SamplingParams]] = []
        self.generated = 0
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def submit(self, request_id, prompt_ids, params, on_event):
        if len(prompt_ids) + params.max_tokens > self.max_context:
            raise RequestRejected("max_tokens", "does not fit")
        with self.lock:
            if len(self.waiting) >= self.max_waiting:
                raise EngineOverloaded("the waiting queue is full", retry_after=2.5)
            self.submitted.append((request_id, list(prompt_ids), params))
            self.waiting.append({"id": request_id, "prompt": list(prompt_ids), "params": params, "cb": on_event,
                                 "out": None, "pos": 0})

    def abort(self, request_id):
        with self.lock:
            self.aborted.append(request_id)
            for r in self.waiting:
                if r["id"] == request_id:
                    self.waiting.remove(r)
                    r["cb"](RequestOutput(request_id, finished=True, finish_reason="abort"))
                    return
            r = self.running.pop(request_id, None)
        if r is not None:
            r["cb"](RequestOutput(request_id, finished=True, finish_reason="abort"))

    def stats(self):
        with self.lock:
            used = sum(math.ceil((len(r["prompt"]) + r["pos"]) / self.block_size) for r in self.running.values())
            return EngineStats(running=len(self.running), waiting=len(self.waiting), blocks_used=used,
                               blocks_free=64 - used, block_size=self.block_size, generated_tokens=self.generated)

    def shutdown(self, drain=True):
        self.stopping = True
        self.thread.join()

    def _loop(self):
        while not self.stopping or self.running or self.waiting:
            events = []
            with self.lock:
                while self.waiting and len(self.running) < self.max_running:
                    r = self.waiting.pop(0)
                    self.running[r["id"]] = r
                for rid, r in list(self.running.items()):
                    p = r["params"]
                    try:
                        if r["out"] is None:
                            r["out"] = list(self.script(r["prompt"], p))
                        if self.raise_at_step is not None and self.raise_at_step(r["prompt"]) and r["pos"] == 1:
                            raise RuntimeError("injected engine failure")
                    except Exception as err:
                        del self.running[rid]
                        events.append((r["cb"], RequestOutput(rid, finished=True, finish_reason="error",
                                                              error=f"{type(err).__name__}: {err}")))
                        continue
                    token = r["out"][r["pos"]] if r["pos"] < len(r["out"]) else 0
                    r["pos"] += 1
                    self.generated += 1
                    eos = token in p.eos_token_ids and not p.ignore_eos
                    done = eos or r["pos"] >= p.max_tokens or r["pos"] >= len(r["out"])
                    reason = ("stop" if eos or r["pos"] < p.max_tokens else "length") if done else None
                    if done:
                        del self.running[rid]
                    events.append((r["cb"], RequestOutput(rid, [token], finished=done, finish_reason=reason,
                                                          prompt_tokens=len(r["prompt"]))))
            for cb, out in events:
                cb(out)
            time.sleep(self.tick or 0.001)

"""What the CPU profile's scenarios share: the long-lived processes (one worker, the raw mlx-lm runners),
the prompts, table rows and the statistics of interleaved pairs.

A scenario takes (Session, profile dict) and returns {"rows": [table rows], "details": {...everything
measured...}}. A row: scenario, model, metric, worker, raw, result, goal, status ("met" / "missed" / "info"),
note. Figures are medians over interleaved runs (see bench/README.md).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from ..common import TimedWorker, log, med
from ..raw import RawRunner

PREFILL_STEP = 2048  # the worker's default; passed explicitly to both sides
PAUSE_S = 0.15  # between interleaved runs: lets OpenBLAS's spinning threads go to sleep
STORY_PROMPT = "Write a long story about a dragon who learns to bake bread."
LONG_QUESTION = "Summarize the protocol above in five bullet points."
FOLLOWUP_QUESTION = ("Thanks. Now list every error code you saw above, each with one short sentence "
                     "explaining when a host should expect it.")
MAX_TOKENS = {"tiny": 64, "smollm2": 32}
# Runs that must start from an empty KV cache load the worker without prompt-cache entries: a fresh cache_key
# is not enough since protocol 1.1 (a shared prefix is copied from any entry).
COLD = {"cache_max_entries": 0}
LABELS = {"tiny": "tiny llama fixture (~1M, fp32)", "smollm2": "SmolLM2-135M-Instruct (bf16)"}

_keys = itertools.count(1)


def fresh_key() -> str:
    """A cache_key never used before: the worker then starts from an empty KV cache."""
    return f"bench-{time.time_ns()}-{next(_keys)}"


def row(scenario, model, metric, worker=None, raw=None, result=None, goal="", status="", note=""):
    return {"scenario": scenario, "model": model, "metric": metric, "worker": worker, "raw": raw,
            "result": result, "goal": goal, "status": status, "note": note}


def pairs(a_runs, b_runs, fa, fb, op):
    """op(a, b) of run i of one side against run i of the other (interleaved runs)."""
    return [op(fa(a), fb(b)) for a, b in zip(a_runs, b_runs)
            if fa(a) is not None and fb(b) is not None]


def paired(a_runs, b_runs, fa, fb, op):
    return med(pairs(a_runs, b_runs, fa, fb, op))


def goal_status(value, ok, spread):
    """met/missed by the median; "(noisy)" when the pairs' interquartile range straddles the goal."""
    st = "met" if ok(value) else "missed"
    if spread.get("n", 0) >= 4 and ok(spread["p75"]) != ok(spread["p25"]):
        st += " (noisy)"
    return st


class Session:
    """One worker and (lazily) the raw runners, each loading a model only when it changes."""

    def __init__(self):
        self._worker = None
        self._raw = {}
        self._loaded = {}  # process name -> model path
        self.worker_model_info = {}

    @property
    def worker(self) -> TimedWorker:
        if self._worker is None:
            log("starting the worker (python -m worker)")
            self._worker = TimedWorker()
        return self._worker

    def raw(self, mode: str) -> RawRunner:
        if mode not in self._raw:
            log(f"starting raw mlx-lm runner ({mode})")
            env = self.worker.blas_env() if mode in ("matched", "inproc") else None
            self._raw[mode] = RawRunner(mode, env)
        return self._raw[mode]

    def use(self, name: str, path: Path, cache: bool = False):
        """Make sure process ``name`` ("worker", "matched", "default", "inproc") has ``path`` loaded; the
        worker keeps prompt-cache entries only with ``cache`` (else every run starts cold)."""
        if self._loaded.get(name) == (str(path), cache):
            return
        log(f"{name}: loading {path.name}")
        if name == "worker":
            self.worker_model_info[str(path)] = self.worker.load_model(
                path, prefill_step_size=PREFILL_STEP, **({} if cache else COLD))
        elif name == "inproc":  # the worker's own engine, in a raw runner's process
            self.raw(name).call("load_engine", path=str(path))
        else:
            self.raw(name).load(path)
        self._loaded[name] = (str(path), cache)

    def forget(self, name: str) -> None:
        """Process ``name`` was loaded with other options: the next ``use`` loads again."""
        self._loaded.pop(name, None)

    def mark(self, name: str, path: Path, cache: bool = False) -> None:
        """Process ``name`` was loaded with ``path`` by hand (as ``use`` would with ``cache``)."""
        self._loaded[name] = (str(path), cache)

    def raw_blas(self) -> dict:
        """The BLAS each raw runner started so far has mapped."""
        return {m: r.info.get("blas") for m, r in self._raw.items()}

    def close(self) -> None:
        for r in self._raw.values():
            r.close()
        if self._worker is not None:
            self._worker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

"""What every bench script shares: paths, the models folder, logging, small statistics, the timed host
(``TimedWorker``: a ``python -m worker`` process whose events carry the time they were read) and the test
models of the CPU profile. Bench code reaches the worker only through its process and protocol."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from tests.support.client import Worker

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TMP = RESULTS / "tmp"  # git-ignored scratch: fixtures, images
MODELS_ENV = "MLX_WORKER_MODELS"


def log(msg: str, tag: str = "bench") -> None:
    print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- models

def models_dir() -> Path:
    """Where bench scripts build and look for models: ``$MLX_WORKER_MODELS``, else the folder model_prep
    prepares models into (``models_home()``: ``$MLX_WORKER_HOME/models``, else
    ``$XDG_CACHE_HOME/mlx-worker/models``, else ``~/.cache/mlx-worker/models``)."""
    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV]).expanduser()
    from model_prep.common import models_home

    return models_home()


def tiny_model() -> Path:
    """The ~1M-param llama test fixture (float32, context 2048)."""
    from tests.support.fixtures import fixture_dir

    return fixture_dir("llama", TMP / "fixtures")


def draft_model() -> Path:
    """The tiny llama fixture's draft (random weights: it almost never agrees with the main model)."""
    from tests.support.fixtures import fixture_dir

    return fixture_dir("llama_draft", TMP / "fixtures")


def tiny_model_long(context: int = 8192) -> Path:
    """A copy of the tiny fixture whose config allows ``context`` positions (RoPE: no weights change)."""
    from tests.support.fixtures import build_once

    src = tiny_model()

    def build(tmp: Path) -> None:
        for f in src.iterdir():
            shutil.copy2(f, tmp / f.name)
        for name, key in (("config.json", "max_position_embeddings"),
                          ("tokenizer_config.json", "model_max_length")):
            p = tmp / name
            if p.exists():
                cfg = json.loads(p.read_text())
                cfg[key] = context
                p.write_text(json.dumps(cfg, indent=2) + "\n")

    return build_once(TMP / "fixtures" / f"{src.name}-ctx{context}", build)


def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct: the models folder's copy when ``$MLX_WORKER_MODELS`` holds a prepared one,
    else model_prep's (prepared and verified once, ``make model``)."""
    from model_prep.smollm2 import MODEL_NAME, default_model_dir, ensure_default_model, read_marker

    there = models_dir() / MODEL_NAME
    if there != default_model_dir() and read_marker(there) is not None:
        return there
    return ensure_default_model()


def document() -> str:
    """Real prose-ish text for long prompts: this repository's protocol description."""
    return (ROOT / "PROTOCOL.md").read_text(encoding="utf-8")


# ---------------------------------------------------------------- statistics

def summary(values) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"n": 0}
    vals.sort()
    q = statistics.quantiles(vals, n=4) if len(vals) >= 2 else [vals[0]] * 3
    return {"n": len(vals), "median": statistics.median(vals), "min": vals[0], "max": vals[-1],
            "p25": q[0], "p75": q[2]}


def med(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def pct(vals, q):
    """Nearest-rank percentile (q in 0..100) of a list."""
    v = sorted(vals)
    return v[min(len(v) - 1, max(0, int(round(q / 100 * len(v) + 0.5)) - 1))] if v else None


def strip_tokens(run: dict) -> dict:
    """A run's figures without the token list (kept out of the JSON to keep it readable)."""
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in run.items() if k != "tokens"}


def loadavg() -> list:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


# ---------------------------------------------------------------- the worker process

_ids = itertools.count(1)


def next_id(prefix: str) -> str:
    """A request id never used before in this bench process."""
    return f"{prefix}{next(_ids)}"


class TimedWorker(Worker):
    """Every event gets ``_t`` (time.perf_counter() when its line was read). No schema validation by
    default: the GPU machine has no jsonschema, and a bench measures, the tests check."""

    def __init__(self, *args, validate=False, **kwargs):
        super().__init__(*args, validate=validate, **kwargs)

    def _pump(self):
        for line in self.proc.stdout:
            t = time.perf_counter()
            self.raw_lines.append(line)
            ev = json.loads(line)
            ev["_t"] = t
            self.events.put(ev)
        self.events.put(None)

    def generate(self, tokens, max_tokens, cache_key=None, timeout=900, params=None) -> dict:
        """One greedy generation of ``tokens``; returns the worker's stats plus host-side times."""
        rid = next_id("g")
        req = {"type": "generate", "id": rid, "prompt": {"tokens": list(tokens)},
               "params": {"max_tokens": max_tokens, "temperature": 0.0, **(params or {})}}
        if cache_key is not None:
            req["cache_key"] = cache_key
        t0 = time.perf_counter()
        self.send(req)
        evs = self.collect(rid, timeout=timeout)
        end = evs[-1]
        if end["type"] != "done":
            raise RuntimeError(f"generate failed: {end}")
        stats = next(e for e in evs if e["type"] == "stats")
        toks = [e for e in evs if e["type"] == "token"]
        out = [t for e in toks for t in e["tokens"]]
        first = toks[0]["_t"] if toks else None
        # host-side decode rate: ids that arrived after the first token event / time since it
        later = sum(len(e["tokens"]) for e in toks[1:])
        span = toks[-1]["_t"] - first if len(toks) > 1 else 0.0
        return {
            "ttft_s": stats.get("ttft_s"),
            "decode_tps": stats.get("generation_tps"),
            "prompt_tps": stats.get("prompt_tps"),
            "prompt_tokens": stats["prompt_tokens"],
            "cached_tokens": stats["cached_tokens"],
            "cache_miss_reason": stats.get("cache_miss_reason"),
            "generated": stats["generated_tokens"],
            "total_s": stats["total_s"],
            "host_ttft_s": (first - t0) if first is not None else None,
            "host_total_s": end["_t"] - t0,
            "host_decode_tps": later / span if span > 0 else None,
            "stop_reason": end.get("stop_reason"),
            "token_events": len(toks),
            "peak_memory_bytes": stats.get("peak_memory_bytes"),
            "speculative": stats.get("speculative"),
            "draft_tokens_accepted": stats.get("draft_tokens_accepted"),
            "tokens": out,
        }

    def simple(self, type_, **kw) -> dict:
        evs = self.request({"type": type_, "id": next_id(type_), **kw}, timeout=300)
        if evs[-1]["type"] != "done":
            raise RuntimeError(f"{type_} failed: {evs[-1]}")
        return evs[-1]

    def load_model(self, path, **options) -> dict:
        return self.simple("load", model_path=str(path), options=options)["model"]

    def status(self) -> dict:
        return self.simple("status")

    def cache_clear(self) -> dict:
        return self.simple("cache_clear")

    def blas_env(self) -> dict:
        from .raw import worker_blas_env

        return worker_blas_env(self.ready["pid"])

"""Shared pieces: the models, the long-lived processes (worker + raw runners), small statistics."""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from .host import TimedWorker
from .raw import RawRunner

ROOT = Path(__file__).resolve().parent.parent
TMP = ROOT / "bench" / "results" / "tmp"  # git-ignored
PREFILL_STEP = 2048  # the worker's default; passed explicitly to both sides
PAUSE_S = 0.15  # between interleaved runs: lets OpenBLAS's spinning threads go to sleep

STORY_PROMPT = "Write a long story about a dragon who learns to bake bread."


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- models

def tiny_model() -> Path:
    """The ~1M-param llama test fixture (float32, context 2048)."""
    sys.path.insert(0, str(ROOT))
    from tests.support.fixtures import fixture_dir

    return fixture_dir("llama", TMP / "fixtures")


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
    sys.path.insert(0, str(ROOT))
    from model_prep.smollm2 import ensure_default_model

    return ensure_default_model()


MODELS = {"tiny": tiny_model, "smollm2": smollm2_model}
LABELS = {"tiny": "tiny llama fixture (~1M, fp32)", "smollm2": "SmolLM2-135M-Instruct (bf16)"}


def document() -> str:
    """Real prose-ish text for long prompts: this repository's protocol description."""
    return (ROOT / "PROTOCOL.md").read_text(encoding="utf-8")


# ---------------------------------------------------------------- processes

class Session:
    """One worker and (lazily) the two raw runners, each loading a model only when it changes."""

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

    def use(self, name: str, path: Path):
        """Make sure process ``name`` ("worker", "matched", "default") has ``path`` loaded."""
        if self._loaded.get(name) == str(path):
            return
        log(f"{name}: loading {path.name}")
        if name == "worker":
            self.worker_model_info[str(path)] = self.worker.load_model(
                path, prefill_step_size=PREFILL_STEP)
        else:
            self.raw(name).load(path)
        self._loaded[name] = str(path)

    def encoder(self) -> RawRunner:
        """Any runner with the current model's tokenizer: the matched one (always float32-cheap)."""
        return self.raw("matched")

    def close(self) -> None:
        for r in self._raw.values():
            r.close()
        if self._worker is not None:
            self._worker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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


def strip_tokens(run: dict) -> dict:
    """A run's figures without the token list (kept out of the JSON to keep it readable)."""
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in run.items() if k != "tokens"}


def loadavg() -> list:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []

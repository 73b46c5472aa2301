"""Raw mlx-lm, measured in a subprocess whose environment the bench controls.

Run as ``python -m bench.raw`` it is a tiny line server (one JSON command per stdin line, one
JSON answer per stdout line) around ``mlx_lm.load`` + ``generate_step``; :class:`RawRunner`
spawns and drives it. Two configurations matter (see bench/README.md):

- ``default``: no LD_PRELOAD, the model in its stored dtype (what ``pip install mlx-lm`` gives);
- ``matched``: the worker's own BLAS environment (LD_PRELOAD, OPENBLAS_* copied from the running
  worker) and the model cast to float32, i.e. the worker's math without the worker.

Timing follows the worker's definitions: TTFT = call to first yielded token; decode tok/s =
(n - 1) / time after the first token. Greedy; stops at max_tokens or an EOS id.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Environment variables the worker's BLAS re-exec may set; "matched" copies them from the worker.
BLAS_ENV_KEYS = ("LD_PRELOAD", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "MKL_NUM_THREADS",
                 "MKL_THREADING_LAYER", "BLIS_NUM_THREADS", "OMP_NUM_THREADS", "GOTO_NUM_THREADS")


# ---------------------------------------------------------------- server (child process)

class _Server:
    def __init__(self):
        self.model = None
        self.tokenizer = None
        self.cache = None  # kept prompt cache (for the follow-up measurement)
        self.cache_tokens = 0
        self.kept_tokens: list = []

    def load(self, path: str, dtype: str) -> dict:
        import mlx.core as mx
        import mlx_lm

        tic = time.perf_counter()
        self.model, self.tokenizer = mlx_lm.load(path)
        if dtype == "float32":
            self.model.set_dtype(mx.float32, lambda d: mx.issubdtype(d, mx.floating))
        mx.eval(self.model.parameters())
        self.cache = None
        return {"load_s": time.perf_counter() - tic, "dtype": dtype}

    def encode(self, text: str = "", messages=None, add_special_tokens: bool = True) -> dict:
        """Token ids of a chat (``messages``, with the generation prompt) or of plain ``text``."""
        if messages is not None:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        else:
            ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return {"tokens": [int(t) for t in ids]}

    def long_chat(self, doc: str, question: str, target: int) -> dict:
        """A one-turn chat (a document, then a question) of about ``target`` tokens."""
        while len(self.tokenizer.encode(doc, add_special_tokens=False)) < target:
            doc = doc + "\n\n" + doc
        chars = len(doc)
        for _ in range(8):
            ids = self.encode(messages=[{"role": "user", "content": doc[:chars] + "\n\n" + question}])["tokens"]
            if abs(len(ids) - target) <= max(4, target // 100):
                break
            chars = max(1, min(len(doc), int(chars * target / len(ids))))
        return {"tokens": ids}

    def next_turn(self, question: str) -> dict:
        """Tokens that close the assistant's turn and add a user turn + the generation prompt.

        Rendered by the model's own chat template: [user, assistant MARK, user question], cut after MARK.
        """
        mark = "\u2063MARK\u2063"
        msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": mark},
                {"role": "user", "content": question}]
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        tail = text.split(mark, 1)[1]
        return {"tokens": [int(t) for t in self.tokenizer.encode(tail, add_special_tokens=False)]}

    def decode(self, tokens) -> dict:
        return {"text": self.tokenizer.decode(tokens)}

    def gen(self, tokens, max_tokens: int, prefill_step_size: int = 2048, keep: bool = False,
            reuse: bool = False, stop_at_eos: bool = True) -> dict:
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.sample_utils import make_sampler

        cached = 0
        if reuse and self.cache is not None:
            from mlx_lm.models.cache import trim_prompt_cache
            from mlx_lm.utils import common_prefix_len

            cache = self.cache
            common = common_prefix_len(self.kept_tokens[: self.cache_tokens], list(tokens))
            cached = min(common, len(tokens) - 1)
            if self.cache_tokens > cached:
                trim_prompt_cache(cache, self.cache_tokens - cached)
        else:
            cache = make_prompt_cache(self.model)
        eos = set(self.tokenizer.eos_token_ids) if stop_at_eos else set()
        sampler = make_sampler(0.0)
        prompt = mx.array(tokens[cached:])
        out, phases = [], []
        t0 = time.perf_counter()
        t_first = None

        def progress(done, total):  # when each prefill chunk finished (like the worker's progress)
            phases.append((done, time.perf_counter() - t0))

        for tok, _ in generate_step(prompt, self.model, max_tokens=max_tokens, sampler=sampler,
                                    prompt_cache=cache, prefill_step_size=prefill_step_size,
                                    prompt_progress_callback=progress):
            if t_first is None:
                t_first = time.perf_counter()
            out.append(tok)
            if tok in eos:
                break
        t_end = time.perf_counter()
        if keep:
            self.cache = cache
            self.cache_tokens = max(c.offset for c in cache if hasattr(c, "offset"))
            self.kept_tokens = list(tokens) + out
        n = len(out)
        ttft = (t_first or t_end) - t0
        return {
            "ttft_s": ttft,
            "prompt_tokens": len(tokens),
            "cached_tokens": cached,
            "prompt_tps": (len(tokens) - cached) / ttft if ttft > 0 else 0.0,
            "generated": n,
            "decode_tps": (n - 1) / (t_end - t_first) if n > 1 and t_end > t_first else 0.0,
            "total_s": t_end - t0,
            "phases": phases,
            "tokens": out,
        }

    # -- the worker's own engine, in this process (the ``inproc`` diagnostic) --

    def load_engine(self, path: str) -> dict:
        """Load as the worker does: a `load` request (dtype auto) run by its Engine."""
        sys.path.insert(0, str(ROOT))
        import msgspec
        from worker.engine import Engine
        from worker.protocol import Done, Load

        self.engine = Engine()
        tic = time.perf_counter()
        # no prompt-cache entries: every run starts from an empty KV cache, like raw's (bench/cpu/session.py)
        req = msgspec.convert({"type": "load", "id": "l", "model_path": path,
                               "options": {"cache_max_entries": 0}}, Load)
        done = self.engine.run(req, lambda ev: None, lambda: False)
        if not isinstance(done, Done):
            raise RuntimeError(f"load failed: {done}")
        # the same model object and tokenizer for generate_step and encode
        self.model, self.tokenizer = self.engine.kit.model, self.engine.kit.tokenizer
        self.cache = None
        return {"load_s": time.perf_counter() - tic, "dtype": done.model.compute_dtype}

    def gen_engine(self, tokens, max_tokens: int) -> dict:
        """A `generate` request run by the worker's Engine on the loaded model; its events go through the
        worker's real Writer thread (to /dev/null), so encoding and thread hand-offs are included."""
        import itertools

        import msgspec
        from worker.protocol import Done, Generate, Stats
        from worker.writer import Writer

        if getattr(self, "writer", None) is None:
            self.writer = Writer(os.open(os.devnull, os.O_WRONLY), on_broken=lambda: None)
            self.writer.start()
            self.keys = itertools.count(1)
        req = msgspec.convert({"type": "generate", "id": "g", "prompt": {"tokens": list(tokens)},
                               "params": {"max_tokens": max_tokens},
                               "cache_key": f"inproc-{next(self.keys)}"}, Generate)
        stats = []

        def emit(ev):
            if isinstance(ev, Stats):
                stats.append(ev)
            self.writer.put(ev)

        done = self.engine.run(req, emit, lambda: False)
        self.writer.put(done)
        self.writer.flush(5)
        if not isinstance(done, Done):
            raise RuntimeError(f"generate failed: {done}")
        st = stats[0]
        return {"ttft_s": st.ttft_s, "decode_tps": st.generation_tps, "generated": st.generated_tokens,
                "cached_tokens": st.cached_tokens, "prompt_tokens": st.prompt_tokens}

    def info(self) -> dict:
        from importlib.metadata import version

        import mlx.core as mx

        try:
            sys.path.insert(0, str(ROOT))
            from worker.boot.blas import blas_info  # stdlib only: reads /proc/self/maps

            blas = blas_info()
        except Exception as exc:  # noqa: BLE001
            blas = {"name": "unknown", "error": str(exc)}
        return {"blas": blas, "mlx": version("mlx"), "mlx-lm": version("mlx-lm"),
                "device": str(mx.default_device()), "pid": os.getpid()}


def serve() -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints go to stderr, never into the answers
    srv = _Server()
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        op = cmd.pop("cmd")
        if op == "quit":
            break
        try:
            res = {"ok": True, **getattr(srv, op)(**cmd)}
        except Exception as exc:  # noqa: BLE001 - report, keep serving
            res = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(res) + "\n")


# ---------------------------------------------------------------- client (bench process)

def worker_blas_env(worker_pid: int) -> dict:
    """The BLAS-related environment the worker was (re-)executed with, read from /proc."""
    try:
        raw = Path(f"/proc/{worker_pid}/environ").read_bytes()
    except OSError:
        return {}
    env = dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)
    return {k: env[k] for k in BLAS_ENV_KEYS if k in env}


class RawRunner:
    """A ``python -m bench.raw`` child. mode: "default" or "matched" (needs blas_env)."""

    def __init__(self, mode: str, blas_env: dict | None = None):
        env = dict(os.environ)
        env.pop("LD_PRELOAD", None)
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false"})
        if mode in ("matched", "inproc"):  # inproc: the worker's engine code in a matched process
            if not blas_env or "LD_PRELOAD" not in blas_env:
                raise RuntimeError("raw matched needs the worker's LD_PRELOAD (worker runs without one?)")
            for k in BLAS_ENV_KEYS:  # exactly the worker's BLAS settings, nothing of ours
                env.pop(k, None)
            env.update(blas_env)
        elif mode != "default":
            raise ValueError(mode)
        self.mode = mode
        self.dtype = "stored" if mode == "default" else "float32"
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.raw"], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self.call("info")

    def call(self, cmd: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"raw {self.mode} runner died (exit {self.proc.wait()})")
        res = json.loads(line)
        if not res.pop("ok"):
            raise RuntimeError(f"raw {self.mode}: {cmd} failed: {res['error']}")
        return res

    def load(self, path) -> dict:
        return self.call("load", path=str(path), dtype=self.dtype)

    def gen(self, tokens, max_tokens, **kw) -> dict:
        return self.call("gen", tokens=list(tokens), max_tokens=max_tokens, **kw)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":
    serve()

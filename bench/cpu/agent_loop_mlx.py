"""The agent loop's turns (``agent_loop.py``) through mlx-lm's server cache and LM Studio's mlx-engine cache,
in one process (``python -m bench.cpu.agent_loop_mlx JOB.json OUT.json``, started by ``agent_loop.py`` with the
worker's BLAS environment, as ``bench/raw.py``'s matched runs are): the same prompt ids per turn, and the
worker's generated ids forced by a logits processor, so each cache sees exactly the token stream the worker saw.

mlx-lm: what ``mlx_lm/server.py`` does for a batchable text model (its default path): ``_tokenize``'s segments
(system prompt, context, thinking tail; only when the last message is a user's),
``LRUPromptCache.fetch_nearest_cache``, the remaining segments into mlx-lm's ``BatchGenerator`` with a checkpoint
inserted at each segment end, and the finished sequence's cache inserted under its ``all_tokens``. mlx-engine: its
sequential kit's ``CacheWrapper`` (``update_cache``, then ``stream_generate`` with ``record_generated_token``),
loaded from a source checkout.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

MLX_LM_KEY = ("agent-loop", None, None)  # the server's model_key: (path, adapter, draft)


def forcing(ids: list):
    """A logits processor that makes the i-th call pick ``ids[i]``; ``agree`` counts the calls where the model's
    own argmax was that id (a check that both sides run the same model, outside constrained turns)."""
    import mlx.core as mx

    state = {"i": 0, "agree": 0}

    def proc(tokens, logits):
        i = state["i"]
        if i >= len(ids):
            return logits
        state["i"] += 1
        state["agree"] += int(mx.argmax(logits, axis=-1).item() == ids[i])
        return mx.where(mx.arange(logits.shape[-1]) == ids[i], logits, -mx.inf)

    return proc, state


def load_model(path: Path):
    import mlx.core as mx
    from mlx_lm import load

    model, tok = load(str(path))
    model.set_dtype(mx.float32)  # the worker's CPU dtype; only speed depends on it here (the ids are forced)
    return model, tok


# ---------------------------------------------------------------- mlx-lm's server cache

def server_segments(tok, turn: dict) -> tuple[list, list]:
    """``ResponseGenerator._tokenize``'s segments of a chat prompt and their cache types."""
    prompt = turn["_ids"]
    if turn["_roles"][-1] != "user" or turn["_image"]:
        return [prompt], ["assistant"]
    msgs = turn["_msgs"]
    num_system = next((i for i, m in enumerate(msgs) if m["role"] != "system"), len(msgs))
    segments, types_, sys_end = [], [], 0
    if num_system:
        sys_tokens = tok.apply_chat_template(msgs[:num_system] + [{"role": "user", "content": ""}],
                                             add_generation_prompt=False, tokenize=True,
                                             **turn["_kw"], **turn["_template_kwargs"])
        for i, (a, b) in enumerate(zip(sys_tokens, prompt)):
            if a != b:
                sys_end = i
                break
        if 0 < sys_end < len(prompt):
            segments.append(prompt[:sys_end])
            types_.append("system")
    tail = len(prompt)
    if tok.has_thinking:
        start = tok.rfind_think_start(prompt, start=tail - 11)
        if start >= 0:
            tail = start
    if sys_end < tail:
        segments.append(prompt[sys_end:tail])
        types_.append("user")
    if tail < len(prompt):
        segments.append(prompt[tail:])
        types_.append("assistant")
    return (segments, types_) if segments else ([prompt], ["assistant"])


def _drop_cached(segments: list, types_: list, n: int) -> None:
    while n > 0:
        if n >= len(segments[0]):
            n -= len(segments.pop(0))
            types_.pop(0)
        else:
            segments[0] = segments[0][n:]
            break


def mlx_lm_turn(bg, lru, tok, turn: dict) -> dict:
    """One request as the server's batch loop serves it; returns the cached count and the forced ids' check."""
    from mlx_lm.generate import make_stop_sequences
    from mlx_lm.sample_utils import make_sampler

    prompt, forced = turn["_ids"], turn["generated"]
    segments, types_ = server_segments(tok, turn)
    cache, rest = lru.fetch_nearest_cache(MLX_LM_KEY, prompt)
    cached = len(prompt) - len(rest)
    _drop_cached(segments, types_, cached)
    proc, state = forcing(forced)
    (uid,) = bg.insert_segments(segments=[segments], max_tokens=[len(forced)], caches=[cache],
                                all_tokens=[prompt[:cached]], samplers=[make_sampler(0.0)],
                                logits_processors=[[proc]], stop_sequences=[make_stop_sequences(tok)])
    pending, out = types_[::-1], []
    while True:
        prompt_responses, gen_responses = bg.next()
        ends = [r.uid for r in prompt_responses if r.end_of_segment and not r.end_of_prompt and pending]
        for _, (c, key) in bg.extract_cache(ends).items():
            lru.insert_cache(MLX_LM_KEY, key[:], c, cache_type=pending.pop())
        for r in gen_responses:
            out.append(r.token)
            if r.finish_reason is not None:
                lru.insert_cache(MLX_LM_KEY, r.all_tokens[:], r.prompt_cache, cache_type="assistant")
                return {"cached": cached, "ok": out == forced, "agree": state["agree"],
                        "segments": [len(s) for s in segments]}


def replay_mlx_lm(model, tok, turns: list) -> list:
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.models.cache import LRUPromptCache

    lru = LRUPromptCache(10)  # the server's default --prompt-cache-size
    bg = BatchGenerator(model, prefill_step_size=2048)
    try:
        return [mlx_lm_turn(bg, lru, tok, t) for t in turns]
    finally:
        bg.close()


# ---------------------------------------------------------------- mlx-engine's CacheWrapper

def engine_import_error(src: Path) -> str | None:
    """Why ``import mlx_engine`` (the whole package) fails here, or None."""
    r = subprocess.run([sys.executable, "-c", "import mlx_engine"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(src)})
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1]


def engine_cache_module(src: Path):
    """``mlx_engine.cache_wrapper`` without the package's ``__init__`` (which imports its generation stack:
    outlines, mlx-vlm's batching, ...): the cache path needs only mlx, mlx-lm and its progress reporter."""
    if "mlx_engine" not in sys.modules:
        pkg = types.ModuleType("mlx_engine")
        pkg.__path__ = [str(src / "mlx_engine")]
        sys.modules["mlx_engine"] = pkg
    return importlib.import_module("mlx_engine.cache_wrapper")


def replay_mlx_engine(model, tok, turns: list, src: Path) -> list:
    """ModelKit's sequential path: ``CacheWrapper(model, max_kv_size=4096)`` (load_model's default), then
    ``_sequential_generation``'s ``stream_generate`` on what ``update_cache`` left, each token recorded."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    cw_mod = engine_cache_module(src)
    from mlx_engine.utils.prompt_progress_reporter import PromptProgressReporter

    class Reporter(PromptProgressReporter):
        def begin(self, is_draft, cached_tokens, total_prompt_tokens, prefill_tokens_processed):
            self.cached = cached_tokens
            return True

        def update(self, is_draft, prefill_tokens_processed):
            return True

        def finish(self, is_draft, prefill_tokens_processed=None):
            return True

    import mlx.core as mx

    cw = cw_mod.CacheWrapper(model, 4096, chunk_size=cw_mod.PROMPT_PROCESSING_CHUNK_SIZE)
    out = []
    for t in turns:
        rep, forced = Reporter(), t["generated"]
        rest = cw.update_cache(mx.array(t["_ids"]), rep)
        proc, state = forcing(forced)
        got = []
        for r in stream_generate(model, tok, rest, max_tokens=len(forced), sampler=make_sampler(0.0),
                                 logits_processors=[proc], prompt_cache=cw.cache, prefill_step_size=2048):
            cw.record_generated_token(r.token)
            got.append(r.token)
        out.append({"cached": rep.cached, "ok": got == forced, "agree": state["agree"]})
    return out


# ---------------------------------------------------------------- the child process

def replay(path: Path, turns: list, engine_src: Path) -> dict:
    import time

    model, tok = load_model(path)
    t0 = time.perf_counter()
    out = {"mlx_lm": replay_mlx_lm(model, tok, turns), "mlx_lm_s": round(time.perf_counter() - t0, 1)}
    if not (engine_src / "mlx_engine" / "cache_wrapper.py").exists():
        out["mlx_engine"] = f"not run: no mlx-engine checkout in {engine_src} (--mlx-engine DIR)"
        return out
    t0 = time.perf_counter()
    out["mlx_engine"] = replay_mlx_engine(model, tok, turns, engine_src)
    out["mlx_engine_s"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv=None) -> None:
    job_file, out_file = argv or sys.argv[1:]
    job = json.loads(Path(job_file).read_text())
    Path(out_file).write_text(json.dumps(replay(Path(job["path"]), job["turns"], Path(job["engine_src"]))))


if __name__ == "__main__":
    main()

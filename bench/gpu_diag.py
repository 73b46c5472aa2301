"""Where a follow-up's time goes, in process: worker.generation.solo.run on the kit vs raw generate_step on the same
model, the same follow-up replayed N times (the store is put back between replays), alternating.

    python -m bench.gpu_diag [--shape 4b] [--doc 2300] [--n 10] [--keep]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu_cache import FOLLOW, QUESTION, WORDS, build  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4b")
    ap.add_argument("--models-dir", default="/root/models")
    ap.add_argument("--doc", type=int, default=2300)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--keep", action="store_true",
                    help="keep each replay's entry in the store (as the process does), with the first word varied")
    a = ap.parse_args(argv)
    import mlx.core as mx
    import msgspec
    import numpy as np
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    from worker.generation import solo as generate
    from worker.loading.model import load
    from worker.protocol import Generate, LoadOptions, Stats

    path = build(a.shape, Path(a.models_dir))
    kit = load(str(path), LoadOptions(), lambda f: None)
    rng = np.random.default_rng(0)
    doc = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), a.doc))
    first = [{"role": "user", "content": doc + " " + QUESTION}]
    phases = {}

    def timed(name, fn):
        def wrapper(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    generate.build_prompt = timed("build_prompt", generate.build_prompt)
    kit.cache.take = timed("take", kit.cache.take)
    kit.cache.put = timed("put", kit.cache.put)

    import queue
    import threading

    jobs, results = queue.Queue(), queue.Queue()

    def engine():  # like the worker's engine thread: every MLX call of a request on one long-lived thread
        while True:
            fn = jobs.get()
            results.put(fn())

    threading.Thread(target=engine, daemon=True).start()

    def run(msgs, n, on_thread=False):
        req = msgspec.convert({"type": "generate", "id": "x", "prompt": {"messages": msgs},
                               "params": {"max_tokens": n}}, Generate)
        out = []

        def call():
            return generate.run(kit, req, out.append, lambda: False)

        if on_thread:
            jobs.put(call)
            done = results.get()
        else:
            done = call()
        return done, next(e for e in out if isinstance(e, Stats))

    for _ in range(2):  # warm-up (shapes)
        d, s1 = run(first, 16)
        follow = first + [{"role": "assistant", "content": d.text}, {"role": "user", "content": FOLLOW}]
        saved = list(kit.cache.entries)
        run(follow, 1)
        kit.cache.entries = list(saved)
    held = s1.prompt_tokens + s1.generated_tokens
    ids = [int(t) for t in rng.integers(20, 500, held + 100)]
    rows = []
    for i in range(a.n):
        phases.clear()
        saved = list(kit.cache.entries)
        if a.keep:
            v = f"{2 * i % 10} {FOLLOW}", f"{(2 * i + 1) % 10} {FOLLOW}"  # a new first token each time
            _, s2 = run(follow[:-1] + [{"role": "user", "content": v[0]}], 1)
            _, s3 = run(follow[:-1] + [{"role": "user", "content": v[1]}], 1, on_thread=True)
        else:
            _, s2 = run(follow, 1)
            kit.cache.entries = list(saved)
            _, s3 = run(follow, 1, on_thread=True)
            kit.cache.entries = list(saved)
        new = s2.prompt_tokens - s2.cached_tokens
        cache = make_prompt_cache(kit.model)
        for _ in generate_step(mx.array(ids[:s2.cached_tokens]), kit.model, max_tokens=1, prompt_cache=cache):
            break
        for c in cache:
            if c.offset > s2.cached_tokens and c.is_trimmable():
                c.trim(c.offset - s2.cached_tokens)
        mx.eval([c.state for c in cache])
        t0 = time.perf_counter()
        for _ in generate_step(mx.array(ids[s2.cached_tokens:s2.cached_tokens + new]), kit.model, max_tokens=1,
                               prompt_cache=cache):
            break
        raw = time.perf_counter() - t0
        rows.append((s2.ttft_s, raw, s3.ttft_s))
        print(f"on a thread {s3.ttft_s * 1000:.1f} ms; worker {s2.ttft_s * 1000:.1f} ms (cached {s2.cached_tokens}, new {new}; "
              + ", ".join(f"{k} {v * 1000:.1f}" for k, v in phases.items()) + f") raw {raw * 1000:.1f} ms; entries {len(kit.cache.entries)}, active "
              f"{mx.get_active_memory() / 2**30:.2f} GiB, cache {mx.get_cache_memory() / 2**30:.2f} GiB",
              flush=True)
    w = statistics.median(r[0] for r in rows)
    r = statistics.median(r[1] for r in rows)
    t = statistics.median(r[2] for r in rows)
    print(f"median worker {w * 1000:.1f} ms (on a thread {t * 1000:.1f} ms), raw {r * 1000:.1f} ms, "
          f"ratio {w / r:.2f} ({t / r:.2f})")


if __name__ == "__main__":
    main()

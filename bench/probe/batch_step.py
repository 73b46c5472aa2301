"""Where a batched decode step's time goes (issue 15): per-step ms of several decode loops, B sequences.

    python -m bench.probe.batch_step --models-dir DIR [--sizes 1,2,4,8] [--steps 128]

Loops: ``gs`` mlx-lm generate_step (B=1); ``kv`` a lean loop over plain KVCache (B=1); ``lean`` the same
over a BatchKVCache merged from per-sequence prefilled caches (left padding differs); ``nomask`` lean with
the mask dropped (wrong output, timing only); ``lp`` lean plus logprobs as BatchGenerator keeps them;
``bg`` BatchGenerator itself.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402
from mlx_lm.models import cache as C  # noqa: E402

from bench.gpu import SHAPES, build  # noqa: E402


def prefilled(model, prompts):
    caches = []
    for p in prompts:
        c = C.make_prompt_cache(model)
        model(mx.array(p[:-1])[None], cache=c)
        mx.eval([x.state for x in c])
        caches.append(c)
    return caches


def lean(model, cache, last, steps, logprobs=False):
    y = mx.array(last)
    times = []
    prev = None
    for _ in range(steps + 1):
        t = time.perf_counter()
        logits = model(y[:, None], cache=cache)[:, -1, :]
        if logprobs:
            lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            nxt = mx.argmax(lp, axis=-1)
            lps = list(lp)
            mx.async_eval(nxt, lps)
        else:
            nxt = mx.argmax(logits, axis=-1)
            mx.async_eval(nxt)
        if prev is not None:
            prev.tolist()
        prev, y = nxt, nxt
        times.append(time.perf_counter() - t)
    return statistics.median(times[8:]) * 1000


def gs(model, prompt, steps):
    from mlx_lm.generate import generate_step
    ts, t = [], None
    for _ in generate_step(mx.array(prompt), model, max_tokens=steps + 8):
        now = time.perf_counter()
        if t is not None:
            ts.append(now - t)
        t = now
    return statistics.median(ts[8:]) * 1000


def bg(model, prompts, steps):
    from mlx_lm.generate import BatchGenerator
    gen = BatchGenerator(model, max_tokens=steps + 40, stop_tokens=[])
    gen.insert(prompts)
    ts, t = [], None
    n = 0
    while n < steps + 16:
        _, resp = gen.next()
        if not resp:
            continue
        now = time.perf_counter()
        if t is not None:
            ts.append(now - t)
        t = now
        n += 1
    gen.close()
    return statistics.median(ts[8:]) * 1000


def run_all(model, vocab, sizes, steps, plen):
    import numpy as np
    rng = np.random.default_rng(0)
    out = {}

    def prompts(b):
        return [[int(x) for x in rng.integers(1, vocab - 2, plen - 7 * i)] for i in range(b)]

    out["gs 1"] = gs(model, prompts(1)[0], steps)
    c = prefilled(model, prompts(1))[0]
    out["kv 1"] = lean(model, c, [5], steps)
    orig = C.BatchKVCache.make_mask
    for b in sizes:
        ps = prompts(b)
        for name, kw in (("lean", {}), ("lp", {"logprobs": True}), ("nomask", {})):
            caches = prefilled(model, ps)
            bc = [layer.merge([cs[i] for cs in caches]) for i, layer in enumerate(caches[0])]
            if name == "nomask":
                C.BatchKVCache.make_mask = lambda self, N, **k: None
            try:
                out[f"{name} {b}"] = lean(model, bc, [p[-1] for p in ps], steps, **kw)
            finally:
                C.BatchKVCache.make_mask = orig
        out[f"bg {b}"] = bg(model, ps, steps)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models-dir", default="/root/models")
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=512)
    a = ap.parse_args()
    from mlx_lm import load
    model, _ = load(str(build(Path(a.models_dir), a.shape, a.bits or None)))
    sizes = [int(x) for x in a.sizes.split(",")]
    t = time.perf_counter()
    run_all(model, SHAPES[a.shape]["vocab_size"], sizes, 24, a.prompt)  # warm-up: every shape compiles
    print(f"warm-up {time.perf_counter() - t:.1f} s", flush=True)
    for rnd in range(2):
        res = run_all(model, SHAPES[a.shape]["vocab_size"], sizes, a.steps, a.prompt)
        print(f"round {rnd}: " + ", ".join(f"{k} {v:.2f}ms" for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main()

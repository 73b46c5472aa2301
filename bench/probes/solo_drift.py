"""Does one stream slow down over successive requests of one worker process? (issue 15's baseline)

    python -m bench.probes.solo_drift [--models-dir DIR] [--requests 8] [--tokens 256] [--variants a,b]

On the H200 a fresh worker's first request decoded at ~420-450 tok/s and later ones at 250-330
(bench/README.md, "A lone stream in the batch path"); the same on the CPU showed no trend. Per variant, a
fresh worker with ``max_concurrent: 1`` answers ``--requests`` greedy requests in a row (distinct
512-token prompts), and each request's host-side decode tok/s is printed, with the worker's own
``generation_tps``. Variants: ``default``; ``nocache`` (``cache_max_entries: 0``: nothing stored between
requests); ``graphs`` (``MLX_CUDA_GRAPH_CACHE_SIZE=2000``); ``keepbuf`` (the worker's
``mx.clear_cache()`` after each prefill chunk made a no-op, through ``MLX_WORKER_KEEP_BUFFERS=1`` read
by this probe's sitecustomize); ``samep`` (the same prompt every time, so every request after the first
reuses the cache); ``pause`` (3 s idle before each request: if each is fast again, it is the host's
clock after idling, not the worker's state).
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from ..common import TimedWorker, models_dir
from ..gpu.concurrency import streams
from ..gpu.shapes import SHAPES, build

VARIANTS = {"default": ({}, {}), "nocache": ({}, {"cache_max_entries": 0}),
            "graphs": ({"MLX_CUDA_GRAPH_CACHE_SIZE": "2000"}, {}), "keepbuf": ({"MLX_WORKER_KEEP_BUFFERS": "1"}, {}),
            "samep": ({}, {}), "pause": ({}, {})}

_SITE = """
import os
if os.environ.get("MLX_WORKER_KEEP_BUFFERS") == "1":
    import mlx.core as mx
    mx.clear_cache = lambda: None
"""


def run(path, name, requests, tokens, vocab, plen):
    env, options = VARIANTS[name]
    site = tempfile.mkdtemp()
    Path(site, "sitecustomize.py").write_text(_SITE)
    env = dict(env, PYTHONPATH=os.pathsep.join([site, os.environ.get("PYTHONPATH", "")]))
    w = TimedWorker(env=env)
    try:
        w.load_model(path, max_concurrent=1, **options)
        out = []
        for r in range(requests):
            if name == "pause":
                time.sleep(3)
            tps, rows = streams(w, 1, 1 if name == "samep" else 2 + r, plen, tokens, vocab)
            out.append((tps, rows[0]["generation_tps"]))
        return out
    finally:
        w.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models-dir", type=Path, default=models_dir())
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args()
    path = build(a.models_dir, a.shape, a.bits or None)
    vocab = SHAPES[a.shape]["vocab_size"]
    for name in a.variants.split(","):
        rows = run(path, name, a.requests, a.tokens, vocab, a.prompt)
        host = [f"{h:.0f}" for h, _ in rows]
        print(f"{name:8s} host tok/s per request: {' '.join(host)}; worker: "
              f"{' '.join(f'{s:.0f}' for _, s in rows)}; first / median of the rest: "
              f"{rows[0][0] / statistics.median(h for h, _ in rows[1:]):.2f}", flush=True)


if __name__ == "__main__":
    main()

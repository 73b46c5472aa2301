"""Continuous batching through the worker process (issue 15), one run: the worker with max_concurrent 1
against the worker with batching, on the same model.

    python -m bench.gpu.concurrency --out DIR [--shape llama-3.2-1b] [--bits 4] [--streams 1,2,4,8]

- **Aggregate decode tok/s**: N greedy requests (distinct 512-token prompts, 256 new tokens each) sent
  at once; tokens whose events arrived while all N were decoding / that window (host clock). The
  baseline is one stream on a worker loaded with ``max_concurrent: 1`` (what every request got before
  batching), measured the same way, in the same run: both workers stay loaded and are measured in turn,
  round by round, and each round's ratio is reported beside the ratio of the medians.
- **Per-stream TTFT** (host: request written -> first token event) and the worker's own stats.
- **Admission of a long prompt**: while ``--admit-streams`` streams decode, a ``--admit-prompt``-token
  prompt is sent; the worst gap between two token events of a running stream during its admission,
  against their median gap.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from ..common import TimedWorker, log as _log, models_dir
from .shapes import SHAPES, build, prompt_tokens as prompt


def log(msg):
    _log(msg, "conc")


def streams(w, n, seed, plen, tokens, vocab):
    """N requests at once; returns aggregate tok/s over the window where all decode, and per-stream rows."""
    ids = [f"s{seed}-{i}" for i in range(n)]
    t0 = time.perf_counter()
    for i, rid in enumerate(ids):
        w.send({"type": "generate", "id": rid, "prompt": {"tokens": prompt(plen, seed * 100 + i, vocab)},
                "params": {"max_tokens": tokens}})
    evs = {rid: w.collect(rid, timeout=900) for rid in ids}
    rows, times = [], []
    for rid in ids:
        if evs[rid][-1]["type"] != "done":
            raise RuntimeError(evs[rid][-1])
        toks = [e for e in evs[rid] if e["type"] == "token"]
        st = next(e for e in evs[rid] if e["type"] == "stats")
        times.append([(e["_t"], len(e["tokens"])) for e in toks])
        rows.append({"host_ttft_s": toks[0]["_t"] - t0, "ttft_s": st["ttft_s"],
                     "generation_tps": st["generation_tps"], "concurrent": st.get("concurrent"),
                     "batching": st.get("batching"), "generated": st["generated_tokens"]})
    start = max(t[0][0] for t in times)
    end = min(t[-1][0] for t in times)
    inside = sum(k for t in times for (at, k) in t if start < at <= end)
    return (inside / (end - start) if end > start else None), rows


def admission(w, n, plen_long, vocab, seed, plen=512):
    """While n streams decode, admit one plen_long-token prompt: the running streams' worst token gap."""
    ids = [f"bg{seed}-{i}" for i in range(n)]
    for i, rid in enumerate(ids):
        w.send({"type": "generate", "id": rid, "prompt": {"tokens": prompt(plen, seed * 10 + i, vocab)},
                "params": {"max_tokens": 100000}})
    for rid in ids:
        w.wait_for(rid, lambda e: e["type"] == "token", timeout=300)
    time.sleep(0.5)
    t_admit = time.perf_counter()
    w.send({"type": "generate", "id": "long", "prompt": {"tokens": prompt(plen_long, seed, vocab)},
            "params": {"max_tokens": 8}})
    long_evs = w.collect("long", timeout=600)
    time.sleep(0.5)
    for rid in ids:
        w.send({"type": "cancel", "id": f"c-{rid}", "target": rid})
    ids = [f"{rid}" for rid in ids]
    bg = {rid: w.collect(rid, timeout=300) for rid in ids}
    long_first = next(e["_t"] for e in long_evs if e["type"] == "token")
    gaps_in, gaps_out = [], []
    for rid in ids:
        ts = [e["_t"] for e in bg[rid] if e["type"] == "token"]
        for a, b in zip(ts, ts[1:]):
            (gaps_in if b > t_admit and a < long_first else gaps_out).append(b - a)
    st = next(e for e in long_evs if e["type"] == "stats")
    return {"streams": n, "prompt": plen_long, "worst_gap_ms": max(gaps_in) * 1000 if gaps_in else None,
            "median_gap_ms": statistics.median(gaps_out) * 1000, "long_host_ttft_s": long_first - t_admit,
            "long_ttft_s": st["ttft_s"], "gaps_during_admission": len(gaps_in)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--admit-prompt", type=int, default=4096)
    ap.add_argument("--admit-streams", type=int, default=4)
    ap.add_argument("--models-dir", type=Path, default=models_dir())
    ap.add_argument("--aba", action="store_true", help="only: one stream, max_concurrent 1 / N / 1 / N in one "
                    "worker process (is a lone stream in the batch as fast as alone?)")
    a = ap.parse_args(argv)
    path = build(a.models_dir, a.shape, a.bits or None)
    vocab = SHAPES[a.shape]["vocab_size"]
    sizes = [int(x) for x in a.streams.split(",")]
    res = {"shape": a.shape, "bits": a.bits, "prompt": a.prompt, "tokens": a.tokens, "rows": []}

    if a.aba:
        w, rows = TimedWorker(), []
        for conc in (1, 8, 1, 8, 1, 8):
            w.load_model(path, max_concurrent=conc)
            streams(w, 1, 1, a.prompt, 32, vocab)
            rows.append((conc, statistics.median(streams(w, 1, 2 + r, a.prompt, a.tokens, vocab)[0] for r in range(3))))
            log(f"aba: max_concurrent {conc}: {rows[-1][1]:.1f} tok/s")
        w.close()
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "gpu-concurrency-aba.json").write_text(json.dumps(rows))
        return 0
    # both workers stay up and are measured in turn, round by round: one stream alone on the worker with
    # max_concurrent 1, then N streams on the batching one. The host's speed drifts (a step here is bound
    # by the host's CPU), so each round's ratio compares measurements seconds apart.
    solo_w = TimedWorker()
    solo_w.load_model(path, max_concurrent=1)
    w = TimedWorker()
    info = w.load_model(path, max_concurrent=max(sizes + [a.admit_streams + 1]))
    res["load_warmup_s"] = info.get("warmup_s")
    log(f"both workers loaded, batching warm-up {info.get('warmup_s')} s")
    streams(solo_w, 1, 1, a.prompt, 32, vocab)
    for n in sizes:
        streams(w, n, 50 + n, a.prompt, 24, vocab)  # warm-up of this size
    solo, runs = [], {n: [] for n in sizes}
    for r in range(a.rounds):
        solo.append(streams(solo_w, 1, 2 + r, a.prompt, a.tokens, vocab)[0])
        for n in sizes:
            runs[n].append(streams(w, n, 100 + 10 * n + r, a.prompt, a.tokens, vocab))
        log(f"round {r}: max_concurrent 1 {solo[-1]:.1f} tok/s; " + ", ".join(
            f"{n} streams {runs[n][-1][0]:.1f} ({runs[n][-1][0] / solo[-1]:.2f}x)" for n in sizes))
    solo_w.close()
    res["concurrency_1_tps"] = statistics.median(solo)
    res["concurrency_1_runs_tps"] = solo
    for n in sizes:
        agg = statistics.median(x[0] for x in runs[n])
        ratios = [x[0] / s for x, s in zip(runs[n], solo)]
        row = {"streams": n, "aggregate_tps": agg, "vs_concurrency_1": agg / res["concurrency_1_tps"],
               "round_ratios": ratios, "median_round_ratio": statistics.median(ratios),
               "runs_tps": [x[0] for x in runs[n]], "per_stream": runs[n][-1][1]}
        res["rows"].append(row)
        log(f"{n} streams: {agg:.1f} tok/s aggregate = {row['vs_concurrency_1']:.2f}x of the median "
            f"{res['concurrency_1_tps']:.1f}; per round {[round(x, 2) for x in ratios]}; host TTFT "
            f"{[round(s['host_ttft_s'] * 1000) for s in row['per_stream']]} ms")
    admission(w, a.admit_streams, a.admit_prompt, vocab, 7001)  # warm-up of the long prompt's shapes
    res["admission"] = admission(w, a.admit_streams, a.admit_prompt, vocab, 7002)
    log(f"admission: {res['admission']}")
    w.close()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu-concurrency-{a.shape}-q{a.bits}.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

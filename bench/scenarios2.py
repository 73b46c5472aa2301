"""More scenarios: cancel latency, per-token protocol cost, startup/load overhead.

Same contract as bench/scenarios.py: each takes (Session, profile) and returns {"rows", "details"}.
"""

from __future__ import annotations

import os
import random
import statistics
import threading
import time

from .common import (LABELS, PAUSE_S, PREFILL_STEP, STORY_PROMPT, Session, document, log,
                     smollm2_model, summary, tiny_model, tiny_model_long)
from .host import TimedWorker, _ids
from .scenarios import LONG_QUESTION, fresh_key, row

TERMINAL = ("done", "error")


def pct(vals, q):
    """Nearest-rank percentile (q in 0..100) of a list."""
    v = sorted(vals)
    return v[min(len(v) - 1, max(0, int(round(q / 100 * len(v) + 0.5)) - 1))] if v else None


# ---------------------------------------------------------------- cancel

def _wait(w: TimedWorker, rid: str, pred, timeout=900):
    """Read events until one of ``rid`` satisfies ``pred`` or is terminal; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        ev = w.next_event(timeout=max(0.01, deadline - time.monotonic()))
        if ev.get("id") != rid:
            w.backlog.append(ev)
            continue
        if pred(ev) or ev["type"] in TERMINAL:
            return ev


def _cancel_once(w: TimedWorker, tokens, phase: str, rng: random.Random, delay_max: float) -> dict:
    """Start a generation, cancel it during ``phase`` ("decode" or "prefill"); time to its terminal event."""
    rid, cid = f"c{next(_ids)}", f"x{next(_ids)}"
    w.send({"type": "generate", "id": rid, "prompt": {"tokens": list(tokens)}, "cache_key": fresh_key(),
            "params": {"max_tokens": 1000 if phase == "decode" else 4, "temperature": 0.0}})
    if phase == "decode":
        k = rng.randint(2, 8)
        seen = [0]

        def nth_token(ev):
            seen[0] += ev["type"] == "token"
            return seen[0] >= k
        ev = _wait(w, rid, nth_token)
    else:  # prefill: first progress(processed=0), then a random point inside the first chunk(s)
        ev = _wait(w, rid, lambda e: e["type"] == "progress")
        time.sleep(rng.uniform(0.0, delay_max))
    if ev["type"] in TERMINAL:
        return {"ok": False, "why": f"ended before the cancel: {ev}"}
    t0 = time.perf_counter()
    w.send({"type": "cancel", "id": cid, "target": rid})
    end = _wait(w, rid, lambda e: False)
    lat = end["_t"] - t0
    cdone = w.collect(cid, timeout=60)[-1]
    # the target may have already produced its first token before the cancel (prefill ended)
    return {"ok": end.get("stop_reason") == "cancelled", "latency_s": lat,
            "stop_reason": end.get("stop_reason"), "cancelled": cdone.get("cancelled")}


def cancel(s: Session, profile: dict) -> dict:
    rows, details = [], {}
    p = profile["cancel"]
    rng = random.Random(8)
    for key in ("tiny", "smollm2"):
        base = tiny_model() if key == "tiny" else smollm2_model()
        long_path = tiny_model_long(8192) if key == "tiny" else base
        s.use("matched", long_path)
        enc = s.raw("matched")
        story = enc.call("encode", messages=[{"role": "user", "content": STORY_PROMPT}])["tokens"]
        long_prompt = enc.call("long_chat", doc=document(), question=LONG_QUESTION,
                               target=p["prefill_tokens"][key])["tokens"]
        d = {}
        plans = [("decode", PREFILL_STEP, base, story, p["decode"][key], 0.0)]
        for step in (2048, 512):
            plans.append(("prefill", step, long_path, long_prompt, p["prefill"][key][step],
                          p["prefill_delay_s"][key][step]))
        for phase, step, path, prompt, n, delay in plans:
            s.worker.load_model(path, prefill_step_size=step)
            s._loaded.pop("worker", None)  # other scenarios reload with their own options
            s.worker.generation.solo(prompt[:16], 2, cache_key=fresh_key())  # warm-up
            log(f"cancel/{key}: {phase} (prefill_step_size {step}, {len(prompt)}-token prompt), {n} samples")
            runs = []
            for _ in range(n):
                runs.append(_cancel_once(s.worker, prompt, phase, rng, delay))
                time.sleep(PAUSE_S)
            lats = [r["latency_s"] * 1000 for r in runs if r.get("ok")]
            name = f"{phase}" + (f"-step{step}" if phase == "prefill" else "")
            d[name] = {"prompt_tokens": len(prompt), "prefill_step_size": step, "samples": n,
                       "cancelled": len(lats), "latency_ms": lats, "p50_ms": pct(lats, 50),
                       "p99_ms": pct(lats, 99), "max_ms": max(lats) if lats else None,
                       "runs": runs}
            if not lats:
                rows.append(row("cancel", LABELS[key], f"cancel latency, {name}", goal="p99 < 100 ms",
                                status="missed", note="no run was cancelled: " + str(runs[:1])))
                continue
            p50, p99 = d[name]["p50_ms"], d[name]["p99_ms"]
            where = ("after 2-8 token events" if phase == "decode" else
                     f"{len(prompt)}-token prompt, prefill_step_size {step}, cancel at U(0, {delay:.1f} s) "
                     f"after progress(0)")
            rows.append(row("cancel", LABELS[key],
                            f"cancel -> target's terminal event, {phase}, p50 / p99 ms (n={len(lats)})",
                            f"{p50:.1f} / {p99:.1f}", None, f"p99 {p99:.1f} ms", "p99 < 100 ms",
                            "met" if p99 < 100 else "missed", where))
        details[key] = d
    s.worker.load_model(tiny_model(), prefill_step_size=PREFILL_STEP)
    return {"rows": rows, "details": details}


# ---------------------------------------------------------------- protocol cost

def _micro(n: int) -> dict:
    """Per-event cost of the worker's own Writer + msgspec encoding of Token events into a drained pipe."""
    import msgspec

    from worker.protocol import Token
    from worker.writer import Writer

    def ev(i):
        return Token(id="g123", text=" the", tokens=[1000 + i % 500])

    enc = msgspec.json.Encoder()
    buf = bytearray()
    out = {}
    # 1. msgspec encoding alone
    evs = [ev(i) for i in range(n)]
    t = time.perf_counter()
    for e in evs:
        buf.clear()
        enc.encode_into(e, buf)
        buf += b"\n"
    out["encode_us"] = (time.perf_counter() - t) / n * 1e6
    r, wfd = os.pipe()
    drained = [0]

    def drain():
        while True:
            b = os.read(r, 1 << 16)
            if not b:
                return
            drained[0] += len(b)
    th = threading.Thread(target=drain, daemon=True)
    th.start()
    try:
        wr = Writer(wfd, on_broken=lambda: None)
        # 2. encode + write, one line per os.write (the writer's work for one unbatched token)
        evs = [ev(i) for i in range(n)]
        t = time.perf_counter()
        for e in evs:
            buf.clear()
            wr._encode(e, buf)
            os.write(wfd, buf)
        out["encode_write_us"] = (time.perf_counter() - t) / n * 1e6
        wr.start()
        # 3. the engine thread's cost: Writer.put() (then the writer thread encodes + writes in parallel)
        evs = [ev(i) for i in range(n)]
        t = time.perf_counter()
        for e in evs:
            wr.put(e)
        put = time.perf_counter() - t
        wr.flush(60)
        out["put_us"] = put / n * 1e6
        out["put_flush_batched_us"] = (time.perf_counter() - t) / n * 1e6
        # 4. one event at a time through the thread: put + wait until written (handoff latency included)
        m = max(200, n // 10)
        evs = [ev(i) for i in range(m)]
        t = time.perf_counter()
        for e in evs:
            wr.put(e)
            wr.flush(60)
        out["put_flush_each_us"] = (time.perf_counter() - t) / m * 1e6
    finally:
        os.close(wfd)
        th.join(5)
        os.close(r)
    out["bytes_per_event"] = len(buf)
    return out


def protocol(s: Session, profile: dict) -> dict:
    n, reps = profile["protocol"]["events"], profile["protocol"]["reps"]
    log(f"protocol: micro-benchmark, {reps} x {n} Token events")
    micro = [_micro(n) for _ in range(reps)]
    m = {k: statistics.median(x[k] for x in micro) for k in micro[0]}
    rows = [row("protocol", "(no model)", "token event encode + write (msgspec + os.write to a drained pipe), µs",
                m["encode_write_us"], None, f"{m['encode_write_us']:.2f} µs", "< 30 µs",
                "met" if m["encode_write_us"] < 30 else "missed",
                f"encode alone {m['encode_us']:.2f} µs; engine-side Writer.put {m['put_us']:.2f} µs; "
                f"through the writer thread batched {m['put_flush_batched_us']:.2f} µs, one at a time "
                f"(put + flush, thread handoff) {m['put_flush_each_us']:.1f} µs; "
                f"~{m['bytes_per_event']} bytes/line; median of {reps} x {n}")]
    # end to end: the tiny fixture generating a long stream
    path, mt = tiny_model(), profile["protocol"]["e2e_tokens"]
    s.use("worker", path)
    s.use("matched", path)
    ids = s.raw("matched").call("encode", messages=[{"role": "user", "content": STORY_PROMPT}])["tokens"]
    s.worker.generation.solo(ids, 16, cache_key=fresh_key())
    runs = []
    for _ in range(profile["protocol"]["e2e_reps"]):
        g = s.worker.generation.solo(ids, mt, cache_key=fresh_key())
        span = g["host_total_s"] - g["host_ttft_s"]
        runs.append({"token_events": g["token_events"], "generated": g["generated"],
                     "events_per_s": (g["token_events"] - 1) / span if span > 0 else None,
                     "engine_decode_tps": g["decode_tps"], "stop_reason": g["stop_reason"]})
        time.sleep(PAUSE_S)
    eps = statistics.median(r["events_per_s"] for r in runs)
    tps = statistics.median(r["engine_decode_tps"] for r in runs)
    rows.append(row("protocol", LABELS["tiny"], f"token events/s at the host, end to end ({mt} tokens)",
                    eps, None, f"{eps:.0f} ev/s", "(diagnostic)", "info",
                    f"engine decode {tps:.0f} tok/s; events carry "
                    f"{runs[0]['generated'] / max(1, runs[0]['token_events']):.2f} ids each"))
    return {"rows": rows, "details": {"micro_median": m, "micro_runs": micro, "e2e_runs": runs}}


# ---------------------------------------------------------------- startup / load

def startup(s: Session, profile: dict) -> dict:
    n = profile["startup"]["spawns"]
    log(f"startup: {n} spawns")
    spawn = []
    for _ in range(n):
        t = time.perf_counter()
        w = TimedWorker()
        spawn.append(time.perf_counter() - t)
        w.close()
        time.sleep(PAUSE_S)
    sp = summary(spawn)
    rows = [row("startup", "(no model)", f"spawn -> ready, s (median of {n})", sp["median"], None,
                f"{sp['median']:.2f} s", "(diagnostic)", "info",
                f"min {sp['min']:.2f}, max {sp['max']:.2f} s; includes the worker's BLAS re-exec")]
    details = {"spawn_s": spawn, "spawn": sp}
    reps = profile["startup"]["loads"]
    for key, path in (("tiny", tiny_model()), ("smollm2", smollm2_model())):
        raw = s.raw("matched")
        W, H, R = [], [], []
        s.worker.load_model(path, prefill_step_size=PREFILL_STEP)  # warm the page cache + imports
        raw.load(path)
        for i in range(reps):
            for side in (("w", "r") if i % 2 == 0 else ("r", "w")):
                if side == "w":
                    t = time.perf_counter()
                    info = s.worker.load_model(path, prefill_step_size=PREFILL_STEP)
                    H.append(time.perf_counter() - t)
                    W.append(info["load_s"])
                else:
                    R.append(raw.load(path)["load_s"])
                time.sleep(PAUSE_S)
        s._loaded["worker"] = s._loaded["matched"] = str(path)
        d = {"worker_load_s": summary(W), "worker_host_load_s": summary(H), "raw_load_s": summary(R),
             "compute_dtype": info.get("compute_dtype"), "stored_dtype": info.get("stored_dtype")}
        details[key] = d
        w_, h_, r_ = d["worker_load_s"]["median"], d["worker_host_load_s"]["median"], d["raw_load_s"]["median"]
        rows.append(row("startup", LABELS[key], f"load, s: worker host wall / raw mlx_lm.load + cast (median of {reps})",
                        h_, r_, f"{(h_ - r_) * 1000:+.0f} ms", "(diagnostic)", "info",
                        f"worker done.model.load_s {w_:.3f} s ({d['stored_dtype']} -> {d['compute_dtype']}); "
                        f"raw = mlx_lm.load + set_dtype(float32) + eval in a long-lived process"))
    return {"rows": rows, "details": details}


SCENARIOS2 = {"cancel": cancel, "protocol": protocol, "startup": startup}

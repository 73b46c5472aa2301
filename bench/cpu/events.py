"""What a token event costs (``protocol``): the worker's own ``Writer`` and msgspec encoding of
``worker.protocol.Token`` events into a drained pipe, and token events per second at the host end to end."""

from __future__ import annotations

import os
import statistics
import threading
import time

from ..common import log, tiny_model
from .session import LABELS, STORY_PROMPT, PAUSE_S, Session, fresh_key, row


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
    s.worker.generate(ids, 16, cache_key=fresh_key())
    runs = []
    for _ in range(profile["protocol"]["e2e_reps"]):
        g = s.worker.generate(ids, mt, cache_key=fresh_key())
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

"""Cancel latency through the worker process: from writing a `cancel` to reading the target's terminal event,
during decode and during prefill (``cancel``)."""

from __future__ import annotations

import random
import time

from ..common import TimedWorker, document, log, next_id, pct, smollm2_model, tiny_model, tiny_model_long
from .session import COLD, LABELS, LONG_QUESTION, PAUSE_S, PREFILL_STEP, STORY_PROMPT, Session, fresh_key, row

TERMINAL = ("done", "error")


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
    rid, cid = next_id("c"), next_id("x")
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
            s.worker.load_model(path, prefill_step_size=step, **COLD)
            s.forget("worker")  # other scenarios reload with their own options
            s.worker.generate(prompt[:16], 2, cache_key=fresh_key())  # warm-up
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

"""The scenarios. Each takes a Session and a profile dict and returns
{"rows": [table rows], "details": {...everything measured...}}.

A row: scenario, model, metric, worker, raw, result, goal, status ("met" / "missed" / "" for
information only), note. Figures are medians over interleaved runs (see bench/README.md).
"""

from __future__ import annotations

import itertools
import time

from .common import (LABELS, PAUSE_S, PREFILL_STEP, STORY_PROMPT, Session, document, log, med,
                     smollm2_model, strip_tokens, summary, tiny_model, tiny_model_long)

_keys = itertools.count(1)

LONG_QUESTION = "Summarize the protocol above in five bullet points."
FOLLOWUP_QUESTION = ("Thanks. Now list every error code you saw above, each with one short sentence "
                     "explaining when a host should expect it.")
MAX_TOKENS = {"tiny": 64, "smollm2": 32}


def fresh_key() -> str:
    """A cache_key never used before: the worker then starts from an empty KV cache."""
    return f"bench-{time.time_ns()}-{next(_keys)}"


def row(scenario, model, metric, worker=None, raw=None, result=None, goal="", status="", note=""):
    return {"scenario": scenario, "model": model, "metric": metric, "worker": worker, "raw": raw,
            "result": result, "goal": goal, "status": status, "note": note}


def _pairs(a_runs, b_runs, fa, fb, op):
    return [op(fa(a), fb(b)) for a, b in zip(a_runs, b_runs)
            if fa(a) is not None and fb(b) is not None]


def _paired(a_runs, b_runs, fa, fb, op):
    return med(_pairs(a_runs, b_runs, fa, fb, op))


def _status(value, ok, spread):
    """met/missed by the median; "(noisy)" when the pairs' interquartile range straddles the goal."""
    status = "met" if ok(value) else "missed"
    if spread.get("n", 0) >= 4 and ok(spread["p75"]) != ok(spread["p25"]):
        status += " (noisy)"
    return status


# ---------------------------------------------------------------- overhead

def overhead(s: Session, profile: dict) -> dict:
    rows, details = [], {}
    for key, path in (("tiny", tiny_model()), ("smollm2", smollm2_model())):
        n, mt = profile["overhead"][key], MAX_TOKENS[key]
        s.use("worker", path)
        s.use("matched", path)
        raw = s.raw("matched")
        ids = raw.call("encode", messages=[{"role": "user", "content": STORY_PROMPT}])["tokens"]
        log(f"overhead/{key}: {len(ids)} prompt tokens, max_tokens {mt}, {n} runs per side")
        s.worker.generation.solo(ids, mt, cache_key=fresh_key())  # warm-up
        raw.gen(ids, mt, prefill_step_size=PREFILL_STEP)
        W, M = [], []
        for i in range(n):
            for side in (("w", "m") if i % 2 == 0 else ("m", "w")):  # alternate who goes first
                if side == "w":
                    W.append(s.worker.generation.solo(ids, mt, cache_key=fresh_key()))
                else:
                    M.append(raw.gen(ids, mt, prefill_step_size=PREFILL_STEP))
                time.sleep(PAUSE_S)
        reused = [w["cached_tokens"] for w in W if w["cached_tokens"]]
        same = all(w["tokens"] == m["tokens"][: len(w["tokens"])] for w, m in zip(W, M))
        d = {
            "prompt_tokens": len(ids), "max_tokens": mt, "runs": n,
            "worker_decode_tps": summary(w["decode_tps"] for w in W),
            "raw_decode_tps": summary(m["decode_tps"] for m in M),
            "worker_host_decode_tps": summary(w["host_decode_tps"] for w in W),
            "worker_ttft_s": summary(w["ttft_s"] for w in W),
            "worker_host_ttft_s": summary(w["host_ttft_s"] for w in W),
            "raw_ttft_s": summary(m["ttft_s"] for m in M),
            "paired_decode_ratio": _paired(W, M, lambda w: w["decode_tps"], lambda m: m["decode_tps"],
                                           lambda a, b: a / b),
            "paired_host_decode_ratio": _paired(W, M, lambda w: w["host_decode_tps"],
                                                lambda m: m["decode_tps"], lambda a, b: a / b),
            "paired_ttft_overhead_engine_s": _paired(W, M, lambda w: w["ttft_s"],
                                                     lambda m: m["ttft_s"], lambda a, b: a - b),
            "paired_ttft_overhead_host_s": _paired(W, M, lambda w: w["host_ttft_s"],
                                                   lambda m: m["ttft_s"], lambda a, b: a - b),
            "worker_cache_reused_runs": len(reused), "same_tokens": same,
            "worker_runs": [strip_tokens(w) for w in W], "raw_runs": [strip_tokens(m) for m in M],
        }
        d["paired_decode_ratio_spread"] = summary(_pairs(
            W, M, lambda w: w["decode_tps"], lambda m: m["decode_tps"], lambda a, b: a / b))
        d["paired_ttft_overhead_host_spread"] = summary(_pairs(
            W, M, lambda w: w["host_ttft_s"], lambda m: m["ttft_s"], lambda a, b: a - b))
        d["paired_ttft_overhead_engine_spread"] = summary(_pairs(
            W, M, lambda w: w["ttft_s"], lambda m: m["ttft_s"], lambda a, b: a - b))
        # best-of-N: the least disturbed run of each side (robust to other people's load bursts)
        d["best_decode_ratio"] = d["worker_decode_tps"]["max"] / d["raw_decode_tps"]["max"]
        d["best_ttft_overhead_host_s"] = d["worker_host_ttft_s"]["min"] - d["raw_ttft_s"]["min"]
        d["best_ttft_overhead_engine_s"] = d["worker_ttft_s"]["min"] - d["raw_ttft_s"]["min"]
        details[key] = d
        label = LABELS[key]
        ratio, sp = d["paired_decode_ratio"], d["paired_decode_ratio_spread"]
        rows.append(row("overhead", label, f"decode tok/s, worker / raw matched ({mt} tokens)",
                        d["worker_decode_tps"]["median"], d["raw_decode_tps"]["median"],
                        f"{ratio:.3f}x", ">= 0.98x",
                        _status(ratio, lambda v: v >= 0.98, sp),
                        f"pairs IQR {sp['p25']:.2f}-{sp['p75']:.2f}x; best-of-{n} "
                        f"{d['best_decode_ratio']:.3f}x; host-side (token events) "
                        f"{d['paired_host_decode_ratio']:.3f}x" + ("" if same else "; token streams differ")))
        for metric, k, wk in (("TTFT overhead, host wall (send -> first token event)",
                               "ttft_overhead_host", "worker_host_ttft_s"),
                              ("TTFT overhead, engine (stats.ttft_s)",
                               "ttft_overhead_engine", "worker_ttft_s")):
            ms, sp = d[f"paired_{k}_s"] * 1000, d[f"paired_{k}_spread"]
            rows.append(row("overhead", label, f"{metric}, ms", d[wk]["median"] * 1000,
                            d["raw_ttft_s"]["median"] * 1000, f"{ms:+.2f} ms", "<= 5 ms",
                            _status(ms, lambda v: v <= 5, {**sp, "p25": sp["p25"] * 1000,
                                                           "p75": sp["p75"] * 1000}),
                            f"pairs IQR {sp['p25'] * 1000:+.1f} to {sp['p75'] * 1000:+.1f} ms; "
                            f"best-of-{n} {d[f'best_{k}_s'] * 1000:+.1f} ms"))
        if reused:
            rows[-1]["note"] = f"{len(reused)} worker runs reused the prompt cache!"
    return {"rows": rows, "details": details}


# ---------------------------------------------------------------- follow-up

def followup(s: Session, profile: dict) -> dict:
    rows, details = [], {}
    gen = 16
    for key, path in (("tiny", tiny_model_long(8192)), ("smollm2", smollm2_model())):
        reps, target = profile["followup"][key], profile["followup_tokens"]
        s.use("worker", path)
        s.use("matched", path)
        raw = s.raw("matched")
        prompt = raw.call("long_chat", doc=document(), question=LONG_QUESTION, target=target)["tokens"]
        turn = raw.call("next_turn", question=FOLLOWUP_QUESTION)["tokens"]
        log(f"followup/{key}: {len(prompt)}-token conversation, +{gen} generated, "
            f"+{len(turn)} new tokens; {reps} cold/follow-up pairs")
        short = prompt[:16]
        s.worker.generation.solo(short, 2, cache_key=fresh_key())  # warm-up (tiny prompt, no reuse later)
        pairs, raw_pairs = [], []
        raw_reps = profile["followup_raw"].get(key, 0)
        if raw_reps:
            raw.gen(short, 2)  # warm-up
        for i in range(reps):
            s.worker.cache_clear()
            cold = s.worker.generation.solo(prompt, gen)
            nxt = prompt + cold["tokens"] + turn
            time.sleep(PAUSE_S)
            fu = s.worker.generation.solo(nxt, gen)
            pairs.append({"cold": strip_tokens(cold), "followup": strip_tokens(fu)})
            time.sleep(PAUSE_S)
            if i < raw_reps:  # interleaved: raw mlx-lm, reusing its prompt cache by hand
                rc = raw.gen(prompt, gen, keep=True, prefill_step_size=PREFILL_STEP)
                rf = raw.gen(prompt + rc["tokens"] + turn, gen, reuse=True,
                             prefill_step_size=PREFILL_STEP)
                raw_pairs.append({"cold": strip_tokens(rc), "followup": strip_tokens(rf)})
                time.sleep(PAUSE_S)
        s.worker.cache_clear()
        cold_t = med(p["cold"]["ttft_s"] for p in pairs)
        fu_t = med(p["followup"]["ttft_s"] for p in pairs)
        cold_h = med(p["cold"]["host_ttft_s"] for p in pairs)
        fu_h = med(p["followup"]["host_ttft_s"] for p in pairs)
        d = {"prompt_tokens": len(prompt), "generated": gen, "new_tokens": len(turn),
             "followup_prompt_tokens": pairs[-1]["followup"]["prompt_tokens"],
             "followup_cached_tokens": pairs[-1]["followup"]["cached_tokens"],
             "cold_ttft_s": cold_t, "followup_ttft_s": fu_t, "ratio": cold_t / fu_t,
             "cold_host_ttft_s": cold_h, "followup_host_ttft_s": fu_h, "host_ratio": cold_h / fu_h,
             "pairs": pairs}
        if raw_pairs:
            rc_t = med(p["cold"]["ttft_s"] for p in raw_pairs)
            rf_t = med(p["followup"]["ttft_s"] for p in raw_pairs)
            d["raw"] = {"cold_ttft_s": rc_t, "followup_ttft_s": rf_t, "ratio": rc_t / rf_t,
                        "pairs": raw_pairs}
        details[key] = d
        label = LABELS[key]
        cached = d["followup_cached_tokens"]
        note = (f"{len(prompt)} prompt tokens cold; follow-up {d['followup_prompt_tokens']} tokens, "
                f"{cached} cached")
        if key == "tiny":
            note += "; fixture copy with max_position_embeddings 8192"
        rraw = d.get("raw")
        rows.append(row("followup", label, "TTFT cold / follow-up (engine stats.ttft_s), s",
                        f"{cold_t:.3f} / {fu_t:.4f}",
                        f"{rraw['cold_ttft_s']:.3f} / {rraw['followup_ttft_s']:.4f}" if rraw else None,
                        f"{d['ratio']:.1f}x", ">= 25x", "met" if d["ratio"] >= 25 else "missed", note))
        rows.append(row("followup", label, "TTFT cold / follow-up (host wall), s",
                        f"{cold_h:.3f} / {fu_h:.4f}", None, f"{d['host_ratio']:.1f}x", ">= 25x",
                        "met" if d["host_ratio"] >= 25 else "missed",
                        f"raw mlx-lm with a reused prompt cache: {rraw['ratio']:.1f}x" if rraw else ""))
    return {"rows": rows, "details": details}


# ---------------------------------------------------------------- BLAS

def blas(s: Session, profile: dict) -> dict:
    rows, details = [], {}
    for key, path in (("tiny", tiny_model()), ("smollm2", smollm2_model())):
        reps, mt = profile["blas"][key], MAX_TOKENS[key]
        with_matched = profile.get("blas_matched", True)
        sides = ["worker", "default"] + (["matched"] if with_matched else [])
        for side in sides:
            s.use(side, path)
        prompt = s.raw("matched" if with_matched else "default").call(
            "long_chat", doc=document(), question=LONG_QUESTION, target=512)["tokens"]
        log(f"blas/{key}: {len(prompt)}-token prompt, max_tokens {mt}, {reps} runs per side")
        warm = prompt[:16]
        s.worker.generation.solo(warm, 4, cache_key=fresh_key())
        for side in sides[1:]:
            s.raw(side).gen(warm, 4)
        runs = {side: [] for side in sides}
        for i in range(reps):
            order = sides if i % 2 == 0 else list(reversed(sides))
            for side in order:
                if side == "worker":
                    r = s.worker.generation.solo(prompt, mt, cache_key=fresh_key())
                else:
                    r = s.raw(side).gen(prompt, mt, prefill_step_size=PREFILL_STEP)
                    r["prompt_tps"] = r["prompt_tokens"] / r["ttft_s"]
                runs[side].append(strip_tokens(r))
                time.sleep(PAUSE_S)
        d = {"prompt_tokens": len(prompt), "max_tokens": mt, "runs": runs}
        for side in sides:
            d[f"{side}_prefill_tps"] = summary(r["prompt_tps"] for r in runs[side])
            d[f"{side}_decode_tps"] = summary(r["decode_tps"] for r in runs[side])
        pre = d["worker_prefill_tps"]["median"] / d["default_prefill_tps"]["median"]
        dec = d["worker_decode_tps"]["median"] / d["default_decode_tps"]["median"]
        d["prefill_ratio"], d["decode_ratio"] = pre, dec
        details[key] = d
        label = LABELS[key]
        extra = ""
        if with_matched:
            extra = (f"raw matched (OpenBLAS + fp32): prefill {d['matched_prefill_tps']['median']:.0f}, "
                     f"decode {d['matched_decode_tps']['median']:.1f} tok/s")
        rows.append(row("blas", label, f"prefill tok/s ({len(prompt)}-token prompt), worker / raw default",
                        d["worker_prefill_tps"]["median"], d["default_prefill_tps"]["median"],
                        f"{pre:.1f}x", ">= 8x", "met" if pre >= 8 else "missed", extra))
        rows.append(row("blas", label, f"decode tok/s ({mt} tokens), worker / raw default",
                        d["worker_decode_tps"]["median"], d["default_decode_tps"]["median"],
                        f"{dec:.2f}x", ">= 1.5x", "met" if dec >= 1.5 else "missed"))
    return {"rows": rows, "details": details}


# ---------------------------------------------------------------- in-process diagnostic

def inproc(s: Session, profile: dict) -> dict:
    """The worker's engine code (worker.generation.solo.run + its Writer thread) against generate_step,
    alternated in ONE process with the worker's BLAS environment: what is left of the overhead
    without IPC, the host, process-to-process variance or the worker's other threads."""
    rows, details = [], {}
    for key, path in (("tiny", tiny_model()), ("smollm2", smollm2_model())):
        n, mt = profile["overhead"][key], MAX_TOKENS[key]
        r = s.raw("inproc")
        if s._loaded.get("inproc") != str(path):
            r.call("load_kit", path=str(path))
            s._loaded["inproc"] = str(path)
        ids = r.call("encode", messages=[{"role": "user", "content": STORY_PROMPT}])["tokens"]
        log(f"inproc/{key}: {n} pairs")
        r.gen(ids, mt, prefill_step_size=PREFILL_STEP)
        r.call("gen_kit", tokens=ids, max_tokens=mt)
        K, G = [], []
        for i in range(n):
            for side in (("k", "g") if i % 2 == 0 else ("g", "k")):
                if side == "k":
                    K.append(r.call("gen_kit", tokens=ids, max_tokens=mt))
                else:
                    G.append(strip_tokens(r.gen(ids, mt, prefill_step_size=PREFILL_STEP)))
                time.sleep(PAUSE_S)
        d = {"runs": n, "max_tokens": mt, "run_decode_tps": summary(k["decode_tps"] for k in K),
             "step_decode_tps": summary(g["decode_tps"] for g in G),
             "run_ttft_s": summary(k["ttft_s"] for k in K), "step_ttft_s": summary(g["ttft_s"] for g in G),
             "paired_decode_ratio": _paired(K, G, lambda k: k["decode_tps"], lambda g: g["decode_tps"],
                                            lambda a, b: a / b),
             "paired_ttft_overhead_s": _paired(K, G, lambda k: k["ttft_s"], lambda g: g["ttft_s"],
                                               lambda a, b: a - b),
             "run_runs": K, "step_runs": G}
        details[key] = d
        label = LABELS[key]
        rows.append(row("inproc", label, "decode tok/s, worker.generation.solo.run / generate_step (same process)",
                        d["run_decode_tps"]["median"], d["step_decode_tps"]["median"],
                        f"{d['paired_decode_ratio']:.3f}x", "(diagnostic)", "info"))
        rows.append(row("inproc", label, "TTFT, worker.generation.solo.run - generate_step (same process), ms",
                        d["run_ttft_s"]["median"] * 1000, d["step_ttft_s"]["median"] * 1000,
                        f"{d['paired_ttft_overhead_s'] * 1000:+.2f} ms", "(diagnostic)", "info"))
    return {"rows": rows, "details": details}


SCENARIOS = {"overhead": overhead, "inproc": inproc, "followup": followup, "blas": blas}


def _register():
    from .scenarios2 import SCENARIOS2
    from .scenarios3 import SCENARIOS3

    SCENARIOS.update(SCENARIOS2)
    SCENARIOS.update(SCENARIOS3)


_register()

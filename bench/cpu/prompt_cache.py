"""The prompt cache: a long chat's follow-up against its cold start (``followup``), a quantized cache's size
(``kv_bits``) and an image conversation's follow-up (``image``)."""

from __future__ import annotations

import time

from ..common import document, log, med, smollm2_model, strip_tokens, tiny_model, tiny_model_long
from .session import (FOLLOWUP_QUESTION, LABELS, LONG_QUESTION, PAUSE_S, PREFILL_STEP, Session, fresh_key,
                      row)


# ---------------------------------------------------------------- follow-up

def followup(s: Session, profile: dict) -> dict:
    rows, details = [], {}
    gen = 16
    for key, path in (("tiny", tiny_model_long(8192)), ("smollm2", smollm2_model())):
        reps, target = profile["followup"][key], profile["followup_tokens"]
        s.use("worker", path, cache=True)
        s.use("matched", path)
        raw = s.raw("matched")
        prompt = raw.call("long_chat", doc=document(), question=LONG_QUESTION, target=target)["tokens"]
        turn = raw.call("next_turn", question=FOLLOWUP_QUESTION)["tokens"]
        log(f"followup/{key}: {len(prompt)}-token conversation, +{gen} generated, "
            f"+{len(turn)} new tokens; {reps} cold/follow-up pairs")
        short = prompt[:16]
        s.worker.generate(short, 2, cache_key=fresh_key())  # warm-up (tiny prompt, no reuse later)
        pairs, raw_pairs = [], []
        raw_reps = profile["followup_raw"].get(key, 0)
        if raw_reps:
            raw.gen(short, 2)  # warm-up
        for i in range(reps):
            s.worker.cache_clear()
            cold = s.worker.generate(prompt, gen)
            nxt = prompt + cold["tokens"] + turn
            time.sleep(PAUSE_S)
            fu = s.worker.generate(nxt, gen)
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


# ---------------------------------------------------------------- kv_bits

def kv_bits(s: Session, profile: dict) -> dict:
    path = smollm2_model()
    s.use("matched", path)
    target = profile["kv_bits"]["prompt_tokens"]
    prompt = s.raw("matched").call("long_chat", doc=document(), question=LONG_QUESTION, target=target)["tokens"]
    log(f"kv_bits: SmolLM2, {len(prompt)}-token prompt, kv_bits none/8/4")
    runs = {}
    for bits in (None, 8, 4):
        opts = {"prefill_step_size": PREFILL_STEP}
        if bits:
            opts["kv_bits"] = bits
        s.worker.load_model(path, **opts)
        s.forget("worker")
        s.worker.cache_clear()
        g = s.worker.generate(prompt, 16, cache_key=fresh_key())
        st = s.worker.status()["cache"]
        runs[bits or "none"] = {**strip_tokens(g), "tokens_out": g["tokens"], "cache": st}
        time.sleep(PAUSE_S)
    base = runs["none"]
    rows = []
    for bits in ("none", 8, 4):
        r = runs[bits]
        b = r["cache"]["bytes"]
        agree = sum(1 for _ in iter_prefix(r["tokens_out"], base["tokens_out"]))
        ratio = base["cache"]["bytes"] / b if b else None
        peak_ratio = base["peak_memory_bytes"] / r["peak_memory_bytes"] if r["peak_memory_bytes"] else None
        rows.append(row("kv_bits", LABELS["smollm2"],
                        f"prompt-cache entry MB (status cache.bytes), kv_bits {bits}, {len(prompt)}-token prompt",
                        b / 1e6, base["cache"]["bytes"] / 1e6 if bits != "none" else None,
                        f"{ratio:.2f}x smaller" if bits != "none" else "1.00x", "(report)", "info",
                        f"{r['cache']['tokens']} tokens cached; peak {r['peak_memory_bytes'] / 1e6:.0f} MB "
                        f"({peak_ratio:.2f}x vs none); generated {r['generated']} tokens, "
                        f"{agree}/{len(base['tokens_out'])} greedy tokens equal to kv_bits none's prefix; "
                        f"TTFT {r['ttft_s']:.1f} s, decode {r['decode_tps']:.1f} tok/s"))
    for r in runs.values():
        r.pop("tokens_out")
    s.worker.load_model(tiny_model(), prefill_step_size=PREFILL_STEP)
    return {"rows": rows, "details": {"prompt_tokens": len(prompt), "runs": {str(k): v for k, v in runs.items()}}}


def iter_prefix(a, b):
    for x, y in zip(a, b):
        if x != y:
            return
        yield x


# ---------------------------------------------------------------- image follow-up

def image(s: Session, profile: dict) -> dict:
    from .vision import measure

    rounds = profile["image"]["rounds"]
    log(f"image: vision.measure({rounds} rounds), its own worker process")
    d = measure(rounds=rounds, echo=lambda m: log(f"image: {m}"))
    ratio = d["ratio"]
    rows = [row("image", f"tiny Qwen2-VL fixture ({d['pixels']} px max)",
                "TTFT first question / follow-up turn on the same image, ms",
                f"{d['first_median_s'] * 1000:.1f} / {d['followup_median_s'] * 1000:.1f}", None,
                f"{ratio:.1f}x", ">= 10x", "met" if ratio >= 10 else "missed",
                f"first: {d['first_prompt_tokens']} prompt tokens (vision encode + prefill); follow-up: "
                f"{d['followup_cached_tokens']} of {d['followup_prompt_tokens']} cached; median of {rounds}")]
    return {"rows": rows, "details": d}

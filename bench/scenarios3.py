"""More scenarios: speculative decoding, quantized KV cache memory, image follow-up TTFT.

Same contract as bench/scenarios.py: each takes (Session, profile) and returns {"rows", "details"}.
"""

from __future__ import annotations

import sys
import time

from .common import (LABELS, PAUSE_S, PREFILL_STEP, ROOT, STORY_PROMPT, TMP, Session, document, log,
                     smollm2_model, strip_tokens, summary, tiny_model)
from .scenarios import LONG_QUESTION, fresh_key, row


def _draft_fixture():
    sys.path.insert(0, str(ROOT))
    from tests.support.fixtures import fixture_dir

    return fixture_dir("llama_draft", TMP / "fixtures")


# ---------------------------------------------------------------- speculative

def speculative(s: Session, profile: dict) -> dict:
    rows, details = [], {}
    plan = (("smollm2", smollm2_model(), None, 48), ("tiny", tiny_model(), _draft_fixture(), 64))
    for key, path, draft, mt in plan:
        n = profile["speculative"][key]
        draft = draft or path
        s.use("matched", path)
        ids = s.raw("matched").call("encode", messages=[{"role": "user", "content": STORY_PROMPT}])["tokens"]
        s.worker.load_model(path, prefill_step_size=PREFILL_STEP, draft_model_path=str(draft))
        s._loaded.pop("worker", None)
        log(f"speculative/{key}: draft {draft.name}, {n} pairs, {mt} tokens")
        on, off = {"speculative": True}, {"speculative": False}
        s.worker.generation.solo(ids, 8, cache_key=fresh_key(), params=on)  # warm-up both paths
        s.worker.generation.solo(ids, 8, cache_key=fresh_key(), params=off)
        S, P = [], []
        for i in range(n):
            for side in (("s", "p") if i % 2 == 0 else ("p", "s")):
                r = s.worker.generation.solo(ids, mt, cache_key=fresh_key(), params=on if side == "s" else off)
                (S if side == "s" else P).append(r)
                time.sleep(PAUSE_S)
        same = all(a["tokens"] == b["tokens"] for a, b in zip(S, P))
        acc = [r["draft_tokens_accepted"] / r["generated"] for r in S
               if r["draft_tokens_accepted"] is not None and r["generated"]]
        ratios = [a["decode_tps"] / b["decode_tps"] for a, b in zip(S, P)]
        d = {"draft": str(draft), "max_tokens": mt, "pairs": n, "same_tokens": same,
             "spec_decode_tps": summary(r["decode_tps"] for r in S),
             "plain_decode_tps": summary(r["decode_tps"] for r in P),
             "paired_speedup": summary(ratios), "acceptance": summary(acc),
             "speculative_field": S[0]["speculative"],
             "spec_runs": [strip_tokens(r) for r in S], "plain_runs": [strip_tokens(r) for r in P]}
        details[key] = d
        sp = d["paired_speedup"]["median"]
        why = ("self-draft: every drafted token costs a full forward of the same model, so at best "
               "(100% acceptance) the (n+1)-token verify pass must beat n+1 single steps; on a 2-core CPU "
               "it is compute-bound, not memory-bound, so it does not" if key == "smollm2" else
               "random-weight draft: it almost never agrees with the main model")
        rows.append(row("speculative", LABELS[key],
                        f"decode tok/s, speculative / plain (draft {'itself' if key == 'smollm2' else draft.name}, "
                        f"{mt} tokens)", d["spec_decode_tps"]["median"], d["plain_decode_tps"]["median"],
                        f"{sp:.2f}x", "(report)", "info",
                        f"accepted {d['acceptance'].get('median', 0) * 100:.0f}% of generated; greedy outputs "
                        f"{'identical' if same else 'DIFFER'}; {why}"))
    s.worker.load_model(tiny_model(), prefill_step_size=PREFILL_STEP)
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
        s._loaded.pop("worker", None)
        s.worker.cache_clear()
        g = s.worker.generation.solo(prompt, 16, cache_key=fresh_key())
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
    from .bench_vision import measure

    rounds = profile["image"]["rounds"]
    log(f"image: bench_vision.measure({rounds} rounds), its own worker process")
    d = measure(rounds=rounds, echo=lambda m: log(f"image: {m}"))
    ratio = d["ratio"]
    rows = [row("image", f"tiny Qwen2-VL fixture ({d['pixels']} px max)",
                "TTFT first question / follow-up turn on the same image, ms",
                f"{d['first_median_s'] * 1000:.1f} / {d['followup_median_s'] * 1000:.1f}", None,
                f"{ratio:.1f}x", ">= 10x", "met" if ratio >= 10 else "missed",
                f"first: {d['first_prompt_tokens']} prompt tokens (vision encode + prefill); follow-up: "
                f"{d['followup_cached_tokens']} of {d['followup_prompt_tokens']} cached; median of {rounds}")]
    return {"rows": rows, "details": d}


SCENARIOS3 = {"speculative": speculative, "kv_bits": kv_bits, "image": image}

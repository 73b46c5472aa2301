"""Speculative decoding through the worker (``speculative``): SmolLM2 drafting for itself and the tiny fixture
with its random draft, plain and speculative runs alternated on the same loaded model."""

from __future__ import annotations

import time

from ..common import draft_model, log, smollm2_model, strip_tokens, summary, tiny_model
from .session import COLD, LABELS, PAUSE_S, PREFILL_STEP, STORY_PROMPT, Session, fresh_key, row


# ---------------------------------------------------------------- speculative

def speculative(s: Session, profile: dict) -> dict:
    rows, details = [], {}
    plan = (("smollm2", smollm2_model(), None, 48), ("tiny", tiny_model(), draft_model(), 64))
    for key, path, draft, mt in plan:
        n = profile["speculative"][key]
        draft = draft or path
        s.use("matched", path)
        ids = s.raw("matched").call("encode", messages=[{"role": "user", "content": STORY_PROMPT}])["tokens"]
        s.worker.load_model(path, prefill_step_size=PREFILL_STEP, draft_model_path=str(draft), **COLD)
        s.forget("worker")
        log(f"speculative/{key}: draft {draft.name}, {n} pairs, {mt} tokens")
        on, off = {"speculative": True}, {"speculative": False}
        s.worker.generate(ids, 8, cache_key=fresh_key(), params=on)  # warm-up both paths
        s.worker.generate(ids, 8, cache_key=fresh_key(), params=off)
        S, P = [], []
        for i in range(n):
            for side in (("s", "p") if i % 2 == 0 else ("p", "s")):
                r = s.worker.generate(ids, mt, cache_key=fresh_key(), params=on if side == "s" else off)
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

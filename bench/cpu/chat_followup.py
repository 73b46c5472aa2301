"""python -m bench.cpu.chat_followup [--rounds N] [--context 1000]: a chat follow-up on SmolLM2, worker vs raw.

A ~1k-token chat (a document and a question), a 16-token answer, then a ~25-token follow-up question.
Three ways, interleaved in each round, all greedy, in the same run:
- raw mlx-lm (``bench.raw``, the worker's BLAS environment and dtype) with a hand-kept prompt cache: the
  follow-up feeds only the new tokens (the floor);
- the worker, the follow-up sent as ``tokens`` (prompt + answer ids + the next turn's ids);
- the worker, the follow-up sent as ``messages`` (the whole conversation re-sent, as chat apps do).
TTFT is the worker's ``stats.ttft_s`` (request start to first token) and raw's call to first token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tests.support.client import Worker

from ..common import document, smollm2_model
from ..raw import RawRunner, worker_blas_env

QUESTION = "Which event ends every request? Answer in one short sentence, please, and name the field."


def _chat(tokenizer, target: int) -> list:
    doc, chars = document(), 4 * target
    for _ in range(10):
        msgs = [{"role": "user", "content": doc[:chars] + "\n\nWhat is this document about?"}]
        n = len(tokenizer.encode(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                                 add_special_tokens=False))
        if abs(n - target) <= 8:
            break
        chars = int(chars * target / n)
    return msgs


def _stats(events) -> dict:
    assert events[-1]["type"] == "done", events[-1]
    return next(e for e in events if e["type"] == "stats")


def measure(rounds: int = 5, context: int = 1000, echo=print) -> dict:
    from transformers import AutoTokenizer

    path = smollm2_model()
    tok = AutoTokenizer.from_pretrained(str(path))
    first_msgs = _chat(tok, context)
    w = Worker()
    try:
        w.load(path)
        raw = RawRunner("matched", worker_blas_env(w.proc.pid))
        try:
            raw.load(path)
            nxt = raw.call("next_turn", question=QUESTION)["tokens"]
            rows = []
            for r in range(rounds + 1):  # round 0 warms both up
                msgs = [{"role": "user", "content": first_msgs[0]["content"] + f" (round {r})"}]
                ids = raw.call("encode", messages=msgs)["tokens"]
                # raw: first turn kept, follow-up reuses the hand-kept cache
                a = raw.gen(ids, 16, keep=True, stop_at_eos=False)
                b = raw.gen(ids + a["tokens"] + nxt, 1, reuse=True)
                # worker, tokens
                e1 = w.request({"type": "generate", "id": f"t1-{r}", "prompt": {"tokens": ids},
                                "params": {"max_tokens": 16}, "cache_key": f"tok-{r}"})
                gen = [t for e in e1 if e["type"] == "token" for t in e["tokens"]]
                st_t = _stats(w.request({"type": "generate", "id": f"t2-{r}",
                                         "prompt": {"tokens": ids + gen + nxt}, "params": {"max_tokens": 1},
                                         "cache_key": f"tok-{r}"}))
                # worker, messages (another conversation: nothing shared with the one above)
                msgs = [{"role": "user", "content": first_msgs[0]["content"] + f" (round {r}, as messages)"}]
                e1 = w.request({"type": "generate", "id": f"m1-{r}", "prompt": {"messages": msgs},
                                "params": {"max_tokens": 16}, "cache_key": f"msg-{r}"})
                answer = "".join(e["text"] for e in e1 if e["type"] == "token")
                follow = msgs + [{"role": "assistant", "content": answer}, {"role": "user", "content": QUESTION}]
                st_m = _stats(w.request({"type": "generate", "id": f"m2-{r}", "prompt": {"messages": follow},
                                         "params": {"max_tokens": 1}, "cache_key": f"msg-{r}"}))
                row = {"raw_s": b["ttft_s"], "raw_new": b["prompt_tokens"] - b["cached_tokens"],
                       "tokens_s": st_t["ttft_s"], "tokens_new": st_t["prompt_tokens"] - st_t["cached_tokens"],
                       "messages_s": st_m["ttft_s"],
                       "messages_new": st_m["prompt_tokens"] - st_m["cached_tokens"],
                       "prompt_tokens": st_t["prompt_tokens"]}
                if r:
                    rows.append(row)
                echo(("warm-up: " if not r else f"round {r}: ") + json.dumps(row))
        finally:
            raw.close()
    finally:
        w.close()
    med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    return {"model": path.name, "context": context, "rounds": rounds, "rows": rows, "median": med,
            "tokens_vs_raw": med["tokens_s"] / med["raw_s"], "messages_vs_raw": med["messages_s"] / med["raw_s"],
            "date": time.strftime("%Y-%m-%d")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--context", type=int, default=1000)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    d = measure(a.rounds, a.context)
    if a.out:
        Path(a.out).write_text(json.dumps(d, indent=2) + "\n")
    m = d["median"]
    print(f"follow-up TTFT (median of {a.rounds}): raw {m['raw_s'] * 1000:.1f} ms, worker tokens "
          f"{m['tokens_s'] * 1000:.1f} ms ({d['tokens_vs_raw']:.2f}x), worker messages "
          f"{m['messages_s'] * 1000:.1f} ms ({d['messages_vs_raw']:.2f}x); {m['prompt_tokens']:.0f}-token prompt")


if __name__ == "__main__":
    main()

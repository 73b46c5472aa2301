"""Several chats at once: 4 conversations sharing a system prompt, turns interleaved A B C D A B C D …,
sent as `messages` the way chat apps send them. Reports, per turn, the tokens reused from the prompt
cache and the TTFT, with and without `cache_key`.

    python -m bench.cpu.chats [--model DIR] [--turns 3] [--worker-cmd CMD]   (default model: SmolLM2)

``--worker-cmd`` runs another worker (e.g. an older checkout) for a side-by-side comparison.
"""

import argparse
import json
import os
import shlex
import statistics
import sys

from ..common import TimedWorker, smollm2_model

SYSTEM = ("You are a careful assistant for a small bakery. " +
          "Answer briefly, name the ingredient, the amount in grams and the oven temperature when relevant. "
          * 14).strip()
QUESTIONS = {
    "A": ["How do I make a sourdough starter?", "How often should I feed it?", "Can I keep it in the fridge?"],
    "B": ["What flour is best for croissants?", "How cold should the butter be?", "How many folds?"],
    "C": ["How long do I proof brioche?", "At what temperature?", "Can I freeze the dough?"],
    "D": ["Why did my macarons crack?", "Should I rest them longer?", "What oven setting is best?"],
}


def run(model, turns, keyed, cmd=None):
    w = TimedWorker(cmd=cmd, validate=False)
    try:
        w.load_model(model)
        chats = {c: [{"role": "system", "content": SYSTEM}] for c in QUESTIONS}
        rows = []
        for turn in range(turns):
            for c, questions in QUESTIONS.items():
                chats[c].append({"role": "user", "content": questions[turn % len(questions)]})
                rid = f"{c}{turn}{'k' if keyed else ''}"
                req = {"type": "generate", "id": rid, "prompt": {"messages": chats[c]},
                       "params": {"max_tokens": 16}}
                if keyed:
                    req["cache_key"] = c
                evs = w.request(req, timeout=900)
                stats = next(e for e in evs if e["type"] == "stats")
                chats[c].append({"role": "assistant", "content": evs[-1]["text"]})
                rows.append({"chat": c, "turn": turn, "prompt": stats["prompt_tokens"],
                             "cached": stats["cached_tokens"], "ttft_s": stats["ttft_s"],
                             "reason": stats.get("cache_miss_reason")})
        return rows
    finally:
        w.close()


def summary(rows):
    first = [r for r in rows if r["turn"] == 0][1:]  # chats B, C, D: the system prompt is shared
    follow = [r for r in rows if r["turn"] > 0]
    return {
        "new_chat_reuse": statistics.median(r["cached"] / r["prompt"] for r in first),
        "followup_reuse_min": min(r["cached"] / r["prompt"] for r in follow),
        "followup_ttft_median_s": statistics.median(r["ttft_s"] for r in follow),
        "new_chat_ttft_median_s": statistics.median(r["ttft_s"] for r in first),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--worker-cmd")
    args = ap.parse_args(argv)
    model = args.model or smollm2_model()
    cmd = shlex.split(args.worker_cmd) if args.worker_cmd else None
    out = {}
    for keyed in (False, True):
        rows = run(model, args.turns, keyed, cmd)
        name = "cache_key" if keyed else "no_key"
        out[name] = {"summary": summary(rows), "rows": rows}
        print(f"[chats] {name}: {json.dumps(out[name]['summary'])}", file=sys.stderr)
        for r in rows:
            print(f"  {r['chat']}{r['turn']}: {r['cached']:4d}/{r['prompt']:4d} cached, ttft {r['ttft_s']:.3f} s"
                  f"{'  ' + r['reason'] if r['reason'] else ''}", file=sys.stderr)
    json.dump(out, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())

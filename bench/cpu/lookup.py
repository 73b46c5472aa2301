"""python -m bench.cpu.lookup [--rounds N] [--max-tokens N]: prompt lookup (draft-free speculation) on SmolLM2.

Two tasks, greedy: a code edit (SmolLM2 re-emits a 20-line function with one variable renamed: its answer repeats its
prompt) and an ordinary chat (a story: little repeats). One stream at a time, in two workers:
- ``max_concurrent: 1``: ``prompt_lookup: false`` (mlx-lm's generate_step, the solo path) against ``true`` (the
  batch's decode step for one, verifying 8 proposals a step) and against ``null`` (auto: off alone since
  2026-12-05, so this pair now measures generate_step twice), alternated in each round;
- ``max_concurrent: 2``: ``prompt_lookup: null`` (auto, the default there) against ``false``.
Reported per task and pair: decode tok/s (``stats.generation_tps``), the paired ratio, the accepted share of the
proposals and whether the tokens are identical. Results: bench/results/lookup_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tests.support.client import Worker

from ..common import smollm2_model

CODE = '''def process(items, limit=10):
    """Collect the first `limit` valid items, normalised."""
    out = []
    for item in items:
        if item is None:
            continue
        name = item.get("name", "").strip().lower()
        if not name:
            continue
        value = item.get("value", 0)
        if value < 0:
            value = 0
        out.append({"name": name, "value": value})
        if len(out) >= limit:
            break
    return out


def total(items):
    return sum(item["value"] for item in process(items))
'''
TASKS = {
    "code_edit": "Here is some code:\n\n" + CODE + "\nRewrite it with the variable `out` renamed to `result`. "
                 "Output only the code.",
    "chat": "Tell me a short story about a dragon who learns to cook.",
}


def _run(w: Worker, rid: str, task: str, mt: int, lookup) -> dict:
    evs = w.request({"type": "generate", "id": rid, "prompt": {"messages": [{"role": "user", "content": TASKS[task]}]},
                     "params": {"max_tokens": mt, "prompt_lookup": lookup}})
    assert evs[-1]["type"] == "done", evs[-1]
    st = next(e for e in evs if e["type"] == "stats")
    return {"tokens": [t for e in evs if e["type"] == "token" for t in e["tokens"]], "tps": st["generation_tps"],
            "accepted": st.get("draft_tokens_accepted"), "proposed": st.get("draft_tokens_proposed")}


def measure(rounds: int = 3, max_tokens: int = 200, workers=(1, 2), echo=print) -> dict:
    path, out = smollm2_model(), {}
    for conc, pairs in ((1, ((True, False), (None, False))), (2, ((None, False),))):
        if conc not in workers:
            continue
        w = Worker()
        try:
            w.load(path, max_concurrent=conc)
            for (a, b), task in ((pair, task) for pair in pairs for task in TASKS):
                _run(w, "warm", task, 8, a), _run(w, "warm", task, 8, b)
                runs = {a: [], b: []}
                for r in range(rounds):
                    for mode in ((a, b) if r % 2 == 0 else (b, a)):
                        runs[mode].append(_run(w, f"{task}-{r}-{mode}", task, max_tokens, mode))
                ratios = [x["tps"] / y["tps"] for x, y in zip(runs[a], runs[b])]
                acc = [x["accepted"] / x["proposed"] for x in runs[a] if x["proposed"]]
                row = {"max_concurrent": conc, "task": task, "on": a, "off": b,
                       "on_tps": statistics.median(x["tps"] for x in runs[a]),
                       "off_tps": statistics.median(x["tps"] for x in runs[b]),
                       "ratio_median": statistics.median(ratios), "ratios": ratios,
                       "acceptance": statistics.median(acc) if acc else None,
                       "generated": len(runs[a][0]["tokens"]),
                       "same_tokens": all(x["tokens"] == y["tokens"] for x, y in zip(runs[a], runs[b]))}
                out[f"{conc}-{'auto' if a is None else a}-{task}"] = row
                echo(f"max_concurrent {conc} {task}: prompt_lookup {a} {row['on_tps']:.1f} tok/s vs {b} "
                     f"{row['off_tps']:.1f} -> {row['ratio_median']:.2f}x (acceptance {row['acceptance']}, "
                     f"{row['generated']} tokens, same tokens {row['same_tokens']})")
        finally:
            w.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="max_concurrent of each worker")
    args = ap.parse_args()
    res = measure(args.rounds, args.max_tokens, args.workers)
    dst = Path(__file__).resolve().parents[1] / "results" / "lookup_cpu.json"
    old = json.loads(dst.read_text()) if dst.exists() else {}
    dst.write_text(json.dumps({**old, **res}, indent=1))
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()

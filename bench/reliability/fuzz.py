"""python -m bench.reliability.fuzz [--inputs N] [--process-lines N] [--seed S]: the 100k-scale fuzz run.

In process: N generated lines (tests/process/test_fuzz.py generators: random bytes, printable noise,
truncated JSON, deep nesting, huge numbers, wrong types in every field, unicode edge cases in values
and keys, structural mutations, valid requests) through ``decode_request``, checking the property
(a request, or WorkerError with a code in CODES, and everything echoed is encodable). Through the
process: a second batch of lines piped into one worker with a status probe every 100 lines (every
line answered exactly once, stream parseable, worker alive). Writes the figures into
bench/reliability/RESULTS.md (the block between the fuzz markers).
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import random
import time
from pathlib import Path

from tests.process.test_fuzz import BUG_CLASSES, classify, expected_outcomes, gen_line, run_through_worker

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def in_process(n, seed):
    rng = random.Random(seed)
    cats, outcomes, bugs = collections.Counter(), collections.Counter(), collections.Counter()
    bug_examples = {}
    t = time.perf_counter()
    for _ in range(n):
        cat, line = gen_line(rng)
        cats[cat] += 1
        out = classify(line, known_bugs=True)  # anything else unexpected raises here: a crash
        if out[0] == "bug":
            bugs[out[1]] += 1
            bug_examples.setdefault(out[1], line[:80])
        outcomes[out[0] if out[0] != "error" else f"error:{out[1]}"] += 1
    dt = time.perf_counter() - t
    return {"inputs": n, "seed": seed, "seconds": round(dt, 2), "inputs_per_s": round(n / dt),
            "by_category": dict(sorted(cats.items())), "outcomes": dict(sorted(outcomes.items())),
            "property_violations": dict(bugs),
            "violation_examples": {k: ascii(v) for k, v in bug_examples.items()}}


def through_process(n, seed):
    rng = random.Random(seed)
    lines = [gen_line(rng)[1] for _ in range(n)]
    kept, dropped = expected_outcomes(lines, known_bugs=True)
    figures = run_through_worker(kept, probe_every=100, timeout=1800)
    figures["generated"] = n
    figures["left_out"] = dict(dropped)
    return figures


def write(section, body):
    text = RESULTS.read_text() if RESULTS.exists() else "# Reliability results\n"
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=120_000)
    ap.add_argument("--process-lines", type=int, default=112_000)
    ap.add_argument("--seed", type=int, default=2024)
    a = ap.parse_args()
    inp = in_process(a.inputs, a.seed)
    print(json.dumps(inp, indent=1), flush=True)
    proc = through_process(a.process_lines, a.seed + 1)
    print(json.dumps(proc, indent=1), flush=True)
    bugs = "".join(f"- `{k}`: {inp['property_violations'].get(k, 0)} inputs — {v}\n"
                   for k, v in BUG_CLASSES.items())
    body = f"""## Fuzzing (`python -m bench.reliability.fuzz`, {time.strftime('%Y-%m-%d')}, {platform.machine()}, {platform.python_version()})

**In process** (`decode_request`): {inp['inputs']:,} generated inputs in {inp['seconds']} s
({inp['inputs_per_s']:,}/s), seed {inp['seed']}. Unexpected exceptions outside the known bug classes: **0**.
Inputs that violate the property, all in the three known worker bugs (see RELIABILITY.md, *Open bugs*):

{bugs}
Outcomes: `{json.dumps(inp['outcomes'])}`

By category: `{json.dumps(inp['by_category'])}`

**Through the process** (one worker, no model loaded, a `status` probe every 100 lines):
{proc['generated']:,} generated lines, {proc['lines']:,} sent ({json.dumps(proc['left_out'])} left out: the known
bugs would kill or mute the worker, a valid `shutdown` would end it), plus {proc['probes']:,} probes.
{proc['terminals']:,} terminal events = lines + probes + 1 final status: **every line answered exactly once**;
{proc['null_id_errors']:,} `id: null` errors = exactly the lines whose id was unreadable; {proc['events']:,} stdout
lines, all JSON, `seq` consecutive; the worker answered a status afterwards and exited 0 on EOF.
{proc['seconds']} s ({proc['lines_per_s']:,} lines/s). Error codes: `{json.dumps(proc['codes'])}`
"""
    write("fuzz", body)


if __name__ == "__main__":
    main()

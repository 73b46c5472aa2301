"""python -m bench.reliability.soak [--ops N] [--warmup N] [--seed S]: the full soak run (1,000 requests by default).

One worker and the tiny llama fixture; the mix and the checks are tests/process/test_soak.py's (every id
exactly one terminal event, nothing after it, `id: null` errors exactly for unreadable ids, seq
consecutive, alive at the end, RSS after the run within 10% of RSS after the warm-up). Writes the
figures into bench/reliability/RESULTS.md (the block between the soak markers).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from .fuzz import write
from tests.support.fixtures import fixture_dir
from tests.process.test_soak import run_soak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--seed", type=int, default=11)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = fixture_dir("llama", Path(tmp))
        f = run_soak(model, n_ops=a.ops, warmup_ops=a.warmup, seed=a.seed)
    print(json.dumps(f, indent=1))
    ok = abs(f["rss_change_pct"]) <= 10
    outcomes = "\n".join(f"| {k} | {v} |" for k, v in f["outcomes"].items())
    body = f"""## Soak (`python -m bench.reliability.soak`, {time.strftime('%Y-%m-%d')}, {platform.machine()}, {platform.python_version()})

One worker, tiny llama fixture, seed {f['seed']}: a warm-up of {f['warmup_ops']} operations, then {f['ops']} operations
of the same mix ({f['main_phase_requests']:,} requests in the main phase, counting the drain's cancels and
undecodable lines; {f['requests']:,} in all). Warm-up {f['warmup_s']} s, main phase {f['main_s']} s; {f['events']:,} events.

- every request id got exactly one terminal event, nothing after it: **yes** ({f['request_ids']:,} ids);
  `id: null` errors: {f['null_id_errors']} = the undecodable lines whose id was unreadable
- RSS after warm-up {f['rss_after_warmup_kb'] / 1024:.1f} MiB, after the run {f['rss_after_run_kb'] / 1024:.1f} MiB:
  **{f['rss_change_pct']:+.2f}%** ({'within' if ok else 'OUTSIDE'} the 10% bound); largest sample {f['rss_max_sampled_kb'] / 1024:.1f} MiB
- sent: `{json.dumps(f['sent'])}`

| request -> terminal | count |
|---|---|
{outcomes}
"""
    write("soak", body)
    if not ok:
        raise SystemExit("RSS grew more than 10%")


if __name__ == "__main__":
    main()

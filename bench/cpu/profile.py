"""python -m bench [--quick] [--only NAME ...]: run the scenarios, write bench/results/latest.{json,md}."""

from __future__ import annotations

import argparse
import os
import time
import traceback
from pathlib import Path

from ..common import loadavg, log
from . import report
from .cancel import cancel
from .events import protocol
from .prompt_cache import followup, image, kv_bits
from .session import Session
from .speculative import speculative
from .vs_raw import blas, inproc, overhead, startup

# in the order they run and appear in the table
SCENARIOS = {"overhead": overhead, "inproc": inproc, "followup": followup, "blas": blas, "cancel": cancel,
             "protocol": protocol, "startup": startup, "speculative": speculative, "kv_bits": kv_bits,
             "image": image}

PROFILES = {
    # ~5-6 minutes on a 2-core CPU
    "quick": {
        "overhead": {"tiny": 20, "smollm2": 8},
        "followup": {"tiny": 2, "smollm2": 1},
        "followup_raw": {"tiny": 1, "smollm2": 0},  # raw SmolLM2 4k cold: +50 s
        "followup_tokens": 4000,
        "blas": {"tiny": 5, "smollm2": 2},
        "blas_matched": True,
        **{"cancel": {"decode": {"tiny": 30, "smollm2": 10}, "prefill_tokens": {"tiny": 4000, "smollm2": 2100},
                      "prefill": {"tiny": {2048: 10, 512: 10}, "smollm2": {2048: 2, 512: 4}},
                      "prefill_delay_s": {"tiny": {2048: 0.4, 512: 0.4}, "smollm2": {2048: 4.0, 512: 3.0}}},
           "protocol": {"events": 20000, "reps": 5, "e2e_tokens": 1000, "e2e_reps": 3},
           "startup": {"spawns": 3, "loads": 3},
           "speculative": {"tiny": 3, "smollm2": 2},
           "kv_bits": {"prompt_tokens": 2000},
           "image": {"rounds": 2}},
    },
    "full": {
        "overhead": {"tiny": 40, "smollm2": 15},
        "followup": {"tiny": 4, "smollm2": 2},
        "followup_raw": {"tiny": 3, "smollm2": 1},
        "followup_tokens": 4000,
        "blas": {"tiny": 7, "smollm2": 3},
        "blas_matched": True,
        "cancel": {"decode": {"tiny": 60, "smollm2": 20}, "prefill_tokens": {"tiny": 4000, "smollm2": 2100},
                   "prefill": {"tiny": {2048: 20, 512: 20}, "smollm2": {2048: 4, 512: 8}},
                   "prefill_delay_s": {"tiny": {2048: 0.4, 512: 0.4}, "smollm2": {2048: 4.0, 512: 3.0}}},
        "protocol": {"events": 50000, "reps": 7, "e2e_tokens": 1000, "e2e_reps": 5},
        "startup": {"spawns": 5, "loads": 5},
        "speculative": {"tiny": 5, "smollm2": 3},
        "kv_bits": {"prompt_tokens": 2000},
        "image": {"rounds": 3},
    },
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (about 5-6 minutes)")
    ap.add_argument("--only", action="append", choices=sorted(SCENARIOS), metavar="NAME",
                    help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}")
    ap.add_argument("--out", type=Path, default=report.RESULTS,
                    help="where latest.json / latest.md go (default: bench/results)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    profile_name = "quick" if args.quick else "full"
    profile = PROFILES[profile_name]
    names = args.only or list(SCENARIOS)
    t0 = time.time()
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "profile": profile_name,
            "scenarios": names, "cpu": report.cpu_name(), "cpus": os.cpu_count(),
            "loadavg_start": loadavg()}
    results, failed = {}, []
    with Session() as s:
        ready = s.worker.ready
        meta.update(device=ready["device"], versions=ready["versions"], worker_pid=ready["pid"])
        for name in names:
            log(f"scenario {name} ({profile_name})")
            t = time.time()
            try:
                results[name] = SCENARIOS[name](s, profile)
            except Exception as exc:  # noqa: BLE001 - keep the other scenarios' figures
                traceback.print_exc()
                failed.append(name)
                results[name] = {"rows": [{"scenario": name, "model": "", "metric": "FAILED",
                                           "worker": None, "raw": None, "result": None, "goal": "",
                                           "status": "missed", "note": f"{type(exc).__name__}: {exc}"}],
                                 "details": {"error": repr(exc)}}
            log(f"scenario {name} took {time.time() - t:.0f} s")
        meta["raw_blas"] = s.raw_blas()
        meta["raw_blas_env"] = s.worker.blas_env()
    meta["elapsed_s"] = time.time() - t0
    meta["loadavg_end"] = loadavg()
    md = report.write(meta, results, args.out)
    print(md)
    return 1 if failed else 0

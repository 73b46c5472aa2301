"""One worker over 1 and 2 ranks on this machine (``python -m worker --ranks 2``, ring backend, tensor parallel):
decode tok/s, TTFT of a ~512-token prompt, and each rank's model memory (``weights_bytes`` from ``load``, the
process's VmRSS after it). With ``--ranks N`` the worker gives each rank CPUs / N OpenBLAS threads
(``worker/boot/blas_find.py``); two more configurations show why: 2 ranks with ``OPENBLAS_NUM_THREADS=2`` (every
CPU each: 4 BLAS threads on 2 cores, the worker's first default) and 1 rank with ``OPENBLAS_NUM_THREADS=1`` (to tell
the ranks' gain from the thread count's).

Only one worker runs at a time (idle ranks still take some CPU: they would slow the one measured); each
round starts a fresh worker of each configuration in turn (the order rotates), loads each model, warms it up and
times one generation (the prompt's TTFT and then the decode rate); medians over the rounds.

    python -m bench.cpu.distributed [--rounds N] [--out FILE] [--show]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

from ..common import RESULTS, TMP, TimedWorker, loadavg, log, med, next_id, smollm2_model, strip_tokens, summary

ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1"}
CONFIGS = {  # name: (worker flags, extra environment)
    "1 rank": ([], {}),
    "2 ranks": (["--ranks", "2"], {}),  # each rank gets CPUs / 2 BLAS threads (worker/boot/blas_find.py)
    "2 ranks, OPENBLAS_NUM_THREADS=2": (["--ranks", "2"], {"OPENBLAS_NUM_THREADS": "2"}),  # every CPU each
    "1 rank, OPENBLAS_NUM_THREADS=1": ([], ONE_THREAD),  # is a gain the ranks' or the one thread's?
}
PROMPT_TOKENS = 512
MAX_TOKENS = 128
PAUSE_S = 0.5  # between runs: OpenBLAS's spinning threads go to sleep
# Random llamas of about SmolLM2's size (fp32, the fixture's 512-id vocabulary): 8 wide layers (~95M parameters,
# 16 all-sums a token) and SmolLM2's own 30 narrow layers with heads that divide by 2 (~105M, 60 all-sums).
WIDE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
            num_key_value_heads=8, head_dim=64)
NARROW = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=8,
              num_key_value_heads=2, head_dim=72)


def random_llama(shape: dict) -> Path:
    """A random llama of ``shape`` with the llama fixture's tokenizer, float32, built once."""
    from tests.support.fixtures import MODEL_SPECS, _build, build_once

    spec = dict(MODEL_SPECS["llama"], **shape)
    name = "llama-h{hidden_size}-l{num_hidden_layers}-a{num_attention_heads}-seed0".format(**shape)
    return build_once(TMP / "fixtures" / name, lambda tmp: _build("llama", tmp, 0, spec))


def models() -> dict:
    return {"SmolLM2-135M-Instruct": smollm2_model(),
            "random llama, 1024 wide x 8 layers (fp32)": random_llama(WIDE),
            "random llama, SmolLM2's 576 x 30 layers, 8/2 heads (fp32)": random_llama(NARROW)}


# ---------------------------------------------------------------- one worker

def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def blas_threads(pid: int) -> str | None:
    """OPENBLAS_NUM_THREADS in the process's environment (the one it was last exec'd with)."""
    try:
        for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if e.startswith(b"OPENBLAS_NUM_THREADS="):
                return e.split(b"=", 1)[1].decode()
    except OSError:
        return None
    return None


def cpu_name() -> str:
    names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
             if ln.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    return f"{names[0] if names else platform.machine()} ({os.cpu_count()} CPUs)"


def prompt_ids(vocab: int, seed: int) -> list:
    rng = random.Random(seed)
    return [rng.randrange(10, vocab - 10) for _ in range(PROMPT_TOKENS)]


class Refused(Exception):
    """The worker answered a load with an error (a model these ranks cannot split)."""


def load(w: TimedWorker, path: Path) -> tuple:
    """Unload, then load ``path`` (no prompt cache); the model info and each rank's weights and memory."""
    w.request({"type": "unload", "id": next_id("unload")})  # the previous model's memory goes first
    time.sleep(PAUSE_S)
    pids = [r["pid"] for r in w.ready["ranks"]["ranks"]] if w.ready.get("ranks") else [w.ready["pid"]]
    before = [rss_bytes(pid) for pid in pids]
    req = {"type": "load", "id": next_id("load"), "model_path": str(path), "options": {"cache_max_entries": 0}}
    end = w.request(req, timeout=300)[-1]
    if end["type"] != "done":
        raise Refused(f"{end.get('code')}: {end.get('message')}")
    info = end["model"]
    if info.get("ranks"):
        ranks = [{"rank": r["rank"], "pid": r["pid"], "weights_bytes": r.get("weights_bytes")}
                 for r in info["ranks"]["ranks"]]
    else:  # one rank: no ranks field; its weights are the parameters in the compute dtype
        size = {"float32": 4, "float16": 2, "bfloat16": 2}.get(info["compute_dtype"])
        ranks = [{"rank": 0, "pid": w.ready["pid"], "weights_bytes": info["parameters"] * size if size else None,
                  "weights_bytes_from": "parameters x dtype size"}]
    for r, b in zip(ranks, before):
        r.update(rss_before_load_bytes=b, rss_bytes=rss_bytes(r["pid"]), openblas_num_threads=blas_threads(r["pid"]))
    return info, ranks


def measure(w: TimedWorker, path: Path, seed: int) -> dict:
    """Load ``path``, warm it up, time one generation of a ``PROMPT_TOKENS`` prompt (EOS banned)."""
    info, ranks = load(w, path)
    params = {"logit_bias": {str(t): -100.0 for t in info["eos_token_ids"]}}  # always MAX_TOKENS
    w.generate(prompt_ids(info["vocab_size"], 999)[:32], 4, params=params)  # warm-up
    time.sleep(PAUSE_S)
    run = w.generate(prompt_ids(info["vocab_size"], seed), MAX_TOKENS, params=params)
    return {"parallel": (info.get("ranks") or {}).get("parallel"), "parameters": info["parameters"],
            "compute_dtype": info["compute_dtype"], "prefill_step_size": info["prefill_step_size"],
            "ranks": ranks, "run": strip_tokens(run), "tokens": run["tokens"]}


def one_worker(config: str, paths: dict, seed: int, skip: set) -> dict:
    flags, env = CONFIGS[config]
    t0 = time.perf_counter()
    w = TimedWorker(flags, env=env)
    out = {"spawn_s": time.perf_counter() - t0, "blas": w.ready["device"].get("blas"),
           "versions": w.ready["versions"]}
    try:
        for name, path in paths.items():
            if name in skip:
                continue
            try:
                out[name] = measure(w, path, seed)
            except Refused as e:  # a model 2 ranks cannot load: recorded, then skipped by every configuration
                out[name] = {"error": str(e)}
                skip.add(name)
            time.sleep(PAUSE_S)
    finally:
        w.proc.stdin.close()
        w.proc.wait(30)
    return out


# ---------------------------------------------------------------- the run

def run(rounds: int) -> dict:
    paths = models()
    names = list(CONFIGS)
    skip, rounds_out = set(), []
    t0 = time.perf_counter()
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        rnd = {}
        for config in order:
            log(f"round {i + 1}/{rounds}: {config}", "distributed")
            rnd[config] = one_worker(config, paths, seed=i, skip=skip)
            time.sleep(PAUSE_S)
        rounds_out.append({"order": order, "results": rnd, "loadavg_end": loadavg()})
    return {"models": {k: str(v) for k, v in paths.items()}, "rounds": rounds_out,
            "elapsed_s": time.perf_counter() - t0, "summary": summarize(rounds_out, paths)}


def config_summary(ok: list) -> dict:
    """Medians (and spread) over one configuration's successful runs of one model."""
    n = len(ok[0]["ranks"])
    return {"decode_tps": summary(g["run"]["decode_tps"] for g in ok),
            "ttft_s": summary(g["run"]["ttft_s"] for g in ok),
            "prompt_tokens": ok[0]["run"]["prompt_tokens"], "generated": ok[0]["run"]["generated"],
            "parallel": ok[0]["parallel"], "weights_bytes": [r["weights_bytes"] for r in ok[0]["ranks"]],
            "rss_bytes": [med(g["ranks"][k]["rss_bytes"] for g in ok) for k in range(n)],
            "rss_growth_bytes": [med(g["ranks"][k]["rss_bytes"] - g["ranks"][k]["rss_before_load_bytes"]
                                     for g in ok) for k in range(n)],
            "openblas_num_threads": [r["openblas_num_threads"] for r in ok[0]["ranks"]]}


def summarize(rounds: list, paths: dict) -> dict:
    """Per model and configuration: medians, and the paired ratios against 1 rank of the same round."""
    out = {}
    for name in paths:
        base = [r["results"]["1 rank"].get(name) or {} for r in rounds]
        for config in CONFIGS:
            got = [r["results"][config].get(name) or {} for r in rounds]
            ok = [g for g in got if "run" in g]
            errors = [g["error"] for g in got if "error" in g]
            s = {"runs": len(ok), "error": errors[0] if errors else None}
            if ok:
                s.update(config_summary(ok))
            pairs = [(a, b) for a, b in zip(base, got) if "run" in a and "run" in b]
            if pairs and config != "1 rank":
                s["decode_vs_1_rank"] = summary(b["run"]["decode_tps"] / a["run"]["decode_tps"] for a, b in pairs)
                s["ttft_vs_1_rank"] = summary(b["run"]["ttft_s"] / a["run"]["ttft_s"] for a, b in pairs)
                s["same_tokens_as_1_rank"] = all(a["tokens"] == b["tokens"] for a, b in pairs)
            out.setdefault(name, {})[config] = s
    return out


def table(result: dict) -> str:
    lines = ["| model | configuration | decode tok/s | x 1 rank | TTFT (512 tokens), s | x 1 rank | "
             "weights per rank, MB | RSS per rank after load (growth), MB | tokens = 1 rank's |",
             "|---|---|---|---|---|---|---|---|---|"]
    mb = lambda xs: " / ".join(f"{x / 1e6:.0f}" if x is not None else "?" for x in xs)  # noqa: E731
    ratio = lambda s, k: f"{s[k]['median']:.2f}" if k in s else ""  # noqa: E731
    for name, configs in result["summary"].items():
        for config, s in configs.items():
            if not s["runs"]:
                what = f"load refused: {s['error']}" if s["error"] else "not run (2 ranks cannot load it)"
                lines.append(f"| {name} | {config} | {what} | | | | | | |")
                continue
            d, t = s["decode_tps"], s["ttft_s"]
            same = {None: "", True: "yes", False: "**no**"}[s.get("same_tokens_as_1_rank")]
            lines.append(f"| {name} | {config} | {d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) | "
                         f"{ratio(s, 'decode_vs_1_rank')} | {t['median']:.2f} ({t['min']:.2f}-{t['max']:.2f}) | "
                         f"{ratio(s, 'ttft_vs_1_rank')} | {mb(s['weights_bytes'])} | "
                         f"{mb(s['rss_bytes'])} ({mb(s['rss_growth_bytes'])}) | {same} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "distributed-cpu.json")
    ap.add_argument("--show", action="store_true", help="only print the table of --out")
    args = ap.parse_args(argv)
    if args.show:
        print(table(json.loads(args.out.read_text())))
        return 0
    start = {"when": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": cpu_name(),
             "loadavg_start": loadavg(), "rounds": args.rounds, "prompt_tokens": PROMPT_TOKENS,
             "max_tokens": MAX_TOKENS, "configs": {k: {"flags": f, "env": e} for k, (f, e) in CONFIGS.items()}}
    result = {**start, **run(args.rounds), "loadavg_end": loadavg()}
    for rnd in result["rounds"]:
        for per in rnd["results"].values():
            for m in per.values():
                if isinstance(m, dict):
                    m.pop("tokens", None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    log(f"{result['elapsed_s']:.0f} s; wrote {args.out}", "distributed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU profile: random-weight models shaped like real ones, the worker against raw mlx-lm, one run.

    python -m bench.gpu --out DIR [--budget-s 480] [--only llama-3.2-1b-bf16 ...] [--models-dir DIR]
    python -m bench.gpu --markdown DIR/gpu.json     # the table of a run

Speed does not depend on weight values, so the models are random (built on the GPU in seconds)
with a word-level tokenizer covering the whole vocabulary. For each model and prompt length:
raw mlx-lm ``generate_step`` in this process and the worker through its protocol, each warmed up
on the same shapes first (MLX compiles kernels per shape), then timed: cold TTFT, decode tok/s,
and the TTFT of a follow-up turn (+32 tokens) that reuses the KV cache.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

from ..common import TimedWorker, log as _log, models_dir
from .shapes import SHAPES, build, prompt_tokens

SMOKE_PLAN = [("smoke", 4, (64, 256)), ("smoke", None, (64,))]
PLAN = [  # (model, bits, prompt lengths)
    ("llama-3.2-1b", 4, (512, 4096, 16384)),
    ("llama-3.2-1b", None, (512, 4096, 16384)),
    ("qwen2.5-7b", 4, (512, 4096)),
    ("qwen2.5-7b", None, (512, 4096)),
]
DECODE_TOKENS = 256
FOLLOW_TOKENS = 32


def log(msg):
    _log(msg, "gpu")


def raw_run(model, prompt, follow_extra):
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    out, t0 = [], time.perf_counter()
    t_first = None
    for tok, _ in generate_step(mx.array(prompt), model, max_tokens=DECODE_TOKENS, prompt_cache=cache):
        if t_first is None:
            t_first = time.perf_counter()
        out.append(tok)
    t_end = time.perf_counter()
    follow = prompt + out + follow_extra
    offset = cache[0].offset
    t1 = time.perf_counter()
    for tok, _ in generate_step(mx.array(follow[offset:]), model, max_tokens=1, prompt_cache=cache):
        t_follow = time.perf_counter() - t1
        break
    return {"ttft_s": t_first - t0, "decode_tps": (len(out) - 1) / (t_end - t_first),
            "follow_ttft_s": t_follow, "follow_cached": offset, "tokens": out}


def worker_run(w, prompt, follow_extra):
    # a fresh cache_key and a fresh prompt per run: no reuse for the cold turn, while MLX's buffer cache stays
    # warm (cache_clear would also release it, and re-allocating GPU memory is not what we measure)
    key = f"k{time.perf_counter_ns()}"
    cold = w.generate(prompt, DECODE_TOKENS, cache_key=key)
    follow = w.generate(prompt + cold["tokens"] + follow_extra, 1, cache_key=key)
    return {"ttft_s": cold["ttft_s"], "host_ttft_s": cold["host_ttft_s"], "decode_tps": cold["decode_tps"],
            "host_decode_tps": cold["host_decode_tps"], "follow_ttft_s": follow["ttft_s"],
            "follow_host_ttft_s": follow["host_ttft_s"], "follow_cached": follow["cached_tokens"],
            "tokens": cold["tokens"]}


def device_info():
    info = {"mlx_device": str(mx.default_device()), "python": platform.python_version()}
    try:
        info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                      "--format=csv,noheader"], capture_output=True, text=True,
                                     timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["gpu"] = "unknown"
    from importlib.metadata import version

    for pkg in ("mlx", "mlx-cuda-13", "mlx-lm"):
        try:
            info[pkg] = version(pkg)
        except Exception:
            info[pkg] = "missing"
    return info


def warmup_check(models_dir: Path, out_dir: Path) -> dict:
    """A fresh worker's first request, with and without `warmup` at load (llama-3.2-1b 4-bit)."""
    path = build(models_dir, "llama-3.2-1b", 4)
    prompt = prompt_tokens(300, 7, SHAPES["llama-3.2-1b"]["vocab_size"])
    rows = {}
    for warm in (False, True, False, True):
        w = TimedWorker(env={"MLX_WORKER_DEVICE": "gpu", "MLX_WORKER_BLAS": "off"})
        try:
            t = time.perf_counter()
            info = w.load_model(path, warmup=warm)
            load_host = time.perf_counter() - t
            first = w.generate(prompt, 32)
            second = w.generate(prompt_tokens(300, 8, SHAPES["llama-3.2-1b"]["vocab_size"]), 32)
        finally:
            w.close()
        rows.setdefault(str(warm), []).append({
            "load_host_s": load_host, "warmup_s": info.get("warmup_s"), "first_ttft_s": first["ttft_s"],
            "first_decode_tps": first["decode_tps"], "second_ttft_s": second["ttft_s"],
            "second_decode_tps": second["decode_tps"]})
        log(f"warmup={warm}: {rows[str(warm)][-1]}")
    (out_dir / "gpu-warmup.json").write_text(json.dumps(rows, indent=2))
    return rows


def markdown(results: dict) -> str:
    d = results["device"]
    lines = [f"GPU profile: {d.get('gpu')}, mlx {d.get('mlx')} + mlx-cuda-13 {d.get('mlx-cuda-13')}, "
             f"mlx-lm {d.get('mlx-lm')}, Python {d.get('python')}; started {results.get('started')}.",
             "Random weights, greedy; medians of interleaved repeats after a warm-up on the same shapes. "
             f"Decode = {DECODE_TOKENS} tokens; follow-up = +{FOLLOW_TOKENS} new tokens on the cached turn.", "",
             "| model | prompt | TTFT raw / worker (ms) | overhead (engine / host) ms | decode raw / worker tok/s | "
             "ratio | follow-up TTFT worker (ms) | cold/follow-up worker (raw) | same tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        raw, wk = r["raw"], r["worker"]
        lines.append(
            f"| {r['model']} | {r['prompt_tokens']} | {raw['ttft_s'] * 1e3:.1f} / {wk['ttft_s'] * 1e3:.1f} | "
            f"{r['ttft_overhead_ms']:+.1f} / {r['host_ttft_overhead_ms']:+.1f} | "
            f"{raw['decode_tps']:.0f} / {wk['decode_tps']:.0f} | {r['decode_ratio']:.2f}x | "
            f"{wk['follow_ttft_s'] * 1e3:.1f} | {r['followup_speedup']:.1f}x ({r['raw_followup_speedup']:.1f}x) | "
            f"{'yes' if r['identical_tokens'] else 'no'} |")
    if results.get("skipped"):
        lines.append(f"\nSkipped for the time budget: {', '.join(results['skipped'])}.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--models-dir", type=Path, default=models_dir(),
                    help="where the random-weight models are built (default: $MLX_WORKER_MODELS)")
    ap.add_argument("--budget-s", type=float, default=480)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", action="append")
    ap.add_argument("--smoke", action="store_true", help="a tiny plan to check the script on a CPU")
    ap.add_argument("--warmup-check", action="store_true", help="only compare a first request with/without warmup")
    args = ap.parse_args(argv)
    from mlx_lm import load

    t_start = time.time()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.warmup_check:
        warmup_check(args.models_dir, out_dir)
        return 0
    results = {"device": device_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "runs": [],
               "skipped": []}
    log(f"device {results['device']}")
    w = TimedWorker(env={} if args.smoke else {"MLX_WORKER_DEVICE": "gpu", "MLX_WORKER_BLAS": "off"})
    results["worker_ready"] = {k: w.ready[k] for k in ("versions", "device")}
    try:
        for shape, bits, lengths in (SMOKE_PLAN if args.smoke else PLAN):
            name = f"{shape}-{'q%d' % bits if bits else 'bf16'}"
            if args.only and name not in args.only:
                continue
            if time.time() - t_start > args.budget_s:
                results["skipped"].append(name)
                continue
            t = time.time()
            path = build(args.models_dir, shape, bits)
            build_s = time.time() - t
            model, _ = load(str(path))
            info = w.load_model(path)
            log(f"{name}: built in {build_s:.1f}s, worker load {info['load_s']:.1f}s")
            vocab = SHAPES[shape]["vocab_size"]
            for n in lengths:
                if time.time() - t_start > args.budget_s:
                    results["skipped"].append(f"{name}@{n}")
                    continue
                prompt = prompt_tokens(n, n, vocab)
                extra = prompt_tokens(FOLLOW_TOKENS, n + 1, vocab)
                raw_run(model, prompt, extra)  # warm-up: compile every shape used below
                worker_run(w, prompt, extra)
                raws, wks = [], []
                for rep in range(args.repeats):  # interleaved, so drifts hit both sides alike
                    # a prompt of its own each time (same length): the worker's cold turn would otherwise
                    # copy the previous run's prefix (any cache_key's entry, since protocol 1.1)
                    cold = prompt_tokens(n, n + 1000 * (rep + 1), vocab)
                    raws.append(raw_run(model, cold, extra))
                    wks.append(worker_run(w, cold, extra))
                same = all(r["tokens"] == k["tokens"] for r, k in zip(raws, wks))

                def med(runs, key):
                    vals = [r[key] for r in runs if r.get(key) is not None]
                    return statistics.median(vals) if vals else None

                row = {"model": name, "prompt_tokens": n, "identical_tokens": same,
                       "raw": {k: med(raws, k) for k in ("ttft_s", "decode_tps", "follow_ttft_s")},
                       "worker": {k: med(wks, k) for k in ("ttft_s", "host_ttft_s", "decode_tps",
                                                           "host_decode_tps", "follow_ttft_s",
                                                           "follow_host_ttft_s", "follow_cached")}}
                r, k = row["raw"], row["worker"]
                row["decode_ratio"] = k["decode_tps"] / r["decode_tps"]
                row["ttft_overhead_ms"] = (k["ttft_s"] - r["ttft_s"]) * 1000
                row["host_ttft_overhead_ms"] = (k["host_ttft_s"] - r["ttft_s"]) * 1000
                row["followup_speedup"] = k["ttft_s"] / k["follow_ttft_s"]
                row["raw_followup_speedup"] = r["ttft_s"] / r["follow_ttft_s"]
                results["runs"].append(row)
                log(json.dumps(row))
                (out_dir / "gpu.json").write_text(json.dumps(results, indent=2))
            del model
            w.simple("unload")
            mx.clear_cache()
    finally:
        w.close()
        results["elapsed_s"] = round(time.time() - t_start, 1)
        (out_dir / "gpu.json").write_text(json.dumps(results, indent=2))
        (out_dir / "gpu.md").write_text(markdown(results))
    return 0


def cli(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if argv[:1] == ["--markdown"]:  # python -m bench.gpu --markdown results.json
        sys.stdout.write(markdown(json.loads(Path(argv[1]).read_text())))
        return 0
    return main(argv)

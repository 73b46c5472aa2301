"""PNG plots of bench/results/latest.json (and the GPU profile's gpu-h100.json), by matplotlib.

    python -m bench.cpu.plots [DIR]    # re-draw from DIR/latest.json (default bench/results)

Called by bench.cpu.report.write at the end of every run. Each plot is skipped when its scenario
was not run; a missing matplotlib skips them all with a message (pip install matplotlib).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..common import RESULTS

SHORT = {"tiny": "tiny fixture", "smollm2": "SmolLM2-135M"}


def _bars(ax, groups, series, ylabel, title, fmt="{:.0f}", log=False):
    """groups: x labels; series: {name: [value per group]}."""
    n = len(series)
    width = 0.8 / n
    for i, (name, vals) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, [v or 0 for v in vals], width, label=name)
        for b, v in zip(bars, vals):
            if v:
                ax.annotate(fmt.format(v), (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)


def decode(plt, sc, out):
    ov = sc.get("overhead")
    if not ov:
        return None
    keys = [k for k in ("tiny", "smollm2") if k in ov]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5))
    axes = axes if len(keys) > 1 else [axes]
    for ax, k in zip(axes, keys):
        d = ov[k]
        _bars(ax, ["decode tok/s"], {"worker": [d["worker_decode_tps"]["median"]],
                                     "raw mlx-lm (matched)": [d["raw_decode_tps"]["median"]]},
              "tok/s (median)", f"{SHORT[k]}: {d['paired_decode_ratio']:.2f}x", fmt="{:.1f}")
    fig.suptitle("CPU decode: worker vs raw mlx-lm", fontsize=11)
    return _save(fig, out / "cpu_decode.png")


def ttft(plt, sc, out):
    groups, cold, follow = [], [], []
    for k, d in (sc.get("followup") or {}).items():
        groups.append(f"{SHORT.get(k, k)}\n~4k chat ({d['ratio']:.0f}x)")
        cold.append(d["cold_ttft_s"] * 1000)
        follow.append(d["followup_ttft_s"] * 1000)
    im = sc.get("image")
    if im and "first_median_s" in im:
        groups.append(f"tiny Qwen2-VL\nimage ({im['ratio']:.0f}x)")
        cold.append(im["first_median_s"] * 1000)
        follow.append(im["followup_median_s"] * 1000)
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    _bars(ax, groups, {"cold / first": cold, "follow-up": follow}, "TTFT, ms (log)",
          "CPU: cold vs follow-up TTFT (worker, prompt cache)", log=True)
    return _save(fig, out / "cpu_ttft_followup.png")


def cancel(plt, sc, out):
    c = sc.get("cancel")
    if not c:
        return None
    fig, axes = plt.subplots(1, len(c), figsize=(5.5 * len(c), 3.8))
    axes = axes if len(c) > 1 else [axes]
    for ax, (k, d) in zip(axes, c.items()):
        allv = [v for ph in d.values() for v in ph["latency_ms"]]
        if not allv:
            continue
        lo, hi = max(min(allv), 0.1), max(allv)
        import numpy as np

        bins = np.logspace(np.log10(lo * 0.9), np.log10(hi * 1.1), 30)
        for name, ph in d.items():
            if ph["latency_ms"]:
                ax.hist(ph["latency_ms"], bins=bins, alpha=0.6,
                        label=f"{name} (p99 {ph['p99_ms']:.0f} ms)")
        ax.axvline(100, color="red", ls="--", lw=1, label="goal p99 100 ms")
        ax.set_xscale("log")
        ax.set_xlabel("cancel -> terminal event, ms (log)")
        ax.set_ylabel("count")
        ax.set_title(SHORT.get(k, k), fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("CPU cancel latency", fontsize=11)
    return _save(fig, out / "cpu_cancel.png")


def gpu(plt, out, path):
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    runs = [r for r in data.get("runs", []) if "raw" in r and "worker" in r]
    if not runs:
        return None
    groups = [f"{r['model'].replace('llama-3.2-', 'L').replace('qwen2.5-', 'Q')}\n{r['prompt_tokens']}"
              for r in runs]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 7))
    _bars(a1, groups, {"raw mlx-lm": [r["raw"]["decode_tps"] for r in runs],
                       "worker": [r["worker"]["decode_tps"] for r in runs]}, "decode tok/s",
          "decode (256 tokens)")
    _bars(a2, groups, {"raw mlx-lm": [r["raw"]["ttft_s"] * 1000 for r in runs],
                       "worker": [r["worker"]["ttft_s"] * 1000 for r in runs],
                       "worker follow-up": [r["worker"]["follow_ttft_s"] * 1000 for r in runs]},
          "TTFT ms (log)", "TTFT (cold, and follow-up +32 tokens)", log=True)
    fig.suptitle(f"H100 (random weights): {data['device'].get('gpu', '')[:40]}; "
                 f"model / prompt tokens", fontsize=10)
    return _save(fig, out / "gpu_h100.png")


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def make(payload: dict, out_dir: Path = RESULTS) -> list:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib missing: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    sc = payload.get("scenarios", {})
    made = []
    for fn in (lambda: decode(plt, sc, out_dir), lambda: ttft(plt, sc, out_dir),
               lambda: cancel(plt, sc, out_dir), lambda: gpu(plt, out_dir, RESULTS / "gpu-h100.json")):
        try:
            p = fn()
        except Exception as exc:  # noqa: BLE001 - a plot never fails the run
            print(f"[bench] a plot failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        if p:
            made.append(p)
    return made


if __name__ == "__main__":
    d = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
    print("\n".join(str(p) for p in make(json.loads((d / "latest.json").read_text()), d)))

"""PNG plot of bench/results/gpu-concurrency-*.json (bench.gpu.concurrency): aggregate decode tok/s by streams.

    python -m bench.gpu.plot_concurrency [results/gpu-concurrency-llama-3.2-1b-q4.json]
"""
import json
import sys
from pathlib import Path

from ..common import RESULTS


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    src = Path(argv[0]) if argv else RESULTS / "gpu-concurrency-llama-3.2-1b-q4.json"
    d = json.loads(src.read_text())
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["streams"] for r in d["rows"]]
    agg = [r["aggregate_tps"] for r in d["rows"]]
    base = d["concurrency_1_tps"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(n, agg, "o-", label="worker, batching (aggregate)")
    ax.plot(n, [base * k for k in n], ":", color="gray", label="ideal: N x one stream")
    ax.plot(n, [base * {4: 3, 8: 5}.get(k, None) if k in (4, 8) else None for k in n], "s", color="red",
            label="issue 15 targets (3x at 4, 5x at 8)")
    ax.axhline(base, color="black", lw=0.8, label=f"max_concurrent 1: {base:.0f} tok/s")
    for k, v in zip(n, agg):
        ax.annotate(f"{v / base:.2f}x", (k, v), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("decode tok/s")
    ax.set_title(f"{d['shape']} {d['bits']}-bit, H200, through the worker", fontsize=10)
    ax.legend(fontsize=7)
    out = src.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    main()

"""bench/results/latest.json and latest.md: the CPU profile's table (python -m bench.cpu.report re-renders it)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from ..common import RESULTS


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def table(rows) -> str:
    head = ["Scenario", "Model", "Metric", "Worker", "Raw", "Result", "Goal", "Status", "Note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        st = r["status"]
        status = f"**{st}**" if st.startswith(("met", "missed")) else st
        cells = [r["scenario"], r["model"], r["metric"], _fmt(r["worker"]), _fmt(r["raw"]),
                 _fmt(r["result"]), r["goal"], status, r["note"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def header(meta: dict) -> str:
    dev = meta["device"]
    blas = dev.get("blas") or {}
    v = meta["versions"]
    raw_blas = ", ".join(f"raw {m}: {b.get('name')}" for m, b in meta.get("raw_blas", {}).items())
    return "\n".join([
        f"- when: {meta['started']} (profile `{meta['profile']}`, {meta['elapsed_s']:.0f} s)",
        f"- device: {dev.get('type')} `{dev.get('name')}` on {meta['cpu']} ({meta['cpus']} CPUs), "
        f"load average {meta['loadavg_start']} at start, {meta['loadavg_end']} at end",
        f"- worker BLAS (ready.device.blas): {blas.get('name')} `{blas.get('path')}` core "
        f"{blas.get('core')}, {blas.get('threads')} threads, preloaded={blas.get('preloaded')}"
        + (f"; {raw_blas}" if raw_blas else ""),
        f"- versions: worker {v.get('worker')}, mlx {v.get('mlx')}, mlx-lm {v.get('mlx-lm')}, "
        f"python {v.get('python')}",
    ])


def write(meta: dict, results: dict, out_dir: Path = RESULTS) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for res in results.values() for r in res["rows"]]
    md = "\n".join([
        "# mlx-worker benchmark", "", header(meta), "",
        "Worker = `python -m worker` (defaults: OpenBLAS preload, bf16 computed in fp32). "
        "Raw default = plain mlx-lm, no preload, stored dtype. Raw matched = mlx-lm with the "
        "worker's LD_PRELOAD/OPENBLAS_* and fp32. *Worker* and *Raw* are each side's median over "
        "its runs (tok/s, or ms). *Result* is, for overhead/inproc, the median over interleaved "
        "pairs of the per-pair ratio or difference (so it need not equal the ratio of the two "
        "columns when the machine is noisy), and for followup/blas the ratio of medians. "
        "\"(noisy)\": the pairs' interquartile range straddles the goal.", "",
        table(rows), "",
    ])
    payload = {"meta": meta, "rows": rows,
               "scenarios": {k: v["details"] for k, v in results.items()}}
    (out_dir / "latest.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    from . import plots

    made = plots.make(payload, out_dir)
    if made:
        md += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in made) + "\n"
    (out_dir / "latest.md").write_text(md)
    return md


def rerender(out_dir: Path = RESULTS) -> str:
    """Rewrite latest.md (and latest.json) from latest.json, e.g. after a change to this module."""
    data = json.loads((out_dir / "latest.json").read_text())
    by = {}
    for r in data["rows"]:
        by.setdefault(r["scenario"], {"rows": [], "details": data["scenarios"].get(r["scenario"], {})})
        by[r["scenario"]]["rows"].append(r)
    return write(data["meta"], by, out_dir)


if __name__ == "__main__":  # python -m bench.cpu.report: re-render the last results
    print(rerender())

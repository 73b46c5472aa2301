"""py-spy of the worker process decoding N streams in the batch (issue 15): where the engine thread's time goes.

    python -m bench.probe.conc_spy --models-dir DIR --out DIR [--streams 1] [--concurrent 8]
"""
import argparse
import collections
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.gpu import SHAPES, build  # noqa: E402
from bench.host import TimedWorker  # noqa: E402


def summary(raw: Path, top=40):
    incl, leaf, total = collections.Counter(), collections.Counter(), 0
    for ln in raw.read_text().splitlines():
        stack, _, n = ln.rpartition(" ")
        if "engine" not in stack.split(";")[0] and "_engine" not in stack:
            continue
        frames = [re.sub(r":\d+\)", ")", f) for f in stack.split(";")]
        n = int(n)
        total += n
        for f in set(frames):
            incl[f] += n
        leaf[frames[-1]] += n
    print(f"engine-thread samples: {total}")
    for f, n in incl.most_common(top):
        print(f"  incl {n:6d} {f[:140]}")
    for f, n in leaf.most_common(15):
        print(f"  leaf {n:6d} {f[:140]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models-dir", default="/root/models")
    ap.add_argument("--out", required=True)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--concurrent", type=int, default=8)
    a = ap.parse_args()
    path = build(Path(a.models_dir), "llama-3.2-1b", 4)
    vocab = SHAPES["llama-3.2-1b"]["vocab_size"]
    w = TimedWorker()
    w.load_model(path, max_concurrent=a.concurrent)
    for i in range(a.streams):
        w.send({"type": "generate", "id": f"g{i}", "prompt": {"tokens": [(i * 31 + k * 7) % vocab for k in range(512)]},
                "params": {"max_tokens": 100000}})
    w.wait_for(f"g{a.streams - 1}", lambda e: e["type"] == "token", timeout=300)
    time.sleep(2)
    raw = Path(a.out) / f"spy-{a.streams}-{a.concurrent}.txt"
    subprocess.run(["py-spy", "record", "-r", "250", "-d", "6", "-f", "raw", "--threads", "-o", str(raw),
                    "--pid", str(w.ready["pid"])], check=False, capture_output=True)
    for i in range(a.streams):
        w.send({"type": "cancel", "id": f"c{i}", "target": f"g{i}"})
    evs = [w.collect(f"g{i}") for i in range(a.streams)]
    st = [next(e for e in ev if e["type"] == "stats") for ev in evs]
    print(f"streams {a.streams} concurrent {a.concurrent}: tps {[s['generation_tps'] for s in st]}")
    w.close()
    summary(raw)


if __name__ == "__main__":
    main()

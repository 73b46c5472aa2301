"""The smallest useful host: spawn the worker, load a model, stream one chat answer and its stats.

    python host_examples/python/demo_chat.py --model DIR [--prompt "..."]

It only speaks the protocol (PROTOCOL.md); it never imports the worker's code.
"""

import argparse
import json
import subprocess
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--worker", default=f"{sys.executable} -m worker")
    args = ap.parse_args()

    proc = subprocess.Popen(args.worker.split(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, encoding="utf-8")

    def send(obj):
        proc.stdin.write(json.dumps(obj) + "\n")
        proc.stdin.flush()

    def events(rid):
        for line in proc.stdout:
            ev = json.loads(line)
            if ev["id"] == rid:
                yield ev
                if ev["type"] in ("done", "error"):
                    return
        raise SystemExit("the worker exited unexpectedly")

    ready = json.loads(proc.stdout.readline())
    dev = ready["device"]
    print(f"worker {ready['versions']['worker']} (mlx {ready['versions']['mlx']}) on {dev['type']}"
          + (f", BLAS: {dev['blas']['name']}" if dev.get("blas") else ""), file=sys.stderr)

    send({"type": "load", "id": "load", "model_path": args.model})
    for ev in events("load"):
        if ev["type"] == "error":
            raise SystemExit(f"load failed: {ev['code']}: {ev['message']}")
        if ev["type"] == "done":
            m = ev["model"]
            print(f"loaded {m['model_type']} ({m['parameters'] / 1e6:.0f}M params, "
                  f"{m['compute_dtype']}) in {m['load_s']:.2f}s", file=sys.stderr)

    print(f"> {args.prompt}", file=sys.stderr)
    send({"type": "generate", "id": "chat",
          "prompt": {"messages": [{"role": "user", "content": args.prompt}]},
          "params": {"max_tokens": args.max_tokens}})
    for ev in events("chat"):
        if ev["type"] == "token":
            print(ev["text"], end="", flush=True)
        elif ev["type"] == "stats":
            # ttft_s / prompt_tps are absent when no token came, generation_tps when fewer than 2 did
            print(f"\n[{ev['prompt_tokens']} prompt tokens, TTFT {ev.get('ttft_s', 0) * 1000:.0f} ms, "
                  f"prefill {ev.get('prompt_tps', 0):.0f} tok/s, {ev['generated_tokens']} tokens at "
                  f"{ev.get('generation_tps', 0):.1f} tok/s, peak {ev['peak_memory_bytes'] / 2**20:.0f} MiB]",
                  file=sys.stderr)
        elif ev["type"] == "done":
            print(f"[stop: {ev['stop_reason']}]", file=sys.stderr)
        elif ev["type"] == "error":
            raise SystemExit(f"generate failed: {ev['code']}: {ev['message']}")
    send({"type": "shutdown", "id": "bye"})
    list(events("bye"))
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())

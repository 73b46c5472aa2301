"""GPU profile, vision: a random-weight Gemma-3-4B-shaped VLM (SigLIP tower 27 x 1152 at 896 px,
256 image tokens; text 34 x 2560) through the worker: first question on an image vs a follow-up.

    python -m bench.gpu.vlm --out DIR [--smoke]

The vocabulary is the fixture tokenizer's (512 ids, not 262k): it only changes the lm_head cost.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..common import TimedWorker, log as _log, models_dir
from .shapes import VLM_SHAPES, build_vlm


def log(msg):
    _log(msg, "gpu-vlm")


def ask(w, rid, messages, max_tokens=16):
    evs = w.request({"type": "generate", "id": rid, "prompt": {"messages": messages},
                     "params": {"max_tokens": max_tokens}, "cache_key": rid.split("-")[0]}, timeout=600)
    if evs[-1]["type"] != "done":
        raise RuntimeError(evs[-1])
    stats = next(e for e in evs if e["type"] == "stats")
    return evs[-1]["text"], stats


def turn(w, key, image, text="Describe this image."):
    first = [{"role": "user", "content": [{"type": "image", "path": image}, {"type": "text", "text": text}]}]
    answer, s1 = ask(w, f"{key}-1", first)
    follow = first + [{"role": "assistant", "content": answer},
                      {"role": "user", "content": "What colour dominates?"}]
    _, s2 = ask(w, f"{key}-2", follow)
    return s1, s2


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--models-dir", type=Path, default=models_dir())
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    shape = "smoke" if args.smoke else "4b"
    spec = VLM_SHAPES[shape]
    root = args.models_dir
    t = time.time()
    path = build_vlm(root, shape)
    build_s = time.time() - t
    side = spec["vision"]["image_size"]
    rng = np.random.default_rng(0)
    images = []
    for i in range(args.repeats + 1):
        p = root / f"vlm-image-{i}.png"
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(p)
        images.append(str(p))
    w = TimedWorker(env={} if args.smoke else {"MLX_WORKER_DEVICE": "gpu", "MLX_WORKER_BLAS": "off"})
    try:
        info = w.load_model(path)
        log(f"built in {build_s:.1f}s; loaded {info['parameters'] / 1e9:.2f}B params in {info['load_s']:.1f}s, "
            f"vision={info['vision']}")
        turn(w, "warm", images[0])  # compile every shape first
        rows = [turn(w, f"r{i}", img) for i, img in enumerate(images[1:])]
    finally:
        w.close()
    first = statistics.median(s1["ttft_s"] for s1, _ in rows)
    follow = statistics.median(s2["ttft_s"] for _, s2 in rows)
    result = {"model": path.name, "parameters": info["parameters"], "image_px": side,
              "prompt_tokens_first": rows[0][0]["prompt_tokens"], "prompt_tokens_follow": rows[0][1]["prompt_tokens"],
              "cached_follow": rows[0][1]["cached_tokens"], "first_ttft_s": first, "follow_ttft_s": follow,
              "speedup": first / follow, "decode_tps": statistics.median(s1["generation_tps"] for s1, _ in rows),
              "runs": [[s1, s2] for s1, s2 in rows]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-vlm.json").write_text(json.dumps(result, indent=2))
    log(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

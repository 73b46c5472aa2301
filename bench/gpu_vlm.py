"""GPU profile, vision: a random-weight Gemma-3-4B-shaped VLM (SigLIP tower 27 x 1152 at 896 px,
256 image tokens; text 34 x 2560) through the worker: first question on an image vs a follow-up.

    python -m bench.gpu_vlm --out DIR [--smoke]

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

GEMMA3_4B = {
    "config": {"hidden_size": 2560, "mm_tokens_per_image": 256},
    "text": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
                 sliding_window_pattern=6, mm_tokens_per_image=256),
    "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   patch_size=14, image_size=896),
    "processor": {"image_seq_length": 256},
    "preprocessor": {"size": {"height": 896, "width": 896}},
}
SMOKE = {
    "config": {"hidden_size": 64, "mm_tokens_per_image": 16},
    "text": dict(mm_tokens_per_image=16),
    "vision": dict(patch_size=8, image_size=64),
    "processor": {"image_seq_length": 16},
    "preprocessor": {"size": {"height": 64, "width": 64}},
}


def log(msg):
    print(f"[gpu-vlm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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
    ap.add_argument("--models-dir", default="/tmp/gpu-models")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from bench.host import TimedWorker
    from tests.support.vlm_fixtures import build_vlm_fixture

    spec = SMOKE if args.smoke else GEMMA3_4B
    root = Path(args.models_dir)
    path = root / ("gemma3-smoke" if args.smoke else "gemma3-4b-shaped-bf16")
    t = time.time()
    if not (path / "model.safetensors").exists():
        build_vlm_fixture("gemma3", path, 0, text_overrides=spec["text"],
                          overrides={k: spec[k] for k in ("config", "vision", "processor", "preprocessor")},
                          dtype="float32" if args.smoke else "bfloat16")
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

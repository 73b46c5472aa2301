"""python -m bench.bench_vision [--rounds N] [--pixels P]: first vs follow-up question on one image.

Through the real worker process: a first question about a fresh image (vision encode + full prefill),
then a follow-up turn in the same chat (the prompt cache holds the image's KV; only the new turn is
prefilled). Reports median TTFT (the worker's stats.ttft_s) of both and their ratio. The model is the
tiny Qwen2-VL test fixture (M-RoPE path) with its processor's pixel limit raised to ``--pixels`` so an
image fills a realistic number of tokens (the weights do not depend on the image size).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.client import Worker  # noqa: E402
from tests.vlm_fixtures import vlm_fixture_dir  # noqa: E402

TMP = ROOT / "bench" / "results" / "tmp"


def model_dir(pixels: int) -> Path:
    base = vlm_fixture_dir("qwen2_vl", TMP / "fixtures")
    target = TMP / f"qwen2_vl-{pixels}px"
    if not target.exists():
        shutil.copytree(base, target)
        pre = json.loads((target / "preprocessor_config.json").read_text())
        pre["max_pixels"] = pixels
        pre["size"]["longest_edge"] = pixels
        (target / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return target


def image(i: int, side: int) -> str:
    import numpy as np
    from PIL import Image

    path = TMP / f"bench-image-{i}-{side}.png"
    if not path.exists():
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
    return str(path)


def ttft(evs) -> tuple[float, int, int]:
    assert evs[-1]["type"] == "done", evs[-1]
    st = next(e for e in evs if e["type"] == "stats")
    return st["ttft_s"], st["prompt_tokens"], st["cached_tokens"]


def measure(rounds: int = 3, pixels: int = 448 * 448, side: int = 1024, echo=print) -> dict:
    """First vs follow-up TTFT (medians over ``rounds``) through a fresh worker process."""
    TMP.mkdir(parents=True, exist_ok=True)
    path = model_dir(pixels)
    w = Worker()
    try:
        w.load(path)
        firsts, follows, info = [], [], None
        warm = [{"role": "user", "content": [{"type": "image", "path": image(99, side)},
                                             {"type": "text", "text": "Warm up."}]}]
        w.request({"type": "generate", "id": "warm", "prompt": {"messages": warm}, "params": {"max_tokens": 2}})
        for r in range(rounds):
            q1 = [{"role": "user", "content": [{"type": "image", "path": image(r, side)},
                                               {"type": "text", "text": "What is in this picture?"}]}]
            e1 = w.request({"type": "generate", "id": f"q1-{r}", "prompt": {"messages": q1},
                            "params": {"max_tokens": 16}})
            answer = "".join(e["text"] for e in e1 if e["type"] == "token")
            q2 = q1 + [{"role": "assistant", "content": answer},
                       {"role": "user", "content": "And what colour is the top left corner?"}]
            e2 = w.request({"type": "generate", "id": f"q2-{r}", "prompt": {"messages": q2},
                            "params": {"max_tokens": 16}})
            t1, t2 = ttft(e1), ttft(e2)
            firsts.append(t1[0])
            follows.append(t2[0])
            info = (t1, t2)
            echo(f"round {r}: first {t1[0] * 1000:.1f} ms ({t1[1]} prompt tokens, {t1[2]} cached); "
                 f"follow-up {t2[0] * 1000:.1f} ms ({t2[1]} prompt tokens, {t2[2]} cached)")
    finally:
        w.close()
    f, g = statistics.median(firsts), statistics.median(follows)
    return {"model": path.name, "pixels": pixels, "side": side, "rounds": rounds,
            "first_ttft_s": firsts, "followup_ttft_s": follows, "first_median_s": f,
            "followup_median_s": g, "ratio": f / g, "first_prompt_tokens": info[0][1],
            "followup_prompt_tokens": info[1][1], "followup_cached_tokens": info[1][2]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pixels", type=int, default=448 * 448)
    ap.add_argument("--side", type=int, default=1024, help="stored image side (downscaled by the processor)")
    a = ap.parse_args(argv)
    d = measure(a.rounds, a.pixels, a.side)
    print(f"median TTFT: first {d['first_median_s'] * 1000:.1f} ms, follow-up "
          f"{d['followup_median_s'] * 1000:.1f} ms, ratio {d['ratio']:.1f}x (image tokens "
          f"~{d['followup_cached_tokens']} cached of {d['followup_prompt_tokens']}; {time.strftime('%Y-%m-%d')})")


if __name__ == "__main__":
    main()

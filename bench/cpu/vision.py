"""python -m bench.cpu.vision [--rounds N] [--pixels P]: first vs follow-up question on one image.

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
import time
from pathlib import Path

from tests.support.client import Worker
from tests.support.vlm_fixtures import vlm_fixture_dir

from ..common import TMP

os.environ.setdefault("HF_HUB_OFFLINE", "1")


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


def _text_first_turn(path, n_tokens: int) -> list:
    """A text-only first message whose chat prompt has about ``n_tokens`` tokens (bisection)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))

    def msgs(words):
        return [{"role": "user", "content": " ".join(["lorem"] * words) + " What is in this picture?"}]

    def length(words):
        text = tok.apply_chat_template(msgs(words), tokenize=False, add_generation_prompt=True)
        return len(tok.encode(text, add_special_tokens=False))

    lo, hi = 1, n_tokens
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if length(mid) < n_tokens else (lo, mid)
    return msgs(lo)


def measure(rounds: int = 3, pixels: int = 448 * 448, side: int = 1024, echo=print, family="qwen2_vl") -> dict:
    """First vs follow-up TTFT (medians over ``rounds``) through a fresh worker process, and a text-only
    follow-up with the same context length and the same new turn (the floor an image follow-up should
    reach: nothing about the image is redone)."""
    TMP.mkdir(parents=True, exist_ok=True)
    path = model_dir(pixels) if family == "qwen2_vl" else vlm_fixture_dir(family, TMP / "fixtures")
    w = Worker()
    gen = {"max_tokens": 16}
    try:
        w.load(path)
        firsts, follows, texts, info = [], [], [], None
        warm = [{"role": "user", "content": [{"type": "image", "path": image(99, side)},
                                             {"type": "text", "text": "Warm up."}]}]
        w.request({"type": "generate", "id": "warm", "prompt": {"messages": warm}, "params": {"max_tokens": 2}})
        for r in range(rounds):
            q1 = [{"role": "user", "content": [{"type": "image", "path": image(r, side)},
                                               {"type": "text", "text": "What is in this picture?"}]}]
            e1 = w.request({"type": "generate", "id": f"q1-{r}", "prompt": {"messages": q1}, "params": gen})
            answer = "".join(e["text"] for e in e1 if e["type"] == "token")
            turn2 = [{"role": "assistant", "content": answer},
                     {"role": "user", "content": "And what colour is the top left corner?"}]
            e2 = w.request({"type": "generate", "id": f"q2-{r}", "prompt": {"messages": q1 + turn2},
                            "params": gen})
            t1, t2 = ttft(e1), ttft(e2)
            # the same conversation with text of the image prompt's length in place of the image
            p1 = _text_first_turn(path, t1[1])
            p1[0]["content"] += f" (round {r})"  # a fresh prompt each round: nothing cached from before
            w.request({"type": "generate", "id": f"t1-{r}", "prompt": {"messages": p1}, "params": gen})
            e3 = w.request({"type": "generate", "id": f"t2-{r}", "prompt": {"messages": p1 + turn2},
                            "params": gen})
            t3 = ttft(e3)
            firsts.append(t1[0])
            follows.append(t2[0])
            texts.append(t3[0])
            info = (t1, t2, t3)
            echo(f"round {r}: first {t1[0] * 1000:.1f} ms ({t1[1]} prompt tokens, {t1[2]} cached); "
                 f"follow-up {t2[0] * 1000:.1f} ms ({t2[1]} prompt tokens, {t2[2]} cached); "
                 f"text follow-up {t3[0] * 1000:.1f} ms ({t3[1]} prompt tokens, {t3[2]} cached)")
    finally:
        w.close()
    f, g, t = statistics.median(firsts), statistics.median(follows), statistics.median(texts)
    return {"model": path.name, "family": family, "pixels": pixels, "side": side, "rounds": rounds,
            "first_ttft_s": firsts, "followup_ttft_s": follows, "text_followup_ttft_s": texts,
            "first_median_s": f, "followup_median_s": g, "text_followup_median_s": t,
            "ratio": f / g, "image_vs_text_followup": g / t, "first_prompt_tokens": info[0][1],
            "followup_prompt_tokens": info[1][1], "followup_cached_tokens": info[1][2],
            "text_followup_prompt_tokens": info[2][1], "text_followup_cached_tokens": info[2][2]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pixels", type=int, default=448 * 448)
    ap.add_argument("--side", type=int, default=1024, help="stored image side (downscaled by the processor)")
    ap.add_argument("--family", default="qwen2_vl", help="qwen2_vl (pixels raised) or any fixture family")
    ap.add_argument("--out", help="write the result as JSON here")
    a = ap.parse_args(argv)
    d = measure(a.rounds, a.pixels, a.side, family=a.family)
    if a.out:
        Path(a.out).write_text(json.dumps(d, indent=2) + "\n")
    print(f"median TTFT: first {d['first_median_s'] * 1000:.1f} ms, follow-up "
          f"{d['followup_median_s'] * 1000:.1f} ms, ratio {d['ratio']:.1f}x (image tokens "
          f"~{d['followup_cached_tokens']} cached of {d['followup_prompt_tokens']}); text-only follow-up "
          f"{d['text_followup_median_s'] * 1000:.1f} ms: image/text {d['image_vs_text_followup']:.2f}x "
          f"({time.strftime('%Y-%m-%d')})")


if __name__ == "__main__":
    main()

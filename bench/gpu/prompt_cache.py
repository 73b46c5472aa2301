"""GPU profile, prompt cache: follow-ups on a Gemma-3-shaped VLM against raw mlx-lm with a hand-kept cache.

    python -m bench.gpu.prompt_cache --out DIR [--shape 4b|12b|smoke] [--rounds 3]

A random-weight Gemma-3 VLM (SigLIP 27 x 1152 at 896 px, 256 image tokens; text 34 x 2560 for 4b,
48 x 3840 for 12b; bf16; the fixture tokenizer's 512-id vocabulary) through the real worker process.
In each round, per scenario, the same turns as a chat app sends them (``messages``):
- ``image-300`` / ``image-2.5k``: an image + a question (+ a ~2.3k-token document), then a follow-up;
- ``text-300`` / ``text-2.5k``: the same conversation with text of the same length in place of the image
  (the same answer and the same follow-up question: the same new tokens);
- ``messages-16k``: a ~16k-token conversation, then a follow-up.
Each follow-up is replayed once per first word in VARIANTS; right after each replay, raw mlx-lm
(``generate_step``, this process) does the same work with a hand-kept cache: as many cached tokens as the
worker reused, the same number of new ones. The paired ratios (``*_warm_ratio``: replays after the first,
whose shapes are compiled on both sides) are what the machine's drift affects least. ``floor_turn`` is the
issue's floor: a hand-kept cache holding the first turn (prompt + generated tokens), fed only the
follow-up's new tokens. Also mlx-vlm's own ``stream_generate`` (no prompt cache) on the image follow-ups.
Speed does not depend on weights. ``--worker-env MLX_WORKER_LOG=debug`` logs each replay's phases
(prompt built, cache taken, embedded, first token: ms from the request's start) next to its floor.
On the device: after ``. bench/gpu/install.sh`` (bench/README.md, *Running on the GPU machine*).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from ..common import TimedWorker, log as _log, models_dir
from .shapes import VLM_SHAPES as SHAPES, build_vlm

QUESTION = "Describe what you see, briefly."
FOLLOW = "And which colour dominates in the upper half? Answer in one short sentence."
# the same follow-up with its first word changed, replayed: past the window each costs the same work (the
# previous replay's entry offers nothing beyond the first turn's snapshots); within it, a replay also reuses
# the re-rendered answer from the previous one (cached counts are in the rows)
VARIANTS = [FOLLOW] + [w + FOLLOW[3:] for w in ("But", "Now", "Yet", "Say", "Ask")]
WORDS = ["red", "blue", "cat", "tree", "sky", "house", "water", "stone", "light", "river"]


def log(msg):
    _log(msg, "gpu-cache")


class Bench:
    def __init__(self, path: Path, worker, rounds: int):
        import mlx_lm
        from transformers import AutoTokenizer

        self.path, self.w, self.rounds = path, worker, rounds
        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.model, _ = mlx_lm.load(str(path))  # the floor: mlx-lm's own text model
        self.vocab = 512
        self.n = 0
        self.debug = False

    def length(self, msgs) -> int:
        text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return len(self.tok.encode(text, add_special_tokens=False))

    def words(self, n_tokens: int, seed: int, prefix: list = ()) -> str:
        """Text whose user message makes the chat ``n_tokens`` long (bisection on the word count)."""
        rng = np.random.default_rng(seed)
        pool = [WORDS[i] for i in rng.integers(0, len(WORDS), 4 * n_tokens + 8)]

        def msgs(k):
            return list(prefix) + [{"role": "user", "content": " ".join(pool[:k]) + " " + QUESTION}]

        lo, hi = 0, len(pool)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if self.length(msgs(mid)) < n_tokens else (lo, mid)
        return " ".join(pool[:lo])

    def ask(self, messages, max_tokens=16, key=None):
        """One request; its stats plus ``host_ttft_s`` (request written -> first token event read)."""
        self.n += 1
        req = {"type": "generate", "id": f"q{self.n}", "prompt": {"messages": messages},
               "params": {"max_tokens": max_tokens}}
        if key:
            req["cache_key"] = key
        t0 = time.perf_counter()
        evs = self.w.request(req, timeout=900)
        if evs[-1]["type"] != "done":
            raise RuntimeError(evs[-1])
        st = dict(next(e for e in evs if e["type"] == "stats"))
        st["host_ttft_s"] = next(e["_t"] for e in evs if e["type"] == "token") - t0
        st["phases"] = self.phases(req["id"])
        return evs[-1]["text"], st

    def phases(self, rid, wait=0.5) -> dict:
        """The worker's debug line for ``rid`` (with MLX_WORKER_LOG=debug): ms from the request's start."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            for line in reversed(self.w.stderr_lines[-50:]):
                if f"generate {rid}: " in line:
                    body = line.split(f"generate {rid}: ", 1)[1].split(" ms", 1)[0]
                    return {k: float(v) for k, v in (part.rsplit(" ", 1) for part in body.split(", "))}
            if not self.debug:
                return {}
            time.sleep(0.01)
        return {}

    def floor(self, held: int, new: int, repeats: int = 3) -> tuple:
        """Raw mlx-lm: a cache holding ``held`` tokens (prefilled, untimed), then ``new`` tokens to the
        first generated one (timed); (median, min) of ``repeats`` runs of the same shapes."""
        runs = [self._floor(held, new) for _ in range(repeats)]
        return statistics.median(runs), min(runs)

    def _floor(self, held: int, new: int) -> float:
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        rng = np.random.default_rng(held + new)
        ids = [int(t) for t in rng.integers(20, self.vocab, held + new)]
        cache = make_prompt_cache(self.model)
        for _ in generate_step(mx.array(ids[:held]), self.model, max_tokens=1, prompt_cache=cache):
            break
        for c in cache:  # generate_step fed its first token too: cut back to exactly ``held``
            if c.offset > held and c.is_trimmable():
                c.trim(c.offset - held)
        held_now = max(c.offset for c in cache)
        mx.eval([c.state for c in cache])
        t0 = time.perf_counter()
        for _ in generate_step(mx.array(ids[held_now:]), self.model, max_tokens=1, prompt_cache=cache):
            break
        return time.perf_counter() - t0

    def replays(self, convs: dict) -> dict:
        """Each conversation's follow-up (``convs``: name -> (messages up to the follow-up, key)), replayed
        once per variant; right after each replay, raw mlx-lm does the same work (the replay's cached and
        new token counts): pairs measured moments apart, so the machine's drift hits both alike. The
        first replay of a shape pays kernel compilation on both sides (``cold``), later ones do not."""
        out = {name: {"worker": [], "host": [], "floor": [], "cached": [], "prompt": [], "phases": []} for name in convs}
        for j, v in enumerate(VARIANTS):
            for name, (msgs, key) in convs.items():
                _, st = self.ask(msgs + [{"role": "user", "content": v}], max_tokens=1, key=f"{key}-{j}")
                o = out[name]
                o["worker"].append(st["ttft_s"])
                o["host"].append(st["host_ttft_s"])
                o["cached"].append(st["cached_tokens"])
                o["prompt"].append(st["prompt_tokens"])
                o["phases"].append(st["phases"])
                o["floor"].append(self._floor(st["cached_tokens"], st["prompt_tokens"] - st["cached_tokens"]))
                if st["phases"]:
                    log(f"{name} {key}-{j}: worker {st['phases']} floor {o['floor'][-1] * 1000:.1f}")
        for o in out.values():
            ratios = [w / f for w, f in zip(o["worker"], o["floor"])]
            host = [h / f for h, f in zip(o["host"], o["floor"])]
            o.update(cold_ratio=ratios[0], warm_ratio=statistics.median(ratios[1:]),
                     warm_host_ratio=statistics.median(host[1:]), warm_s=statistics.median(o["worker"][1:]),
                     warm_floor_s=statistics.median(o["floor"][1:]))
        return out

    def image_pair(self, tag, image, doc_tokens, r):
        """An image conversation and its text twin (same length, answer and follow-up question)."""
        doc = self.words(doc_tokens, 1000 + r) if doc_tokens else ""
        first = [{"role": "user", "content": [{"type": "image", "path": image},
                                              {"type": "text", "text": (doc + " " if doc else "") + QUESTION}]}]
        answer, s1 = self.ask(first, key=f"{tag}-img-{r}")
        twin = [{"role": "user", "content": self.words(s1["prompt_tokens"], 2000 + r) + " " + QUESTION}]
        self.ask(twin, max_tokens=1, key=f"{tag}-txt-{r}")  # fill the cache with the twin's first turn
        turn = [{"role": "assistant", "content": answer}]
        rep = self.replays({"image": (first + turn, f"{tag}-img-{r}"), "text": (twin + turn, f"{tag}-txt-{r}")})
        held = s1["prompt_tokens"] + s1["generated_tokens"]
        new = rep["image"]["prompt"][0] - held
        floor, floor_min = self.floor(held, new)
        return {"image_first_ttft_s": s1["ttft_s"], "image_first_prompt": s1["prompt_tokens"],
                "image": rep["image"], "text": rep["text"],
                "floor_turn_s": floor, "floor_turn_min_s": floor_min, "floor_held": held, "floor_new": new,
                "follow_messages": first + turn + [{"role": "user", "content": FOLLOW}]}

    def long_chat(self, r, target=16000):
        first = [{"role": "user", "content": self.words(target, 3000 + r)}]
        answer, s1 = self.ask(first, key=f"long-{r}")
        rep = self.replays({"messages": (first + [{"role": "assistant", "content": answer}], f"long-{r}")})
        held = s1["prompt_tokens"] + s1["generated_tokens"]
        new = rep["messages"]["prompt"][0] - held
        floor, floor_min = self.floor(held, new)
        return {"cold_ttft_s": s1["ttft_s"], "cold_prompt": s1["prompt_tokens"], "messages": rep["messages"],
                "floor_turn_s": floor, "floor_turn_min_s": floor_min, "floor_held": held, "floor_new": new}


def mlx_vlm_follow(path: Path, messages, image, repeats=2) -> float:
    """mlx-vlm's stream_generate on the follow-up conversation (it has no prompt cache): time to first token."""
    from mlx_vlm import load
    from mlx_vlm.generate import stream_generate

    model, proc = load(str(path))
    content = [{"type": "image"}, {"type": "text", "text": messages[0]["content"][1]["text"]}]
    chat = [{"role": "user", "content": content}] + messages[1:]
    prompt = proc.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for _ in stream_generate(model, proc, prompt, image=[image], max_tokens=1, temperature=0.0):
            break
        times.append(time.perf_counter() - t0)
    del model
    return statistics.median(times[1:])


def med(rows, key):
    return statistics.median(r[key] for r in rows)


def summary(rows, names) -> dict:
    """Medians over rounds: warm follow-up TTFT (worker, same-work floor), the paired worker / floor
    ratios (engine stats and host-measured), the first replay's ratio, and the first turn's floor."""
    out = {"floor_turn_s": med(rows, "floor_turn_s")}
    for n in names:
        for k in ("warm_s", "warm_floor_s", "warm_ratio", "warm_host_ratio", "cold_ratio"):
            out[f"{n}_{k}"] = statistics.median(r[n][k] for r in rows)
        out[f"{n}_vs_floor_turn"] = out[f"{n}_warm_s"] / out["floor_turn_s"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="4b", choices=sorted(SHAPES))
    ap.add_argument("--models-dir", type=Path, default=models_dir())
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--long", type=int, default=16000, help="tokens of the long conversation (0: skip)")
    ap.add_argument("--doc", type=int, default=2300, help="document tokens of the 2.5k image scenario")
    ap.add_argument("--no-mlx-vlm", dest="mlx_vlm", action="store_false", help="skip mlx-vlm's follow-up")
    ap.add_argument("--only", default="300,2.5k", help="image scenarios to run (comma-separated)")
    ap.add_argument("--worker-env", action="append", default=[], metavar="K=V",
                    help="an environment variable for the worker process only (diagnostics)")
    args = ap.parse_args(argv)
    from PIL import Image

    root = args.models_dir
    t = time.time()
    path = build_vlm(root, args.shape)
    log(f"model ready in {time.time() - t:.1f}s: {path}")
    side = SHAPES[args.shape]["vision"]["image_size"]
    rng = np.random.default_rng(0)
    images = []
    for i in range(2 * args.rounds + 2):
        p = root / f"cache-image-{side}-{i}.png"
        if not p.exists():
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(p)
        images.append(str(p))
    gpu = args.shape != "smoke"
    env = {"MLX_WORKER_DEVICE": "gpu", "MLX_WORKER_BLAS": "off"} if gpu else {}
    env.update(kv.split("=", 1) for kv in args.worker_env)
    w = TimedWorker(env=env)
    try:
        info = w.load_model(path)
        log(f"worker loaded {info['parameters'] / 1e9:.2f}B params in {info['load_s']:.1f}s")
        b = Bench(path, w, args.rounds)
        b.debug = "MLX_WORKER_LOG=debug" in args.worker_env
        log("warm-up")
        b.image_pair("warm", images[0], 0, 0)
        b.image_pair("warm", images[1], args.doc, 1)
        if args.long:
            b.long_chat(99, target=min(args.long, 4000))
        res = {"model": path.name, "shape": args.shape, "parameters": info["parameters"], "image_px": side}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)

        def save(res):  # after each scenario: a run cut short by its time limit keeps what it measured
            clean = {k: ({kk: vv for kk, vv in v.items() if kk != "_last"} if isinstance(v, dict) else v)
                     for k, v in res.items()}
            (out / f"gpu-cache-{args.shape}.json").write_text(json.dumps(clean, indent=2))
        for tag, doc in [(t, d) for t, d in (("300", 0), ("2.5k", args.doc)) if t in args.only.split(",")]:
            rows = [b.image_pair(tag, images[2 + 2 * r + (tag != "300")], doc, 10 + r) for r in range(args.rounds)]
            res[tag] = summary(rows, ("image", "text"))
            res[tag]["rows"] = [{k: v for k, v in row.items() if k != "follow_messages"} for row in rows]
            res[tag]["image_first_ttft_s"] = med(rows, "image_first_ttft_s")
            res[tag]["cold_vs_follow"] = res[tag]["image_first_ttft_s"] / res[tag]["image_warm_s"]
            res[tag]["image_vs_text"] = res[tag]["image_warm_s"] / res[tag]["text_warm_s"]
            res[tag]["_last"] = (rows[-1]["follow_messages"], images[2 + 2 * (args.rounds - 1) + (tag != "300")])
            save(res)
            log(f"{tag}: " + json.dumps({k: v for k, v in res[tag].items() if k not in ("rows", "_last")}))
        if args.long:
            rows = [b.long_chat(r, args.long) for r in range(args.rounds)]
            res["messages-16k"] = summary(rows, ("messages",))
            res["messages-16k"].update(rows=rows, cold_ttft_s=med(rows, "cold_ttft_s"))
            save(res)
            log("messages-16k: " + json.dumps({k: v for k, v in res["messages-16k"].items() if k != "rows"}))
        del b
    finally:
        w.close()
    for tag in [t for t in ("300", "2.5k") if t in res]:
        msgs, image = res[tag].pop("_last")
        if args.mlx_vlm:
            res[tag]["mlx_vlm_follow_ttft_s"] = mlx_vlm_follow(path, msgs, image)
            log(f"{tag}: mlx-vlm stream_generate follow-up {res[tag]['mlx_vlm_follow_ttft_s'] * 1000:.1f} ms")
    save(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

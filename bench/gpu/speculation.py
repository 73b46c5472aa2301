"""Issue 33's GPU acceptance lines, one run, through the worker process only:

    python -m bench.gpu.speculation --out DIR [--parts draft,lookup,batching,vlm] [--rounds 3] [--budget-s 450]
    python -m bench.gpu.speculation --out DIR --smoke      # tiny shapes on the CPU (~15 s): the script works

Two text workers on a Llama-3.2-1B-shaped 4-bit model (random weights, ``shapes.py``): A with ``max_concurrent: 1``
(``prompt_lookup: false`` there is mlx-lm's ``generate_step``, the speed before issue 33) and B with batching.
Arms are alternated within each round and every ratio compares runs of the same round, seconds apart.

- ``draft``: B with a smaller draft (``llama-3.2-1b-draft``: 4 layers of 1024, the same vocabulary) loaded by
  ``load_draft``; 4 concurrent greedy streams with the draft against the same batch with ``speculative: false``
  (both ``prompt_lookup: false``; a third arm adds auto lookup without the draft): aggregate decode tok/s, and the
  acceptance ``draft_tokens_accepted / draft_tokens_proposed`` from ``stats``.
  **Random weights agree on nothing**: their logits are nearly flat (entropy 11.26 nats of ln 128256 = 11.76 on
  this shape, measured with mlx-lm), so a draft picks the main model's token about as often as chance. The task is
  made repetitive, as listing or templated output is, by one ``logit_bias`` on every request: 8 token ids get +100,
  +100 - s, +100 - 2s, ... (``--bias-step`` s), which confines the output to them, mostly to the first; both models
  then pick among the same few and agree unless their own logits (std ~1) outweigh a step. The acceptance moves
  with s (0.96 at s = 2 in the smoke run): read the speed-up together with it.
- ``lookup``: one stream. A **code edit**: greedy with that bias, the prompt P + O + P where O is the model's own
  answer to P (the answer quotes its prompt), ``prompt_lookup`` true / null (auto) / false; an **ordinary** request
  sampled at temperature 1 without the bias (greedy random weights collapse into one repeated token, which lookup
  would predict: sampling their flat logits gives text where no n-gram recurs, so auto lookup costs what it costs
  when nothing pays), ``prompt_lookup`` null / false. On both workers; ratios to false on the same worker and to
  A's false (generate_step). Targets: code edit >= 1.5x, ordinary >= 0.95x.
- ``batching``: issue 15's figures again: 1 / 4 / 8 streams on B with ``prompt_lookup: false`` and null, over one
  stream on A (false), for the ordinary (sampled) and the greedy (collapsing, hence repetitive) task.
- ``vlm``: Gemma-3-4B- and 12B-shaped VLMs (``build_vlm``; bf16, 896 px, 256 image tokens), the worker run with
  ``MLX_WORKER_LOG=debug``. Per round an image conversation (image + question, a fixed answer text) and its text
  twin (words in place of the image, as many tokens, the same answer); each is primed with a follow-up question
  (untimed), then replayed with the question's first word changed, image and text alternated: the same cached
  tokens (~300: the history) and the same new ones (~50: the question). TTFT (``stats.ttft_s`` and host) and the
  debug phases ("generate <id>: prompt X, take Y, embedded Z, first W ms") per replay; target image / text <= 1.15.

Every text request also gets ``logit_bias`` -100 on EOS, so each runs to ``max_tokens``; the VLM worker keeps
its load defaults (on a GPU ``max_concurrent`` 8: its follow-ups go through the batch, ``batching`` in each row).
The JSON is written after each part (``gpu-speculation.json``, or ``gpu-speculation-smoke.json``); a part that
would start past ``--budget-s`` is skipped and says so, one that fails records its error and the others run. On
the device: after ``. bench/gpu/install.sh`` (bench/README.md, *Not run yet: issue 33 on the GPU*).
"""

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from ..common import TimedWorker, log as _log, med as median, models_dir
from .prompt_cache import QUESTION, WORDS
from .shapes import SHAPES, VLM_SHAPES, build, build_vlm, prompt_tokens

GPU_ENV = {"MLX_WORKER_DEVICE": "gpu", "MLX_WORKER_BLAS": "off"}
PARTS = ("draft", "lookup", "batching", "vlm")
ANSWER = "It shows a square of coloured noise, with no object in it."
FIRST_WORDS = ["Now", "But", "And", "Then", "Also", "Still", "So", "Yet"]


def log(msg):
    _log(msg, "spec")


# ---------------------------------------------------------------- text: requests and streams

def confining_bias(vocab: int, n: int, step: float) -> dict:
    """``n`` ids with +100, +100 - step, ...: greedy output stays among them, mostly on the first."""
    return {str(vocab // 3 + 17 * i): 100.0 - step * i for i in range(n)}


def request(rid, tokens, max_tokens, vocab, bias=None, sampled=False, **params):
    eos = {str(vocab - 1): -100.0}
    p = {"max_tokens": max_tokens, "logit_bias": {**eos, **(bias or {})}, **params}
    if sampled:  # seeded by the prompt: every arm of a round draws with the same seed
        p.update(temperature=1.0, seed=(tokens[0] * 7919 + tokens[-1]) % 2**31)
    return {"type": "generate", "id": rid, "prompt": {"tokens": list(tokens)}, "params": p}


def streams(w, reqs, timeout=900):
    """Every request sent at once: (aggregate tok/s over the window where all decode, per-stream rows)."""
    t0 = time.perf_counter()
    for r in reqs:
        w.send(r)
    rows, times = [], []
    for r in reqs:
        evs = w.collect(r["id"], timeout=timeout)
        if evs[-1]["type"] != "done":
            raise RuntimeError(evs[-1])
        toks = [e for e in evs if e["type"] == "token"]
        st = next(e for e in evs if e["type"] == "stats")
        times.append([(e["_t"], len(e["tokens"])) for e in toks])
        rows.append({"tokens": [t for e in toks for t in e["tokens"]], "tps": st.get("generation_tps"),
                     "proposed": st.get("draft_tokens_proposed") or 0, "accepted": st.get("draft_tokens_accepted") or 0,
                     "speculative": st.get("speculative"), "prompt_lookup": st.get("prompt_lookup"),
                     "batching": st.get("batching"), "ttft_s": st.get("ttft_s"), "host_ttft_s": toks[0]["_t"] - t0})
    start, end = max(t[0][0] for t in times), min(t[-1][0] for t in times)
    inside = sum(k for t in times for (at, k) in t if start < at <= end)
    return (inside / (end - start) if end > start else None), rows


def arm_summary(runs, base=None) -> dict:
    """``runs``: per round (aggregate tok/s, rows); ``base``: the same rounds' baseline runs."""
    out = {"tps": median(x[0] for x in runs), "runs_tps": [x[0] for x in runs],
           "stream_tps": median(r["tps"] for x in runs for r in x[1])}
    out["proposed"] = proposed = sum(r["proposed"] for x in runs for r in x[1])
    out["acceptance"] = sum(r["accepted"] for x in runs for r in x[1]) / proposed if proposed else None
    last = runs[-1][1][0]
    out.update({k: last[k] for k in ("speculative", "prompt_lookup", "batching")})
    if base is not None:
        ratios = [x[0] / b[0] for x, b in zip(runs, base) if x[0] and b[0]]
        out.update(ratios=ratios, ratio=median(ratios))
        out["same_tokens"] = all([r["tokens"] for r in x[1]] == [r["tokens"] for r in b[1]] for x, b in zip(runs, base))
        out["base_tps"] = median(b[0] for b in base)
    return out


def measure(arms: dict, rounds: int, make, warm_tokens: int) -> dict:
    """``arms``: name -> (worker, params, streams); ``make(name, round, n, max_tokens, params)`` -> requests. Each
    arm is warmed up once, then run once a round, in an order that alternates between rounds."""
    for name, (w, params, n) in arms.items():
        streams(w, make(f"warm-{name}", 0, n, warm_tokens, params))
    runs = {name: [] for name in arms}
    names = list(arms)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            w, params, n = arms[name]
            runs[name].append(streams(w, make(f"{name}-{r}", r + 1, n, None, params)))
        log(f"round {r}: " + ", ".join(f"{k} {v[-1][0]:.1f}" for k, v in runs.items() if v[-1][0]))
    return runs


# ---------------------------------------------------------------- text parts

def part_draft(ctx) -> dict:
    a, b, vocab, bias = ctx["args"], ctx["B"], ctx["vocab"], ctx["bias"]
    b.simple("load_draft", model_path=str(ctx["draft_path"]))

    def make(tag, seed, n, mt, params):
        return [request(f"d-{tag}-{i}", prompt_tokens(a.prompt, 300 + 10 * seed + i, vocab), mt or a.tokens, vocab,
                        bias, **params) for i in range(n)]
    off = {"prompt_lookup": False}
    arms = {"draft": (b, {"speculative": True, "num_draft_tokens": a.num_draft_tokens, **off}, a.draft_streams),
            "no_draft": (b, {"speculative": False, **off}, a.draft_streams),
            "lookup_auto": (b, {"speculative": False, "prompt_lookup": None}, a.draft_streams)}
    try:
        runs = measure(arms, a.rounds, make, a.warm_tokens)
    finally:  # the parts after this one run without the draft
        b.simple("load_draft", model_path=None)
    out = {"streams": a.draft_streams, "num_draft_tokens": a.num_draft_tokens,
           "no_draft": arm_summary(runs["no_draft"])}
    for k in ("draft", "lookup_auto"):
        out[k] = arm_summary(runs[k], runs["no_draft"])
    log(f"draft: {out['draft']['ratio']:.2f}x (target 1.3), acceptance {out['draft'].get('acceptance')}, "
        f"same tokens {out['draft']['same_tokens']}; auto lookup {out['lookup_auto']['ratio']:.2f}x")
    return out


def part_lookup(ctx) -> dict:
    a, wa, wb, vocab, bias = ctx["args"], ctx["A"], ctx["B"], ctx["vocab"], ctx["bias"]
    p = prompt_tokens(a.prompt, 401, vocab)
    quote = streams(wb, [request("quote", p, a.tokens, vocab, bias, prompt_lookup=False)])[1][0]["tokens"]
    edit = p + quote + p  # the answer to P, then P again: what follows is the quoted answer
    tasks = {"code_edit": dict(tokens=edit, bias=bias), "ordinary": dict(tokens=p, sampled=True)}
    modes = {"code_edit": (True, None, False), "ordinary": (None, False)}
    out = {"prompt_tokens": {"code_edit": len(edit), "ordinary": len(p)}}
    for task, kw in tasks.items():
        def make(tag, seed, n, mt, params, kw=kw, task=task):
            return [request(f"l-{task}-{tag}", kw["tokens"], mt or a.tokens, vocab, kw.get("bias"),
                            kw.get("sampled", False), **params)]
        arms = {f"{w}-{m}": (worker, {"prompt_lookup": m}, 1) for w, worker in (("B", wb), ("A", wa))
                for m in modes[task]}
        runs = measure(arms, a.rounds, make, a.warm_tokens)
        res = {}
        for name, rs in runs.items():
            res[name] = arm_summary(rs, runs[f"{name[0]}-False"])
            res[name]["vs_generate_step"] = median(x[0] / g[0] for x, g in zip(rs, runs["A-False"]) if x[0] and g[0])
        out[task] = res
        log(f"lookup {task}: " + ", ".join(f"{k} {v['ratio']:.2f}x (vs generate_step {v['vs_generate_step']:.2f}x, "
                                           f"acceptance {v.get('acceptance')})" for k, v in res.items()))
    return out


def part_batching(ctx) -> dict:
    a, wa, wb, vocab = ctx["args"], ctx["A"], ctx["B"], ctx["vocab"]
    sizes = [int(x) for x in a.streams.split(",")]
    out = {"streams": sizes}
    for task, sampled in (("ordinary", True), ("greedy", False)):
        def make(tag, seed, n, mt, params, sampled=sampled, task=task):
            return [request(f"b-{task}-{tag}-{i}", prompt_tokens(a.prompt, 500 + 10 * seed + i, vocab),
                            mt or a.tokens, vocab, None, sampled, **params) for i in range(n)]
        arms = {"A-1-False": (wa, {"prompt_lookup": False}, 1)}
        arms.update({f"B-{n}-{m}": (wb, {"prompt_lookup": m}, n) for n in sizes for m in (False, None)})
        runs = measure(arms, a.rounds, make, a.warm_tokens)
        res = {"A-1-False": arm_summary(runs["A-1-False"])}
        for n in sizes:  # ratio: to the same batch without lookup; vs_one_stream: to one stream on A
            for m in (False, None):
                row = res[f"B-{n}-{m}"] = arm_summary(runs[f"B-{n}-{m}"], runs[f"B-{n}-False"])
                row["round_vs_one_stream"] = [x[0] / b[0] for x, b in zip(runs[f"B-{n}-{m}"], runs["A-1-False"])
                                              if x[0] and b[0]]
                row["vs_one_stream"] = median(row["round_vs_one_stream"])
        out[task] = res
        log(f"batching {task}: one stream alone {res['A-1-False']['tps']:.1f} tok/s; " + ", ".join(
            f"{n} streams {res[f'B-{n}-False']['vs_one_stream']:.2f}x / auto {res[f'B-{n}-None']['vs_one_stream']:.2f}x"
            for n in sizes))
    return out


# ---------------------------------------------------------------- vlm

def phases(w, rid, debug, wait=0.5) -> dict:
    """The worker's debug line for ``rid``: ms from the request's start (prompt, take, embedded, first, ...)."""
    deadline = time.monotonic() + wait
    while debug and time.monotonic() < deadline:
        for line in reversed(w.stderr_lines[-80:]):
            if f"generate {rid}: " in line:
                body = line.split(f"generate {rid}: ", 1)[1].split(" ms", 1)[0]
                return {k: float(v) for k, v in (part.rsplit(" ", 1) for part in body.split(", "))}
        time.sleep(0.01)
    return {}


class Chat:
    """Requests as a chat app sends them (``messages``), and token counts from the model's own tokenizer."""

    def __init__(self, w, path, debug):
        from transformers import AutoTokenizer

        self.w, self.debug, self.n = w, debug, 0
        self.tok = AutoTokenizer.from_pretrained(str(path))

    def ask(self, messages, key, max_tokens=1):
        self.n += 1
        rid = f"v{self.n}"
        t0 = time.perf_counter()
        evs = self.w.request({"type": "generate", "id": rid, "prompt": {"messages": messages}, "cache_key": key,
                              "params": {"max_tokens": max_tokens}}, timeout=900)
        if evs[-1]["type"] != "done":
            raise RuntimeError(evs[-1])
        st = next(e for e in evs if e["type"] == "stats")
        first = next(e["_t"] for e in evs if e["type"] == "token")
        return evs[-1]["text"], {"ttft_s": st["ttft_s"], "host_ttft_s": first - t0, "cached": st["cached_tokens"],
                                 "new": st["prompt_tokens"] - st["cached_tokens"], "batching": st.get("batching"),
                                 "phases": phases(self.w, rid, self.debug)}

    def length(self, msgs) -> int:
        text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return len(self.tok.encode(text, add_special_tokens=False))

    def words(self, fits, seed) -> str:
        """Words, then punctuation one mark at a time, until ``fits(text)`` is 0 (or first above it): the longest
        run of words short of 0 by bisection, the marks (mostly a token each) to make it up."""
        pool = [WORDS[i] for i in np.random.default_rng(seed).integers(0, len(WORDS), 4000)]
        lo, hi = 0, len(pool)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(" ".join(pool[:mid])) < 0 else (lo, mid - 1)
        text = " ".join(pool[:lo])
        for i in range(64):
            if fits(text) >= 0:
                break
            text += ".,;:!?"[i % 6]
        return text


def vlm_round(chat, image, r, replays, follow) -> list:
    """An image conversation and its text twin, each primed with a follow-up (untimed), then ``replays`` replays of
    the follow-up with its first word changed, image and text alternated. The twin's words make its primed prompt as
    long as the image's, and both histories end in the same answer text: the same cached and new tokens."""
    first = [{"role": "user", "content": [{"type": "image", "path": image}, {"type": "text", "text": QUESTION}]}]
    turn = [{"role": "assistant", "content": ANSWER}]  # a fixed text: a generated one may re-tokenize otherwise
    chat.ask(first, f"img-{r}")  # the first question (as a chat app sends it), then its follow-up
    _, s = chat.ask(first + turn + [{"role": "user", "content": follow(0)}], f"img-{r}")
    target = s["cached"] + s["new"]

    def twin(t):
        return [{"role": "user", "content": t + " " + QUESTION}]
    words = chat.words(lambda t: chat.length(twin(t) + turn + [{"role": "user", "content": follow(0)}]) - target, r)
    convs = {"image": (first, f"img-{r}"), "text": (twin(words), f"txt-{r}")}
    chat.ask(twin(words) + turn + [{"role": "user", "content": follow(0)}], f"txt-{r}")
    rows = []
    for j in range(1, replays + 1):
        pair = {}
        for kind in (("image", "text") if (r + j) % 2 else ("text", "image")):
            hist, key = convs[kind]
            pair[kind] = chat.ask(hist + turn + [{"role": "user", "content": follow(j)}], key)[1]
        pair["ratio"] = pair["image"]["ttft_s"] / pair["text"]["ttft_s"]
        pair["host_ratio"] = pair["image"]["host_ttft_s"] / pair["text"]["host_ttft_s"]
        rows.append(pair)
    return rows


def part_vlm(shape, a, env) -> dict:
    from PIL import Image

    t = time.time()
    path = build_vlm(a.models_dir, shape)
    side = VLM_SHAPES[shape]["vision"]["image_size"]
    rng = np.random.default_rng(33)
    images = []
    for i in range(a.rounds + 1):
        img = a.models_dir / f"spec-image-{side}-{i}.png"
        if not img.exists():
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(img)
        images.append(str(img))
    w = TimedWorker(env={**env, "MLX_WORKER_LOG": "debug"})
    try:
        info = w.load_model(path)
        log(f"vlm {shape}: built and loaded in {time.time() - t:.1f} s, {info['parameters'] / 1e9:.2f}B params")
        chat = Chat(w, path, debug=True)
        base = chat.length([{"role": "user", "content": ""}])
        body = chat.words(lambda t: chat.length([{"role": "user", "content": "Now " + t}]) - base - a.vlm_new, 77)

        def follow(j):
            return FIRST_WORDS[j % len(FIRST_WORDS)] + " " + body
        vlm_round(chat, images[0], 100, 2, follow)  # warm-up: every shape compiled
        rows = [p for r in range(a.rounds) for p in vlm_round(chat, images[r + 1], r, a.replays, follow)]
    finally:
        w.close()
    ratios = [p["ratio"] for p in rows]
    out = {"model": path.name, "parameters": info["parameters"], "image_px": side, "pairs": len(rows),
           "ratio": median(ratios), "ratio_range": [min(ratios), max(ratios)],
           "host_ratio": median(p["host_ratio"] for p in rows),
           "pooled_ratio": sum(p["image"]["ttft_s"] for p in rows) / sum(p["text"]["ttft_s"] for p in rows),
           "cached": sorted({(p["image"]["cached"], p["text"]["cached"]) for p in rows}),
           "new": sorted({(p["image"]["new"], p["text"]["new"]) for p in rows}), "rows": rows}
    for kind in ("image", "text"):
        out[f"{kind}_ttft_ms"] = median(p[kind]["ttft_s"] * 1000 for p in rows)
        out[f"{kind}_phases_ms"] = {k: median(p[kind]["phases"].get(k) for p in rows)
                                    for k in rows[0][kind]["phases"]}
    log(f"vlm {shape}: image {out['image_ttft_ms']:.1f} ms / text {out['text_ttft_ms']:.1f} ms = {out['ratio']:.2f}x "
        f"(target 1.15; {min(ratios):.2f}-{max(ratios):.2f}); cached/new (image, text) {out['cached']} / {out['new']}; "
        f"phases image {out['image_phases_ms']} text {out['text_phases_ms']}")
    return out


# ---------------------------------------------------------------- main

def text_workers(a, env, ctx) -> dict:
    main = build(a.models_dir, a.shape, a.bits)
    ctx["draft_path"] = build(a.models_dir, a.draft_shape, a.bits)
    ctx["vocab"] = SHAPES[a.shape]["vocab_size"]
    ctx["bias"] = confining_bias(ctx["vocab"], 8, a.bias_step)
    ctx["A"], ctx["B"] = TimedWorker(env=env), TimedWorker(env=env)
    ctx["A"].load_model(main, max_concurrent=1)
    info = ctx["B"].load_model(main, max_concurrent=max(int(x) for x in a.streams.split(",")))
    log(f"text workers loaded: {main.name} ({info['parameters'] / 1e9:.2f}B), draft {ctx['draft_path'].name}")
    return ctx


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, on the CPU")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--replays", type=int, default=3, help="vlm: replays of the follow-up per round")
    ap.add_argument("--budget-s", type=float, default=450,
                    help="skip a part that would start past this many seconds (the 12B VLM takes ~2-3 min)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--streams", default="1,4,8")
    ap.add_argument("--draft-streams", type=int, default=4)
    ap.add_argument("--num-draft-tokens", type=int, default=3)
    ap.add_argument("--bias-step", type=float, default=2.0)
    ap.add_argument("--vlm-shapes", default="4b,12b")
    ap.add_argument("--vlm-new", type=int, default=50, help="vlm: new tokens of the follow-up")
    ap.add_argument("--models-dir", type=Path, default=models_dir())
    a = ap.parse_args(argv)
    a.shape, a.draft_shape, a.bits = "llama-3.2-1b", "llama-3.2-1b-draft", 4
    if a.smoke:
        a.shape, a.draft_shape, a.vlm_shapes = "smoke", "smoke-draft", "smoke"
        a.rounds, a.replays, a.prompt, a.tokens, a.vlm_new = 1, 2, 64, 32, 20
    a.models_dir = a.models_dir.resolve()  # image paths must be absolute
    a.warm_tokens = min(64, a.tokens)  # each arm's warm-up: its shapes compiled, lookup's widths reached
    return a


def main(argv=None):
    a = parse(argv)
    env = {} if a.smoke else GPU_ENV
    parts = a.parts.split(",")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dst = out / f"gpu-speculation{'-smoke' if a.smoke else ''}.json"
    res = {"shape": a.shape, "draft_shape": a.draft_shape, "bits": a.bits, "prompt": a.prompt, "tokens": a.tokens,
           "rounds": a.rounds, "bias_step": a.bias_step, "skipped": []}
    t0, ctx = time.monotonic(), {"args": a}

    def due(name):
        if time.monotonic() - t0 > a.budget_s:
            res["skipped"].append(name)
            log(f"{name}: skipped, past --budget-s")
            return False
        return True

    def run(name, fn, *args):  # a part that fails says why; the others still run
        try:
            res[name] = fn(*args)
        except Exception as e:
            log(f"{name} failed: {traceback.format_exc()}")
            res[name] = {"error": repr(e)}
        dst.write_text(json.dumps(res, indent=1))
    try:
        for name, fn in (("draft", part_draft), ("lookup", part_lookup), ("batching", part_batching)):
            if name in parts and due(name):
                run(name, lambda c, fn=fn: fn(c if "A" in c else text_workers(a, env, c)), ctx)
    finally:
        for k in ("A", "B"):
            if k in ctx:
                ctx[k].close()
    for shape in a.vlm_shapes.split(",") if "vlm" in parts else []:
        if due(f"vlm-{shape}"):
            run(f"vlm-{shape}", part_vlm, shape, a, env)
    res["elapsed_s"] = time.monotonic() - t0
    dst.write_text(json.dumps(res, indent=1))
    log(f"wrote {dst} in {res['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m bench.cpu.agent_loop [--only MODEL] [--turns N]: an agent loop replayed turn by turn, and how much
of each turn's reusable prompt the prompt cache serves: the worker, mlx-lm's server cache, LM Studio's mlx-engine.

The transcript (``agent_loop.json`` beside this file) is a coding-agent session: a system prompt with tools, user
asks, forced tool calls, tool results, free answers; a vision model gets an image in the first user message, the
reasoning fixture thinks before every answer. Each turn the host re-sends the whole conversation as ``messages``,
the previous answer as it received it (``done.text``, ``done.tool_calls``; the reasoning is not sent back, so the
template leaves it out), then the next step's user or ``tool`` messages.

Figure, per turn after the first: **reusable** = the tokens of the new prompt (fresh tokenization, with offsets)
whose text lies entirely inside the longest common text prefix of the new prompt text and the previous turn's
prompt text followed by what the model generated (its ids, the final EOS included, decoded with special tokens
after the previous prompt's ids). **Served** = what the cache gave: the worker's ``stats.cached_tokens``, mlx-lm's
``len(prompt) - len(rest)`` from ``LRUPromptCache.fetch_nearest_cache``, mlx-engine's ``cached_tokens`` from
``CacheWrapper.update_cache``. Share = served / reusable. The worker counts in its own ids: where its prompt
holds the model's own ids for text a fresh tokenization writes otherwise (PROTOCOL.md, *The prompt cache*), its
reusable count is the host's minus the difference in prompt length (the rest is tokenized alike).

The worker runs first and defines the conversation; mlx-lm and mlx-engine (``agent_loop_mlx.py``, a child process)
then get the host's fresh prompt ids each turn and generate the worker's ids (a logits processor forces them: the
constrained calls are the worker's), so the caches see the same conversation. The host's side (rendering,
tokenization, the reusable count) is ``agent_loop_host.py``. See bench/README.md (*Agent loop*).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from ..common import RESULTS, ROOT, TMP, log, loadavg, next_id, smollm2_model
from .agent_loop_host import Prompter, reusable, step_messages, template_messages

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TRANSCRIPT = Path(__file__).with_suffix(".json")
ENGINE_SRC = TMP / "mlx-engine"  # a checkout of github.com/lmstudio-ai/mlx-engine (no pip package exists)
MAX_TOKENS, CALL_TOKENS = 24, 128  # an answer; a forced call (it ends at EOS, long before)


# ---------------------------------------------------------------- models

def _long(src: Path, name: str, **config) -> Path:
    """A copy of a fixture with 8192 positions (RoPE: no weight changes) and ``config`` overrides: the
    transcript is ~2,000 tokens on the fixtures' 512-token vocabulary, past their 2048."""
    from tests.support.fixtures import build_once

    def build(tmp: Path) -> None:
        for f in src.iterdir():
            shutil.copy2(f, tmp / f.name)
        for fname, over in (("config.json", {"max_position_embeddings": 8192, **config}),
                            ("tokenizer_config.json", {"model_max_length": 8192})):
            p = tmp / fname
            if p.exists():
                p.write_text(json.dumps({**json.loads(p.read_text()), **over}, indent=2) + "\n")

    return build_once(TMP / "fixtures" / name, build)


def _reasoning_fixture() -> Path:
    """The tool fixture driven to close its thinking block (tests/process/test_tools.py's ``thinker_dir``)."""
    from tests.support import reference
    from tests.support.tool_fixtures import drive_marker

    src = _model_dir("tools")
    _, tok = reference.load_model(src)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    plain = reference.generate(src, tok.apply_chat_template(ask, add_generation_prompt=True, think_open=True), 30)
    special = set(tok.all_special_ids)
    x = next(t for t in plain[6:] if t not in special and plain.index(t) >= 6)
    return drive_marker(src, TMP / "fixtures" / "agent-hermes-thinker", "</think>", x)


def _model_dir(name: str) -> Path:
    from tests.support.fixtures import fixture_dir
    from tests.support.tool_fixtures import tool_fixture_dir
    from tests.support.vlm_fixtures import build_vlm_fixture

    root = TMP / "fixtures"
    if name == "smollm2":
        return smollm2_model()
    if name in ("tools", "mistral"):
        family = "hermes" if name == "tools" else "mistral"
        return _long(tool_fixture_dir(family, root), f"agent-{family}")
    if name == "reasoning":
        return _reasoning_fixture()
    if name == "sliding":
        return _long(fixture_dir("gemma3_text", root), "agent-gemma3-w64", sliding_window=64)
    if name == "hybrid":
        return _long(fixture_dir("lfm2", root), "agent-lfm2")
    if name == "vlm":
        from tests.support.fixtures import build_once

        over = {"sliding_window": 64, "max_position_embeddings": 8192}
        return build_once(root / "agent-vlm-gemma3-w64",
                          lambda tmp: build_vlm_fixture("gemma3", tmp, 0, text_overrides=over))
    raise ValueError(name)


MODELS = {  # name: (what it is, template_kwargs)
    "smollm2": ("SmolLM2-135M-Instruct (template ignores tools: the worker's tool prompt)", None),
    "tools": ("tool fixture (qwen2, Hermes <tool_call> template)", None),
    "mistral": ("tool fixture (llama, Mistral [TOOL_CALLS] template: tools before the last user message)", None),
    "reasoning": ("reasoning fixture (tool fixture driven to close <think>; think_open every turn)",
                  {"think_open": True}),
    "sliding": ("sliding-window fixture (gemma3 text, window 64)", None),
    "hybrid": ("hybrid recurrent fixture (lfm2: conv + attention)", None),
    "vlm": ("gemma3 VLM fixture (window 64), image in the first user message", None),
}


def _image() -> str:
    import numpy as np
    from PIL import Image

    path = TMP / "agent-loop-ci.png"
    if not path.exists():
        TMP.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(29).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    return str(path.resolve())


# ---------------------------------------------------------------- the worker

def _turn_request(wire: list, tools: list, choice: str, kwargs: dict | None) -> dict:
    prompt = {"messages": wire, "tools": tools, "tool_choice": choice}
    if kwargs:
        prompt["template_kwargs"] = kwargs
    return {"type": "generate", "id": next_id("agent"), "prompt": prompt,
            "params": {"max_tokens": CALL_TOKENS if choice != "auto" else MAX_TOKENS, "temperature": 0.0}}


def ask(w, wire: list, tools: list, choice: str, kwargs: dict | None) -> tuple[list, str | None]:
    """One turn's events; a model that cannot constrain a call (the worker says why) answers in "auto"."""
    evs = w.request(_turn_request(wire, tools, choice, kwargs), timeout=600)
    refused = None
    if evs[-1]["type"] == "error" and choice != "auto" and "tool_choice" in evs[-1].get("message", ""):
        refused = evs[-1]["message"]
        evs = w.request(_turn_request(wire, tools, "auto", kwargs), timeout=600)
    if evs[-1]["type"] != "done":
        raise RuntimeError(f"turn failed: {evs[-1]}")
    return evs, refused


def _record(evs: list, step: dict, new: list, refused: str | None) -> dict:
    """The worker's side of a turn: its figures and the ids it generated (the final EOS included)."""
    done, stats = evs[-1], next(e for e in evs if e["type"] == "stats")
    ids = [t for e in evs if e["type"] in ("token", "tool_call") for t in e["tokens"]]
    return {"step": "user" if "user" in step else "tool", "tool_choice": step["tool_choice"],
            "tool_choice_refused": refused, "fallback": "tool" in step and new[0]["role"] == "user",
            "prompt_tokens": stats["prompt_tokens"], "cached_tokens": stats["cached_tokens"],
            "cache_miss_reason": stats.get("cache_miss_reason"), "stop_reason": done["stop_reason"],
            "generated": ids + ([done["stop_token"]] if done.get("stop_token") is not None else []),
            "calls": [c["function"]["name"] for c in done.get("tool_calls") or []],
            "answer": done.get("text", ""), "reasoning_chars": len(done.get("reasoning") or "")}


def replay_worker(w, name: str, path: Path, transcript: dict, turns: int) -> list:
    """The conversation through the worker, turn by turn: per turn the worker's record, the prompt as the host
    renders it (text, fresh ids, end offsets) and what mlx-lm's server needs of the messages."""
    p, kwargs = Prompter(path, MODELS[name][1]), MODELS[name][1]
    image = _image() if p.processor else None
    wire, calls, out = [{"role": "system", "content": transcript["system"]}], [], []
    for i, step in enumerate(transcript["steps"][:turns]):
        new = step_messages(step, calls, image if i == 0 else None)
        wire = wire + new
        evs, refused = ask(w, wire, transcript["tools"], step["tool_choice"], kwargs)
        msgs, kw = template_messages(wire, transcript["tools"], p.renders_tools)
        ids, ends, text = p.encode(p.render(msgs, kw), image is not None)
        rec = {"turn": i + 1, **_record(evs, step, new, refused), "host_prompt_tokens": len(ids)}
        out.append({**rec, "_text": text, "_ids": ids, "_ends": ends, "_msgs": msgs, "_kw": kw,
                    "_template_kwargs": dict(kwargs or {}), "_roles": [m["role"] for m in new],
                    "_image": image is not None})
        done = evs[-1]
        calls = done.get("tool_calls") or []
        answer = {"role": "assistant", "content": done.get("text", "")}
        wire = wire + [{**answer, "tool_calls": calls} if calls else answer]
    add_reusable(out, p)
    return out


def add_reusable(turns: list, p: Prompter) -> None:
    for prev, cur in zip(turns, turns[1:]):
        cur.update(reusable(prev["_text"], prev["_ids"], prev["generated"], cur["_text"], cur["_ends"], p))


# ---------------------------------------------------------------- one model, three caches

def run_model(w, name: str, transcript: dict, turns: int, engine_src: Path, engine_error: str | None) -> dict:
    path = _model_dir(name)
    w.load_model(path)
    w.cache_clear()
    t0 = time.perf_counter()
    recs = replay_worker(w, name, path, transcript, turns)
    res = {"model": name, "about": MODELS[name][0], "checkpoint": path.name, "turns": recs,
           "worker": [{"cached": r["cached_tokens"]} for r in recs]}
    log(f"{name}: worker {time.perf_counter() - t0:.1f} s", "agent")
    if any(r["_image"] for r in recs):
        res["mlx_lm"] = ("n/a: images (mlx-lm's server takes images only for the models its own processors "
                         "know; a gemma3 checkpoint loads as its text model and image parts are refused)")
        res["mlx_engine"] = ("not run: images go to its batched vision kit (mlx-vlm batching), which needs the "
                             "whole package: " + (engine_error or "?"))
        return res
    res.update(replay_others(w, path, recs, engine_src))
    log(f"{name}: mlx-lm {res.get('mlx_lm_s')} s, mlx-engine {res.get('mlx_engine_s')} s", "agent")
    return res


def replay_others(w, path: Path, recs: list, engine_src: Path) -> dict:
    """mlx-lm and mlx-engine on the worker's turns, in a child process with the worker's BLAS environment."""
    import subprocess

    from ..raw import BLAS_ENV_KEYS

    job, out = TMP / "agent-loop-job.json", TMP / "agent-loop-out.json"
    keys = ("_ids", "generated", "_msgs", "_kw", "_template_kwargs", "_roles", "_image")
    job.write_text(json.dumps({"path": str(path), "engine_src": str(engine_src.resolve()),
                               "turns": [{k: t[k] for k in keys} for t in recs]}))
    env = {k: v for k, v in os.environ.items() if k not in BLAS_ENV_KEYS}
    env.update(w.blas_env())
    subprocess.run([sys.executable, "-m", "bench.cpu.agent_loop_mlx", str(job), str(out)], cwd=ROOT, env=env,
                   check=True)
    return json.loads(out.read_text())


ENGINES = (("worker", "worker"), ("mlx_lm", "mlx-lm LRUPromptCache"), ("mlx_engine", "mlx-engine CacheWrapper"))


def figures(res: dict, engine: str):
    """Per turn after the first: (served, reusable, share, whether the engine generated the forced ids), or the
    reason the engine did not run."""
    got = res[engine]
    if isinstance(got, str):
        return got
    out = []
    for g, t in zip(got[1:], res["turns"][1:]):
        reusable = t["reusable"]
        if engine == "worker":  # in the worker's own ids: its prompt holds the model's ids where the host's
            # fresh tokenization of the same text has others (PROTOCOL.md); the rest is tokenized alike
            reusable -= t["host_prompt_tokens"] - t["prompt_tokens"]
        out.append((g["cached"], reusable, g["cached"] / reusable if reusable else 1.0, g.get("ok", True)))
    return out


def _cell(f) -> str:
    served, reusable, share, ok = f
    return f"{100 * min(share, 1.0):.1f}% ({served}/{reusable})" + ("" if ok else " FORCING FAILED")


def table(results: list) -> str:
    n = max(len(r["turns"]) for r in results)
    head = ["model", "cache"] + [f"turn {i}" for i in range(2, n + 1)] + ["min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        for key, label in ENGINES:
            f = figures(res, key)
            if isinstance(f, str):
                lines.append(f"| {res['model']} | {label} | {f} |" + " |" * (len(head) - 3))
                continue
            cells = [_cell(x) for x in f] + [""] * (n - 1 - len(f))
            low = f"**{100 * min(min(x[2] for x in f), 1.0):.1f}%**" if f else ""
            lines.append("| " + " | ".join([res["model"], label] + cells + [low]) + " |")
    return "\n".join(lines)


def reasons(results: list) -> str:
    """The worker's side per turn: prompt tokens (and the host's count where it differs), cache_miss_reason."""
    lines = ["| model | turn | step | prompt | previous output kept (chars) | reusable | worker served | "
             "cache_miss_reason | what was generated |", "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for t in res["turns"]:
            prompt = str(t["prompt_tokens"]) + ("" if t["host_prompt_tokens"] == t["prompt_tokens"]
                                                else f" (host {t['host_prompt_tokens']})")
            made = (", ".join(t["calls"]) or f"{len(t['generated'])} tokens, {t['stop_reason']}")
            made += f", reasoning {t['reasoning_chars']} chars" if t["reasoning_chars"] else ""
            step = ("tool result as a user message" if t["fallback"] else t["step"]) + f" ({t['tool_choice']}"
            step += ", refused: auto)" if t["tool_choice_refused"] else ")"
            kept = f"{t['generated_chars_kept']}/{t['generated_chars']}" if "reusable" in t else ""
            lines.append(f"| {res['model']} | {t['turn']} | {step} | {prompt} | {kept} | "
                         f"{t.get('reusable', '')} | {t['cached_tokens']} | {t['cache_miss_reason'] or ''} | "
                         f"{made} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def _public(res: dict) -> dict:
    out = {k: v for k, v in res.items() if k != "turns"}
    out["turns"] = [{**{k: v for k, v in t.items() if not k.startswith("_") and k != "generated"},
                     "generated_tokens": len(t["generated"])} for t in res["turns"]]
    out["figures"] = {key: figures(res, key) for key, _ in ENGINES}
    return out


def worker_source(where: Path) -> str:
    """The commit the worker runs from, and whether its worker/ has uncommitted changes."""
    import subprocess

    def git(*args) -> str:
        r = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    head = git("log", "-1", "--format=%h %s")[:72] or "not a git checkout"
    return head + (" + uncommitted changes in worker/" if git("status", "--porcelain", "--", "worker") else "")


def run(names: list, turns: int, engine_src: Path, out_dir: Path, worker_dir: Path) -> list:
    from .agent_loop_mlx import engine_import_error
    from ..common import TimedWorker

    transcript = json.loads(TRANSCRIPT.read_text())
    engine_error = engine_import_error(engine_src) if engine_src.exists() else "no checkout"
    started, results, source = time.time(), [], worker_source(worker_dir)
    log(f"worker from {worker_dir}: {source}", "agent")
    w = TimedWorker(cwd=worker_dir)
    try:
        for name in names:
            results.append(run_model(w, name, transcript, turns, engine_src, engine_error))
    finally:
        w.close()
    md = (f"Agent loop ({turns} turns, {time.strftime('%Y-%m-%d %H:%M')}, {time.time() - started:.0f} s; worker "
          f"{source}): share of each turn's reusable tokens served from the cache (served/reusable)\n\n"
          f"{table(results)}\n\nThe worker's turns:\n\n{reasons(results)}\n")
    print(md)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "agent_loop.md").write_text(md)
    doc = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "seconds": round(time.time() - started, 1),
           "loadavg": loadavg(), "turns": turns, "worker": source, "mlx_engine_import": engine_error,
           "mlx_engine_commit": _commit(engine_src), "results": [_public(r) for r in results]}
    (out_dir / "agent_loop.json").write_text(json.dumps(doc, indent=1) + "\n")
    return results


def _commit(src: Path) -> str | None:
    """The mlx-engine commit: a git checkout's HEAD, else a ``COMMIT`` file beside an unpacked archive."""
    import subprocess

    r = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    if r.returncode == 0 and (src / ".git").exists():
        return r.stdout.strip()
    marker = src / "COMMIT"
    return marker.read_text().strip() if marker.exists() else None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=list(MODELS), help="one model (repeatable); default all")
    ap.add_argument("--turns", type=int, default=None, help="the first N turns of the transcript")
    ap.add_argument("--mlx-engine", type=Path, default=Path(os.environ.get("MLX_ENGINE_SRC", ENGINE_SRC)),
                    help=f"a checkout of lmstudio-ai/mlx-engine (default {ENGINE_SRC.relative_to(ROOT)})")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where agent_loop.{json,md} go")
    ap.add_argument("--worker", type=Path, default=ROOT,
                    help="run `python -m worker` in this checkout (e.g. a git worktree of an earlier commit)")
    a = ap.parse_args(argv)
    steps = len(json.loads(TRANSCRIPT.read_text())["steps"])
    run(a.only or list(MODELS), min(a.turns or steps, steps), a.mlx_engine, a.out, a.worker.resolve())
    sys.stdout.flush()


if __name__ == "__main__":
    main()

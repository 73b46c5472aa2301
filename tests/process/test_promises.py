"""Every promise PROTOCOL.md makes that a review found broken, each through the real worker process."""

import ast
import json
import math
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.support import reference
from tests.support.client import Worker, generated_tokens
from tests.support.fixtures import fixture_dir
from tests.support.prompts import random_ids
from tests.support.vlm_fixtures import vlm_fixture_dir

ROOT = Path(__file__).resolve().parents[2]


def _gen(w, rid, prompt, cache_key=None, **params):
    req = {"type": "generate", "id": rid, "prompt": prompt, "params": params}
    if cache_key:
        req["cache_key"] = cache_key
    return w.request(req)


# ---- 1. exactly one terminal event, even when the worker exits during a long prefill chunk

@pytest.mark.real_model
@pytest.mark.parametrize("how", ["eof", "sigterm"])
def test_exit_during_a_long_prefill_chunk_still_answers(smollm2_dir, how):
    w = Worker()
    try:
        w.load(smollm2_dir, prefill_step_size=4096)  # one chunk of ~1,500 tokens: many seconds here
        ids = random_ids(1500, 1, 100, 40000)
        w.send({"type": "generate", "id": "g", "prompt": {"tokens": ids}, "params": {"max_tokens": 4}})
        w.wait_for("g", lambda e: e["type"] == "progress")  # the prefill has started
        time.sleep(0.3)
        tic = time.monotonic()
        if how == "eof":
            w.proc.stdin.close()
        else:
            w.proc.send_signal(signal.SIGTERM)
        events = w.collect("g", timeout=30)
        assert events[-1]["type"] == "done" and events[-1]["stop_reason"] == "cancelled", events[-1]
        assert w.proc.wait(10) == 0
        assert time.monotonic() - tic < 5.0  # the documented grace (2 s) plus the flush
        rest = list(iter(lambda: w.events.get(timeout=5), None))
        assert [e for e in rest if e.get("id") == "g"] == []  # nothing after the terminal event
    finally:
        w.close()


# ---- 2. a cancelled load is cancelled, at every stage

def test_cancel_during_load_is_honoured(worker, llama_dir, fixtures_root):
    draft = fixture_dir("llama_draft", fixtures_root)
    outcomes = set()
    for i in range(12):
        worker.send({"type": "load", "id": f"l{i}", "model_path": str(llama_dir),
                     "options": {"draft_model_path": str(draft), "warmup": True}})
        stage = [0.0, 0.3, 0.8, 0.95, 0.96, 0.97][i % 6]
        worker.wait_for(f"l{i}", lambda e: e["type"] == "progress" and e["fraction"] >= stage)
        ack = worker.request({"type": "cancel", "id": f"c{i}", "target": f"l{i}"})[-1]
        done = worker.collect(f"l{i}")[-1]
        status = worker.request({"type": "status", "id": f"s{i}"})[-1]
        if ack["cancelled"]:
            assert done["type"] == "done" and done["stop_reason"] == "cancelled", done
            assert "model" not in done
            assert status["state"] == "empty" and "model" not in status, status
        else:  # the load had ended before the cancel arrived
            assert done["type"] == "done" and "stop_reason" not in done
            assert status["model"]["path"] == done["model"]["path"]
        outcomes.add(ack["cancelled"])
    assert True in outcomes  # the cancels did land during loads


# ---- 3. speculative decoding gives the same tokens, penalties included

def test_speculative_with_repetition_penalty_is_identical(worker, llama_dir):
    worker.load(llama_dir, draft_model_path=str(llama_dir))
    # a context made of the model's own greedy continuation: the penalty then changes what comes next
    seed = random_ids(8, 3)
    ids = seed + reference.generate(llama_dir, seed, 192, dtype="float32", stop_at_eos=False)
    unpenalised = reference.generate(llama_dir, ids, 24, dtype="float32")
    params = {"max_tokens": 24, "repetition_penalty": 3.0, "repetition_context_size": 200}
    spec = _gen(worker, "spec", {"tokens": ids}, cache_key="a", **params)
    plain = _gen(worker, "plain", {"tokens": ids}, cache_key="b", speculative=False, **params)
    assert next(e for e in spec if e["type"] == "stats")["speculative"] == "on"
    assert generated_tokens(spec) == generated_tokens(plain)
    assert generated_tokens(plain) == _penalised_reference(llama_dir, ids, 24, 3.0, 200)
    assert generated_tokens(plain) != unpenalised  # the penalty over the whole context mattered


def _penalised_reference(path, ids, n, penalty, context):
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_logits_processors

    model, tok = reference.load_model(path, "float32")
    procs = make_logits_processors(repetition_penalty=penalty, repetition_context_size=context)
    out = []
    for token, _ in generate_step(mx.array(ids), model, max_tokens=n, logits_processors=procs):
        if token in tok.eos_token_ids:
            break
        out.append(int(token))
    return out


# ---- 4. documented codes and honest messages

def test_json_schema_true_means_any_json(llama_worker, llama_dir):
    # the fixture left alone writes an endless number or string (valid JSON so far); a bias towards "}" (which
    # cannot open a value) and "{" makes the grammar's first choice "{" and its next "}": the JSON is then
    # complete, only EOS is allowed, and the text parses. Unconstrained, the first token would be "}".
    tok = reference.load_model(llama_dir)[1]
    (lbrace,), (rbrace,) = tok.encode("{", add_special_tokens=False), tok.encode("}", add_special_tokens=False)
    done = _gen(llama_worker, "j", {"text": "x"}, max_tokens=16, json_schema=True,
                logit_bias={str(lbrace): 50.0, str(rbrace): 100.0})[-1]
    assert done["type"] == "done" and done["stop_reason"] == "eos", done
    assert json.loads(done["text"]) == {}, done
    free = _gen(llama_worker, "n", {"text": "x"}, max_tokens=2, logit_bias={str(lbrace): 50.0, str(rbrace): 100.0})
    assert free[-1]["text"].startswith("}"), free[-1]  # the grammar, not the bias, wrote "{"
    err = _gen(llama_worker, "f", {"text": "x"}, json_schema=False)[-1]
    assert err["code"] == "invalid_params" and "false" in err["message"]


def _vocab_size(path):
    return json.loads((Path(path) / "config.json").read_text())["vocab_size"]


def test_draft_incompatible_message_is_true(worker, llama_dir, qwen2_dir, tmp_path):
    import shutil

    import mlx.core as mx

    worker.load(llama_dir)
    main = _vocab_size(llama_dir)
    # qwen2's tokenizer has as many ids as llama's (the fixtures' 512), mapped to other tokens
    assert _vocab_size(qwen2_dir) == main
    assert reference.load_model(qwen2_dir)[1].vocab != reference.load_model(llama_dir)[1].vocab
    err = worker.request({"type": "load_draft", "id": "d", "model_path": str(qwen2_dir)})[-1]
    assert err["code"] == "draft_incompatible", err
    assert f"has as many ids ({main}) as the main model's but maps them to other tokens" in err["message"], err
    # a copy of llama with fewer ids (its embeddings and output layer cut to 448 rows)
    small = tmp_path / "llama-448"
    shutil.copytree(llama_dir, small)
    cfg = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**cfg, "vocab_size": 448}))
    weights = mx.load(str(small / "model.safetensors"))
    mx.save_safetensors(str(small / "model.safetensors"), {k: v[:448] if v.shape[0] == main else v
                                                           for k, v in weights.items()})
    err = worker.request({"type": "load_draft", "id": "d2", "model_path": str(small)})[-1]
    assert err["code"] == "draft_incompatible", err
    assert f"the draft model has 448 token ids and the main model {main};" in err["message"], err


# ---- 5. numbers are numbers

def test_logprobs_under_json_schema_are_finite(llama_worker):
    events = _gen(llama_worker, "lp", {"text": "x"}, max_tokens=12, top_logprobs=5,
                  json_schema={"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    reports = [lp for e in events if e["type"] == "token" for lp in e["logprobs"]]
    assert reports
    for r in reports:
        assert math.isfinite(r["logprob"]) and len(r["top"]) <= 5
        assert all(isinstance(t["logprob"], float) and math.isfinite(t["logprob"]) for t in r["top"])
    assert any(len(r["top"]) < 5 for r in reports)  # the grammar masked some of the top tokens


# ---- 6. max_memory is the whole footprint

def test_max_memory_counts_the_draft(worker, llama_dir):
    info = worker.load(llama_dir)
    main_bytes = info["parameters"] * 4  # float32 on the CPU
    limit = int(main_bytes * 1.5)
    assert worker.load(llama_dir, max_memory=limit)["path"]  # alone it fits
    err = worker.request({"type": "load", "id": "both", "model_path": str(llama_dir),
                          "options": {"max_memory": limit, "draft_model_path": str(llama_dir)}})[-1]
    assert err["type"] == "error" and err["code"] == "out_of_memory", err
    worker.load(llama_dir, max_memory=limit)
    err = worker.request({"type": "load_draft", "id": "d", "model_path": str(llama_dir)})[-1]
    assert err["code"] == "out_of_memory" and "beside" in err["message"], err


def test_max_memory_counts_the_vision_tower(worker, tmp_path):
    path = vlm_fixture_dir("gemma3", tmp_path)
    info = worker.load(path)
    assert info["vision"] is True
    text_bytes = info["parameters"] * 4
    err = worker.request({"type": "load", "id": "v", "model_path": str(path),
                          "options": {"max_memory": text_bytes + 1}})[-1]
    assert err["type"] == "error" and err["code"] == "out_of_memory", err
    assert "vision tower" in err["message"]


# ---- 7. capabilities list everything, each documented

def test_capabilities_are_complete_and_documented(worker):
    from worker.protocol import REQUEST_TYPES

    caps = worker.ready["capabilities"]
    assert set(REQUEST_TYPES) <= set(caps)
    for feature in ("images", "json_schema", "speculative", "logprobs", "kv_bits", "prompt_cache",
                    "penalties", "logit_bias", "stop_strings", "max_memory", "prompt_progress"):
        assert feature in caps, feature
    text = (ROOT / "PROTOCOL.md").read_text().split("<!-- BEGIN GENERATED")[0]
    section = text.split("## Capabilities", 1)[1].split("\n## ", 1)[0]
    for cap in caps:
        assert f"`{cap}`" in section, f"capability {cap} is not described in PROTOCOL.md's Capabilities"


# ---- 8. what PROTOCOL.md decided for hosts

def test_queued_generate_cancelled_gets_done_with_empty_text_and_no_stats(worker, llama_dir):
    worker.load(llama_dir)
    worker.send({"type": "generate", "id": "long", "prompt": {"text": "a"}, "params": {"max_tokens": 400}})
    worker.send({"type": "generate", "id": "queued", "prompt": {"text": "b"}})
    ack = worker.request({"type": "cancel", "id": "c", "target": "queued"})[-1]
    assert ack["cancelled"] is True
    events = worker.collect("queued")
    assert [e["type"] for e in events] == ["done"]
    assert events[0]["stop_reason"] == "cancelled" and events[0]["text"] == ""
    first = worker.wait_for("long", lambda e: e["type"] == "token")  # it runs (not queued any more)
    worker.request({"type": "cancel", "id": "c2", "target": "long"})
    long = [first] + worker.collect("long")
    assert [e["type"] for e in long][-2:] == ["stats", "done"]  # a generate that ran always has stats


def test_status_while_loading_and_unloading(worker, llama_dir, qwen2_dir):
    """status from the reader thread during 20 loads/unloads: a valid snapshot every time."""
    stop, answers = threading.Event(), []
    sender = threading.Thread(target=lambda: [worker.send({"type": "status", "id": f"h{i}"})
                                              for i in range(100000) if not stop.is_set()
                                              and not time.sleep(0.002)])
    sender.start()
    try:
        for i in range(20):
            worker.send({"type": "load", "id": f"L{i}", "model_path": str((llama_dir, qwen2_dir)[i % 2])})
            worker.send({"type": "unload", "id": f"U{i}"})
        worker.collect("U19", timeout=300)
    finally:
        stop.set()
        sender.join()
    time.sleep(0.3)
    answers = [e for e in worker.backlog if str(e.get("id", "")).startswith("h")]
    while True:
        try:
            e = worker.events.get(timeout=0.5)
        except Exception:
            break
        if e and str(e.get("id", "")).startswith("h"):
            answers.append(e)
    assert len(answers) > 50
    assert all(a["type"] == "done" and a["state"] in ("empty", "idle", "loading", "busy") for a in answers), \
        [a for a in answers if a["type"] != "done"][:3]
    assert any(a["state"] == "loading" for a in answers)
    for a in answers:
        if "model" in a:
            assert a["model"]["path"] in (str(Path(llama_dir).resolve()), str(Path(qwen2_dir).resolve()))


# ---- the house: no import cycle among worker/ modules

def _imports(path: Path, package: str):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # imports inside functions count too
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                yield mod
                for alias in node.names:
                    yield f"{mod}.{alias.name}"
            elif node.module and node.module.startswith("worker"):
                yield node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("worker"):
                    yield alias.name


def test_no_import_cycle():
    modules = {}
    for f in (ROOT / "worker").rglob("*.py"):
        rel = f.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = f
    graph = {}
    for name, f in modules.items():
        package = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        graph[name] = {m for m in _imports(f, package) if m in modules and m != name}
    for name in graph:  # a package's __init__ re-exporting its modules is not a cycle through them
        if modules[name].name == "__init__.py":
            graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    state = {}

    def visit(n, trail):
        state[n] = "open"
        for m in graph[n]:
            if state.get(m) == "open":
                raise AssertionError("import cycle: " + " -> ".join(trail + [n, m]))
            if m not in state:
                visit(m, trail + [n])
        state[n] = "done"

    for n in graph:
        if n not in state:
            visit(n, [])


def test_the_draft_cache_is_in_status_and_cleared(worker, llama_dir):
    worker.load(llama_dir, draft_model_path=str(llama_dir))
    _gen(worker, "g", {"tokens": [5, 6, 7, 8, 9, 10]}, max_tokens=4)
    status = worker.request({"type": "status", "id": "s"})[-1]
    assert status["draft_cache"]["entries"] == 1 and status["draft_cache"]["bytes"] > 0, status
    worker.request({"type": "cache_clear", "id": "cc"})
    status = worker.request({"type": "status", "id": "s2"})[-1]
    assert status["cache"]["entries"] == 0 and status["draft_cache"]["entries"] == 0, status
    worker.request({"type": "load_draft", "id": "d", "model_path": None})
    assert "draft_cache" not in worker.request({"type": "status", "id": "s3"})[-1]

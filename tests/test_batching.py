"""Continuous batching through the real worker: concurrent requests give the tokens they give alone.

Each test runs the same requests twice, in two worker processes: with ``max_concurrent: 1`` (one at a
time, FIFO: each request alone) and with batching (all sent at once, decoded together), and compares
them request by request. The requests mix prompt lengths, a stop string, a seeded sampled one,
logprobs with a repetition penalty, a JSON schema, an image, and one cancelled midway.
"""

import json
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests import reference as ref  # noqa: E402
from tests.client import Worker, generated_text, generated_tokens  # noqa: E402
from tests.vlm_fixtures import vlm_fixture_dir  # noqa: E402


def _ids(n, seed):
    return [random.Random(seed).randrange(20, 400) for _ in range(n)]


def _stats(events):
    return next(e for e in events if e["type"] == "stats")


def _terminals(events):
    return [e for e in events if e["type"] in ("done", "error")]


def run_all(path, requests, concurrent, cancel=None, cancel_after=4, **options):
    """Send every request at once to a fresh worker; returns {id: events}, plus the cancel ack's position.

    ``cancel``: the id of a request cancelled once it has streamed ``cancel_after`` token events; the
    result then also holds how many of its token events came after the acknowledgement."""
    w = Worker()
    try:
        w.load(path, max_concurrent=concurrent, **options)
        for r in requests:
            w.send({"type": "generate", **r})
        out, late = {}, None
        if cancel is not None:
            seen = 0
            while seen < cancel_after:  # every event is kept for collect()
                ev = w.next_event()
                w.backlog.append(ev)
                seen += ev.get("id") == cancel and ev["type"] == "token"
            ack = w.request({"type": "cancel", "id": "cancel", "target": cancel})
            assert ack[-1]["cancelled"] is True
            before = sum(1 for e in w.backlog if e.get("id") == cancel and e["type"] == "token")
            out[cancel] = w.collect(cancel)
            late = sum(1 for e in out[cancel] if e["type"] == "token") - before
        for r in requests:
            if r["id"] not in out:
                out[r["id"]] = w.collect(r["id"])
        for rid, events in out.items():
            assert len(_terminals(events)) == 1 and events[-1] is _terminals(events)[0], (rid, events[-1])
        return out, late
    finally:
        w.close()


def _mixed(path):
    """Requests of every kind the batch must keep per request."""
    text = ref.decode(path, ref.generate(path, ref.text_ids(path, "once upon a time"), 40))
    stop = text[len(text) // 2:len(text) // 2 + 3]
    return [
        {"id": "short", "prompt": {"tokens": [3, 4, 5]}, "params": {"max_tokens": 30}},
        {"id": "long", "prompt": {"tokens": _ids(150, 1)}, "params": {"max_tokens": 12}},
        {"id": "stop", "prompt": {"text": "once upon a time"}, "params": {"max_tokens": 40, "stop": [stop]}},
        {"id": "seeded", "prompt": {"tokens": _ids(20, 2)},
         "params": {"max_tokens": 24, "temperature": 0.9, "top_p": 0.9, "seed": 7}},
        {"id": "logprobs", "prompt": {"tokens": _ids(33, 3)},
         "params": {"max_tokens": 16, "top_logprobs": 3, "repetition_penalty": 1.3}},
        {"id": "cancelled", "prompt": {"tokens": _ids(40, 4)}, "params": {"max_tokens": 400}},
    ]


def _compare(alone, together, cancelled="cancelled"):
    for rid, events in alone.items():
        got = together[rid]
        assert got[-1]["type"] == "done", (rid, got[-1])
        if rid == cancelled:
            assert got[-1]["stop_reason"] == "cancelled"
            assert generated_tokens(got) == generated_tokens(events)[:len(generated_tokens(got))]
            continue
        assert generated_tokens(got) == generated_tokens(events), rid
        assert got[-1]["stop_reason"] == events[-1]["stop_reason"], rid
        assert got[-1]["text"] == events[-1]["text"], rid
        st = _stats(got)
        assert st["batching"] == "on", (rid, st)  # (cached tokens may differ: alone, a request can reuse
        # the prefix its predecessor stored; together they start at once)
        lp_a = [lp for e in events if e["type"] == "token" for lp in (e.get("logprobs") or [])]
        lp_b = [lp for e in got if e["type"] == "token" for lp in (e.get("logprobs") or [])]
        assert len(lp_a) == len(lp_b)
        for a, b in zip(lp_a, lp_b):
            assert a["id"] == b["id"] and abs(a["logprob"] - b["logprob"]) < 1e-4
            assert [t["id"] for t in a["top"]] == [t["id"] for t in b["top"]]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_w64"])
def test_concurrent_requests_give_their_tokens_alone(family, family_dirs, gemma3_w64_dir):
    """Gemma 3 with a 64-token window: the prompts here wrap its rotating layers."""
    path = gemma3_w64_dir if family == "gemma3_w64" else family_dirs[family]
    reqs = _mixed(path)
    alone, _ = run_all(path, reqs, 1)
    together, late = run_all(path, reqs, 8, cancel="cancelled")
    _compare(alone, together)
    assert max(_stats(together[r["id"]])["concurrent"] for r in reqs if r["id"] != "cancelled") >= 4
    assert late <= 2, f"{late} token events of the cancelled stream after the cancel was acknowledged"
    # the stop string really stopped it, the seeded one really sampled
    assert together["stop"][-1]["stop_reason"] == "stop_string"
    greedy = ref.generate(path, _ids(20, 2), 24)
    assert generated_tokens(together["seeded"]) != greedy


def test_json_schema_and_follow_ups_in_the_batch(llama_dir):
    """Two conversations and their follow-ups, and a JSON-schema request, decoded together: each
    follow-up reuses its own conversation's cache exactly as alone, the JSON is the same valid JSON."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    first = [{"id": f"c{i}", "prompt": {"tokens": _ids(60, 10 + i)}, "params": {"max_tokens": 10}}
             for i in range(3)]
    first.append({"id": "json", "prompt": {"text": "a number:"}, "params": {"max_tokens": 30, "json_schema": schema}})
    alone, _ = run_all(llama_dir, first, 1)
    together, _ = run_all(llama_dir, first, 4)
    _compare(alone, together, cancelled=None)
    assert json.loads(together["json"][-1]["text"])["n"] is not None

    w = Worker()
    try:
        w.load(llama_dir, max_concurrent=4)
        for r in first[:3]:
            w.send({"type": "generate", **r})
        answers = {r["id"]: generated_tokens(w.collect(r["id"])) for r in first[:3]}
        follow = [{"id": f"f{i}", "prompt": {"tokens": r["prompt"]["tokens"] + answers[r["id"]] + _ids(9, 50 + i)},
                   "params": {"max_tokens": 8}} for i, r in enumerate(first[:3])]
        for r in follow:
            w.send({"type": "generate", **r})
        got = {r["id"]: w.collect(r["id"]) for r in follow}
    finally:
        w.close()
    for r in follow:
        st = _stats(got[r["id"]])
        assert st["cached_tokens"] >= len(r["prompt"]["tokens"]) - 9 - 1, st
        assert generated_tokens(got[r["id"]]) == ref.generate(llama_dir, r["prompt"]["tokens"], 8)


@pytest.mark.parametrize("family", ["gemma3", "qwen2_vl"])
def test_an_image_request_in_the_batch(family, tmp_path_factory):
    """An image question (Qwen: with its M-RoPE positions) decoded beside text requests, one with a stop
    string, one cancelled midway."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp(f"batch-{family}")
    path = vlm_fixture_dir(family, root)
    img = root / "a.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(img)
    image_msg = [{"role": "user", "content": [{"type": "image", "path": str(img)},
                                              {"type": "text", "text": "What is this?"}]}]
    story = [{"role": "user", "content": "Tell me a story."}]
    reqs = [
        {"id": "image", "prompt": {"messages": image_msg}, "params": {"max_tokens": 12}},
        {"id": "text", "prompt": {"messages": story}, "params": {"max_tokens": 16}},
        {"id": "tokens", "prompt": {"tokens": _ids(30, 6)}, "params": {"max_tokens": 20}},
        {"id": "cancelled", "prompt": {"tokens": _ids(25, 7)}, "params": {"max_tokens": 400}},
    ]
    first, _ = run_all(path, reqs[1:2], 1)
    text = first["text"][-1]["text"]
    reqs.append({"id": "stop", "prompt": {"messages": story},
                 "params": {"max_tokens": 16, "stop": [text[len(text) // 2:len(text) // 2 + 2]]}})
    alone, _ = run_all(path, reqs, 1)
    together, late = run_all(path, reqs, 8, cancel="cancelled")
    _compare(alone, together)
    assert together["stop"][-1]["stop_reason"] == "stop_string" and late <= 2
    assert _stats(together["image"])["concurrent"] >= 2


def test_status_shows_the_running_sequences_and_the_queue(llama_dir):
    w = Worker()
    try:
        w.load(llama_dir, max_concurrent=2)
        for i in range(4):
            w.send({"type": "generate", "id": f"g{i}", "prompt": {"tokens": [3, 4, i + 5]},
                    "params": {"max_tokens": 100000}})
        w.wait_for("g1", lambda e: e["type"] == "token")
        st = w.request({"type": "status", "id": "s"})[-1]
        assert st["state"] == "generating" and st["running"] == ["g0", "g1"] and st["queue"] == ["g2", "g3"]
        assert st["active"] == "g0"
        for i in range(4):
            w.send({"type": "cancel", "id": f"c{i}", "target": f"g{i}"})
        for i in range(4):
            assert w.collect(f"g{i}")[-1]["stop_reason"] == "cancelled"
        st = w.request({"type": "status", "id": "s2"})[-1]
        assert st["state"] == "idle" and st["running"] == [] and st["queue"] == []
    finally:
        w.close()


def test_bad_requests_fail_alone_in_a_running_batch(llama_dir):
    w = Worker()
    try:
        w.load(llama_dir, max_concurrent=4)
        w.send({"type": "generate", "id": "ok", "prompt": {"tokens": [3, 4, 5]}, "params": {"max_tokens": 40}})
        first = w.wait_for("ok", lambda e: e["type"] == "token")
        bad = w.request({"type": "generate", "id": "bad", "prompt": {"tokens": [3, 10 ** 6]}})
        assert bad[-1]["type"] == "error" and bad[-1]["code"] == "invalid_params"
        assert "prompt.tokens" in bad[-1]["message"]
        ok = [first] + w.collect("ok")
        assert ok[-1]["type"] == "done"
        assert generated_tokens(ok) == ref.generate(llama_dir, [3, 4, 5], 40)
        for value in (0, 65, "4"):
            err = w.request({"type": "load", "id": f"l{value}", "model_path": str(llama_dir),
                             "options": {"max_concurrent": value}})[-1]
            assert err["type"] == "error" and "max_concurrent" in err["message"], err
    finally:
        w.close()


def test_requests_that_cannot_batch_run_alone_and_say_why(llama_dir):
    w = Worker()
    try:
        done = w.request({"type": "load", "id": "l", "model_path": str(llama_dir),
                          "options": {"max_concurrent": 4, "kv_bits": 8, "kv_group_size": 32}})[-1]
        assert done["model"]["max_concurrent"] == 1
        assert any("batching is off" in x for x in done["warnings"])
        evs = w.request({"type": "generate", "id": "g", "prompt": {"tokens": [3, 4]}, "params": {"max_tokens": 4}})
        assert _stats(evs)["batching"] == "off: kv_bits"
        done = w.request({"type": "load", "id": "l2", "model_path": str(llama_dir),
                          "options": {"max_concurrent": 4, "draft_model_path": str(llama_dir)}})[-1]
        assert done["model"]["max_concurrent"] == 4
        w.send({"type": "generate", "id": "spec", "prompt": {"tokens": [3, 4]}, "params": {"max_tokens": 20}})
        w.send({"type": "generate", "id": "plain", "prompt": {"tokens": [3, 5]},
                "params": {"max_tokens": 20, "speculative": False}})
        spec, plain = w.collect("spec"), w.collect("plain")
        assert _stats(spec)["batching"] == "off: speculative" and _stats(spec)["speculative"] == "on"
        assert _stats(plain)["batching"] == "on"
        assert generated_tokens(plain) == ref.generate(llama_dir, [3, 5], 20)
    finally:
        w.close()


def test_cpu_default_is_one_at_a_time(llama_dir):
    w = Worker()
    try:
        info = w.load(llama_dir)
        assert info["max_concurrent"] == 1
        evs = w.request({"type": "generate", "id": "g", "prompt": {"text": "hi"}, "params": {"max_tokens": 3}})
        assert _stats(evs).get("batching") is None and generated_text(evs) == evs[-1]["text"]
    finally:
        w.close()


def test_tool_calls_and_reasoning_in_the_batch(tmp_path_factory):
    """A constrained tool call, an auto-tools request and a plain chat, decoded together, give what they
    give alone (calls, channels, stop reasons)."""
    from tests.test_tools import ASK, TOOLS
    from tests.tool_fixtures import tool_fixture_dir

    path = tool_fixture_dir("hermes", tmp_path_factory.mktemp("batch-tools"))
    reqs = [
        {"id": "call", "prompt": {"messages": ASK, "tools": TOOLS, "tool_choice": "required"},
         "params": {"max_tokens": 150}},
        {"id": "named", "prompt": {"messages": ASK, "tools": TOOLS,
                                   "tool_choice": {"type": "function", "function": {"name": "add"}}},
         "params": {"max_tokens": 150}},
        {"id": "auto", "prompt": {"messages": ASK, "tools": TOOLS}, "params": {"max_tokens": 20}},
        {"id": "think", "prompt": {"messages": ASK, "template_kwargs": {"think_open": True}},
         "params": {"max_tokens": 20}},
    ]
    alone, _ = run_all(path, reqs, 1)
    together, _ = run_all(path, reqs, 4)

    def same(events):  # without seq and the random call ids
        out = []
        for e in events:
            if e["type"] in ("token", "tool_call", "done"):
                e = json.loads(json.dumps(e).replace(e.get("call", {}).get("id", "\0"), "ID"))
                for k in ("seq", "cached_tokens", "cache_miss_reason"):  # alone, one reuses the other's prompt
                    e.pop(k, None)
                for c in e.get("tool_calls") or []:
                    c["id"] = "ID"
                if "call" in e:
                    e["call"]["id"] = "ID"
                out.append(e)
        return out

    for r in reqs:
        assert same(together[r["id"]]) == same(alone[r["id"]]), r["id"]
    assert together["call"][-1]["stop_reason"] == "tool_calls"


def test_closing_stdin_ends_every_running_request_once(llama_dir):
    w = Worker()
    w.load(llama_dir, max_concurrent=4)
    for i in range(6):
        w.send({"type": "generate", "id": f"g{i}", "prompt": {"tokens": [3, 4, i + 5]},
                "params": {"max_tokens": 100000}})
    for i in range(4):
        w.wait_for(f"g{i}", lambda e: e["type"] == "token")
    w.proc.stdin.close()
    seen = []
    while True:
        try:
            ev = w.next_event(timeout=30)
        except EOFError:
            break
        seen.append(ev)
    assert w.proc.wait(30) == 0
    ends = [e for e in seen + w.backlog if e["type"] in ("done", "error")]
    assert sorted(e["id"] for e in ends) == [f"g{i}" for i in range(6)]
    assert all(e["type"] == "done" and e["stop_reason"] == "cancelled" for e in ends), ends


def test_a_request_that_does_not_fit_waits_for_the_others(llama_dir, monkeypatch):
    """Admission by memory, in process: while another request decodes, a request whose KV estimate does
    not fit beside the allocated memory does not start its prefill; it starts once the batch is empty."""
    import mlx.core as mx

    from worker import model as M
    from worker.protocol import Generate, GenerateParams, LoadOptions, Prompt
    from worker.scheduler import Batcher

    kit = M.load(str(llama_dir), LoadOptions(max_concurrent=4), lambda f: None)
    b = Batcher(kit)

    class Job:
        def __init__(self, rid, n):
            self.req = Generate(id=rid, prompt=Prompt(tokens=[3, 4, 5]), params=GenerateParams(max_tokens=n))

    events = []
    b.admit(Job("first", 6), events.append, lambda: False)
    while not b.batch.seqs:
        b.tick()
    monkeypatch.setattr(mx, "get_memory_limit", lambda: mx.get_active_memory() + 10)
    b.admit(Job("big", 4), events.append, lambda: False)
    done = []
    while not done:
        done = b.tick()
        if not done:
            assert not b.admitting[0].started and b.waits > 0
    assert [f.job.req.id for f in done] == ["first"]
    while b.busy:
        done += b.tick()
    assert [f.job.req.id for f in done] == ["first", "big"]
    assert done[1].event.stop_reason == "max_tokens"

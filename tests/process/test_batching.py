"""Continuous batching through the real worker: concurrent requests give the tokens they give alone.

Requests sent at once to a batching worker (decoded together) are compared request by request with raw
mlx-lm run on each alone (greedy, seeded, penalized with logprobs, a stop string, one cancelled midway),
or, where the reference would be another library's pipeline (JSON schema, images, tools), with the same
requests run one at a time (``max_concurrent: 1``) in another worker process. Unseeded sampling in the
batch is checked against the greedy path it must leave, and cancels against the one late token event
the protocol allows.
"""

import json
import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.support import reference as ref  # noqa: E402
from tests.support.client import Worker, generated_text, generated_tokens  # noqa: E402
from tests.support.prompts import assert_varied, random_ids  # noqa: E402
from tests.support.vlm_fixtures import vlm_fixture_dir  # noqa: E402

# The cancel flag is set before the cancel's `done` is written, and a running request checks it right after
# each token it releases: after the acknowledgement comes at most the token being released when the
# cancel landed (or, if that token's text was held back, e.g. half a UTF-8 character, its flush at the end).
LATE_TOKEN_EVENTS = 1


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
        {"id": "short", "prompt": {"tokens": random_ids(3, 5)}, "params": {"max_tokens": 30}},
        {"id": "long", "prompt": {"tokens": random_ids(150, 1)}, "params": {"max_tokens": 12}},
        {"id": "stop", "prompt": {"text": "once upon a time"}, "params": {"max_tokens": 40, "stop": [stop]}},
        {"id": "seeded", "prompt": {"tokens": random_ids(20, 2)},
         "params": {"max_tokens": 24, "temperature": 0.9, "top_p": 0.9, "seed": 7}},
        {"id": "logprobs", "prompt": {"tokens": random_ids(33, 3)},
         "params": {"max_tokens": 16, "top_logprobs": 3, "repetition_penalty": 1.3}},
        {"id": "cancelled", "prompt": {"tokens": random_ids(40, 4)}, "params": {"max_tokens": 400}},
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


def _mlx_lm_penalized(path, ids, n, k, **processors):
    """Raw mlx-lm's generate_step (greedy) with its own logits processors: [(token, its logprob, top k ids)]."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_logits_processors

    model, tok = ref.load_model(path)
    out = []
    for t, lp in generate_step(mx.array(ids), model, max_tokens=n,
                               logits_processors=make_logits_processors(**processors)):
        if t in tok.eos_token_ids:
            break
        out.append((t, lp[t].item(), mx.argsort(-lp)[:k].tolist()))
    return out


def _check_against_mlx_lm(path, reqs, together):
    """Each batched stream against raw mlx-lm run on its request alone: the greedy ones (tokens, text, stop
    reason), the stop string, the seeded one (mlx-lm seeded with ``mx.random.seed``), the penalized one's
    tokens and logprobs, the cancelled one's prefix. Each reference is checked not to be degenerate."""
    by_id = {r["id"]: r for r in reqs}
    for rid in ("short", "long", "cancelled"):
        r, got = by_id[rid], generated_tokens(together[rid])
        n = r["params"]["max_tokens"] if rid != "cancelled" else len(got)
        want = ref.generate(path, r["prompt"]["tokens"], n)
        assert_varied(want, 4, what=f"mlx-lm's greedy output for {rid!r}")
        assert got == want, rid
        assert together[rid][-1]["text"] == ref.decode(path, want), rid
        assert together[rid][-1]["stop_reason"] == ("cancelled" if rid == "cancelled" else
                                                     "max_tokens" if len(want) == n else "eos"), rid

    want = ref.generate(path, ref.text_ids(path, "once upon a time"), 40)
    assert_varied(want, 4, what="mlx-lm's greedy output for 'stop'")
    text, stop = ref.decode(path, want), by_id["stop"]["params"]["stop"][0]
    assert together["stop"][-1]["stop_reason"] == "stop_string"
    assert together["stop"][-1]["text"] == text[:text.index(stop)]
    assert generated_tokens(together["stop"]) == want[:len(generated_tokens(together["stop"]))]

    seeded = by_id["seeded"]
    ids, p = seeded["prompt"]["tokens"], seeded["params"]
    sample = ref.generate(path, ids, p["max_tokens"], temperature=p["temperature"], top_p=p["top_p"], seed=p["seed"])
    # the seeded stream is told apart from what an unseeded or differently seeded one gives
    assert_varied(sample, 4, what="mlx-lm's seeded sample")
    assert sample != ref.generate(path, ids, p["max_tokens"]), "the seeded sample is the greedy output"
    assert sample != ref.generate(path, ids, p["max_tokens"], temperature=p["temperature"], top_p=p["top_p"],
                                  seed=p["seed"] + 1), "another seed gives the same sample"
    assert generated_tokens(together["seeded"]) == sample

    pen = by_id["logprobs"]
    k = pen["params"]["top_logprobs"]
    want = _mlx_lm_penalized(path, pen["prompt"]["tokens"], pen["params"]["max_tokens"], k,
                             repetition_penalty=pen["params"]["repetition_penalty"])
    assert_varied([t for t, _, _ in want], 4, what="mlx-lm's penalized output")
    got = [lp for e in together["logprobs"] if e["type"] == "token" for lp in e["logprobs"]]
    assert [lp["id"] for lp in got] == [t for t, _, _ in want] == generated_tokens(together["logprobs"])
    for lp, (_, logprob, top) in zip(got, want):
        assert abs(lp["logprob"] - logprob) < 1e-4 and [t["id"] for t in lp["top"]] == top, (lp, logprob, top)

    for r in reqs:
        assert _stats(together[r["id"]])["batching"] == "on", r["id"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_w64"])
def test_concurrent_requests_give_their_tokens_alone(family, family_dirs, gemma3_w64_dir):
    """Gemma 3 with a 64-token window: the prompts here wrap its rotating layers."""
    path = gemma3_w64_dir if family == "gemma3_w64" else family_dirs[family]
    reqs = _mixed(path)
    together, late = run_all(path, reqs, 8, cancel="cancelled")
    _check_against_mlx_lm(path, reqs, together)
    assert max(_stats(together[r["id"]])["concurrent"] for r in reqs if r["id"] != "cancelled") >= 4
    assert late <= LATE_TOKEN_EVENTS, f"{late} token events of the cancelled stream after the cancel's ack"


@pytest.fixture(scope="module")
def batch_worker(llama_dir):
    """One llama worker batching up to 8 requests, shared by the tests that leave it idle."""
    w = Worker()
    w.load(llama_dir, max_concurrent=8)
    yield w
    w.close()


def _logprob_of(path, ids, continuation, temperature):
    """log P(continuation | ids) under raw mlx-lm's model, sampling at ``temperature`` (no top-p/k)."""
    import mlx.core as mx

    if not continuation:
        return 0.0
    model, _ = ref.load_model(path)
    logits = model(mx.array(ids + continuation)[None])[0, len(ids) - 1:-1].astype(mx.float32) / temperature
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return sum(lp[i, t].item() for i, t in enumerate(continuation))


def test_unseeded_and_seeded_sampling_in_the_batch(batch_worker, llama_dir):
    """Unseeded sampled requests decoded together sample every token (not only the first), each its own
    draws: none follows the greedy path after its first token, no two agree, not even across two batches.
    The llama fixture's next-token distribution is flat (the chance that a right sampler follows any one
    path is computed from raw mlx-lm's logits and asserted negligible). A seeded request in the same batch
    gives mlx-lm's own seeded sample."""
    ids, n, temp, runs, per_run = random_ids(16, 21), 12, 1.0, 2, 4
    seed_params = {"max_tokens": n, "temperature": temp, "seed": 11}
    seeded_ref = ref.generate(llama_dir, ids, n, temperature=temp, seed=11)
    assert_varied(seeded_ref, 4, what="mlx-lm's seeded sample")
    assert seeded_ref != ref.generate(llama_dir, ids, n), "the seeded sample is the greedy output"
    outs = []
    for run in range(runs):  # the first batch all unseeded, the second with the seeded one beside them
        rids = [f"u{run}-{i}" for i in range(per_run)] + ([f"s{run}"] if run else [])
        for rid in rids:
            params = seed_params if rid.startswith("s") else {"max_tokens": n, "temperature": temp}
            batch_worker.send({"type": "generate", "id": rid, "prompt": {"tokens": ids}, "params": params})
        got = {rid: batch_worker.collect(rid) for rid in rids}
        assert all(_stats(evs)["batching"] == "on" for evs in got.values())
        assert max(_stats(evs)["concurrent"] for evs in got.values()) >= 4, [_stats(e) for e in got.values()]
        if run:
            assert generated_tokens(got.pop(f"s{run}")) == seeded_ref, "the seeded row in the batch"
        outs += [generated_tokens(evs) for evs in got.values()]
    tested = 0
    for out in outs:
        # what a row that decodes greedily after its sampled first token would give
        greedy_after = ref.generate(llama_dir, ids + out[:1], len(out) - 1)
        chance = _logprob_of(llama_dir, ids + out[:1], greedy_after, temp)
        if chance > math.log(1e-9):  # a row that sampled EOS at once: too short to tell
            continue
        tested += 1
        assert out[1:] != greedy_after, f"sampled only the first token: {out}"
        # the chance that another request draws this very sequence
        assert _logprob_of(llama_dir, ids, out, temp) < math.log(1e-9), out
    assert tested >= len(outs) - 2, outs
    assert len({tuple(o) for o in outs}) == len(outs), f"unseeded requests gave the same tokens: {outs}"


def test_a_cancel_in_the_batch_ends_it_at_the_next_step(batch_worker):
    """Six long requests decoded together, cancelled one by one at staggered points: each ends
    ``cancelled`` with at most LATE_TOKEN_EVENTS token event after its cancel's acknowledgement (by
    ``seq``), and the others decode on meanwhile."""
    k = 6
    rids = [f"long{i}" for i in range(k)]
    cancel_at = {rid: 16 + i for i, rid in enumerate(rids)}  # token events before its cancel: all have joined
    for i, rid in enumerate(rids):
        batch_worker.send({"type": "generate", "id": rid, "prompt": {"tokens": random_ids(12, 40 + i)},
                           "params": {"max_tokens": 100000}})
    events, seen, ends = [], {rid: 0 for rid in rids}, {}
    while len(ends) < 2 * k:  # each target's terminal and each cancel's ack
        ev = batch_worker.next_event(timeout=60)
        events.append(ev)
        rid = ev.get("id")
        if ev["type"] == "token" and rid in seen:
            seen[rid] += 1
            if seen[rid] == cancel_at[rid]:
                batch_worker.send({"type": "cancel", "id": f"x-{rid}", "target": rid})
        elif ev["type"] in ("done", "error"):
            ends[rid] = ev
    for rid in rids:
        assert ends[rid]["type"] == "done" and ends[rid]["stop_reason"] == "cancelled", ends[rid]
        ack = ends[f"x-{rid}"]
        assert ack["cancelled"] is True, ack
        late = [e for e in events if e.get("id") == rid and e["type"] == "token" and e["seq"] > ack["seq"]]
        assert len(late) <= LATE_TOKEN_EVENTS, (rid, late)
        stats = next(e for e in events if e.get("id") == rid and e["type"] == "stats")
        assert stats["concurrent"] == k, stats
    # the last one decoded on while the others were cancelled
    assert seen[rids[-1]] >= cancel_at[rids[-1]]


def test_json_schema_and_follow_ups_in_the_batch(batch_worker, llama_dir):
    """Three conversations and a JSON-schema request decoded together, then the three follow-ups: each
    conversation gives mlx-lm's tokens, each follow-up reuses exactly its own first turn, and the JSON is
    what the request gives alone (``max_concurrent: 1``)."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    first = [{"id": f"c{i}", "prompt": {"tokens": random_ids(60, 10 + i)}, "params": {"max_tokens": 10}}
             for i in range(3)]
    first.append({"id": "json", "prompt": {"text": "a number:"}, "params": {"max_tokens": 30, "json_schema": schema}})
    alone, _ = run_all(llama_dir, first[3:], 1)
    for r in first:
        batch_worker.send({"type": "generate", **r})
    together = {r["id"]: batch_worker.collect(r["id"]) for r in first}
    _compare(alone, together, cancelled=None)
    assert json.loads(together["json"][-1]["text"])["n"] is not None
    assert max(_stats(evs)["concurrent"] for evs in together.values()) == 4
    answers = {}
    for r in first[:3]:
        want = ref.generate(llama_dir, r["prompt"]["tokens"], 10)
        assert_varied(want, 4, what=f"mlx-lm's output for {r['id']}")
        answers[r["id"]] = generated_tokens(together[r["id"]])
        assert answers[r["id"]] == want, r["id"]

    follow = [{"id": f"f{i}", "prompt": {"tokens": r["prompt"]["tokens"] + answers[r["id"]] + random_ids(9, 50 + i)},
               "params": {"max_tokens": 8}} for i, r in enumerate(first[:3])]
    for r in follow:
        batch_worker.send({"type": "generate", **r})
    got = {r["id"]: batch_worker.collect(r["id"]) for r in follow}
    for r in follow:
        st = _stats(got[r["id"]])
        # the whole first turn: its prompt and every answer token (each was fed before it was reported)
        assert st["cached_tokens"] == len(r["prompt"]["tokens"]) - 9, st
        want = ref.generate(llama_dir, r["prompt"]["tokens"], 8)
        assert_varied(want, 4, what=f"mlx-lm's output for {r['id']}")
        assert generated_tokens(got[r["id"]]) == want


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
        {"id": "tokens", "prompt": {"tokens": random_ids(30, 6)}, "params": {"max_tokens": 20}},
        {"id": "cancelled", "prompt": {"tokens": random_ids(25, 7)}, "params": {"max_tokens": 400}},
    ]
    alone, _ = run_all(path, reqs, 1)
    for rid in ("image", "text", "tokens"):
        assert_varied(generated_tokens(alone[rid]), 3, what=f"the {rid!r} request's output alone")
    text = alone["text"][-1]["text"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    reqs.append({"id": "stop", "prompt": {"messages": story}, "params": {"max_tokens": 16, "stop": [stop]}})
    together, late = run_all(path, reqs, 8, cancel="cancelled")
    _compare(alone, together)
    # the "text" request with a stop string: alone it would end where its text first holds the stop string
    got = together["stop"]
    assert got[-1]["stop_reason"] == "stop_string" and got[-1]["text"] == text[:text.index(stop)]
    assert generated_tokens(alone["text"])[:len(generated_tokens(got))] == generated_tokens(got)
    assert late <= LATE_TOKEN_EVENTS, f"{late} token events of the cancelled stream after the cancel's ack"
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
        ids = random_ids(5, 60)
        w.send({"type": "generate", "id": "ok", "prompt": {"tokens": ids}, "params": {"max_tokens": 40}})
        first = w.wait_for("ok", lambda e: e["type"] == "token")
        bad = w.request({"type": "generate", "id": "bad", "prompt": {"tokens": [3, 10 ** 6]}})
        assert bad[-1]["type"] == "error" and bad[-1]["code"] == "invalid_params"
        assert "prompt.tokens" in bad[-1]["message"]
        ok = [first] + w.collect("ok")
        assert ok[-1]["type"] == "done"
        want = ref.generate(llama_dir, ids, 40)
        assert_varied(want, 4, what="mlx-lm's output")
        assert generated_tokens(ok) == want
        for value in (0, 65, "4"):
            err = w.request({"type": "load", "id": f"l{value}", "model_path": str(llama_dir),
                             "options": {"max_concurrent": value}})[-1]
            assert err["type"] == "error" and "max_concurrent" in err["message"], err
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
    from tests.process.test_tools import ASK, TOOLS
    from tests.support.tool_fixtures import tool_fixture_dir

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
                for k in ("seq", "cached_tokens", "cache_miss_reason",  # alone, one reuses the other's prompt
                          "from_draft"):  # in the batch, prompt lookup is on by default
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


def test_a_request_that_does_not_fit_waits_for_the_others(llama_dir):
    """Admission by memory, in process: while another request decodes, a request whose KV reservation does
    not fit beside the running one's under the ceiling (tests/process/test_kv_memory.py: on the wire) does not
    start its prefill; it starts once the batch is empty."""
    from worker.loading import model as M
    from worker.protocol import Generate, GenerateParams, LoadOptions, Prompt
    from worker.generation.batcher import Batcher
    from worker.generation.memory import Ledger

    kit = M.load(str(llama_dir), LoadOptions(max_concurrent=4), lambda f: None)
    b = Batcher(kit)
    kit.kv = Ledger(kit.kv.layout, ceiling=kit.kv.need(3 + 6))  # `first` alone, exactly

    class Job:
        def __init__(self, rid, n):
            self.req = Generate(id=rid, prompt=Prompt(tokens=[3, 4, 5]), params=GenerateParams(max_tokens=n))

    events = []
    b.admit(Job("first", 6), events.append, lambda: False)
    while not b.batch.seqs:
        b.tick()
    b.admit(Job("big", 4), events.append, lambda: False)
    done = []
    while not done:
        done = b.tick()
        if not done:
            assert not b.admitting[0].started and b.waits > 0
            assert kit.kv.figures.reserved == kit.kv.ceiling and kit.kv.figures.free == 0
    assert [f.job.req.id for f in done] == ["first"]
    while b.busy:
        done += b.tick()
    assert [f.job.req.id for f in done] == ["first", "big"]
    assert done[1].event.stop_reason == "max_tokens"


def _mlx_lm_alone(path, ids, n, cache=None, **kw):
    """Raw mlx-lm's greedy tokens for ``ids`` alone (generate_step on ``cache``, with ``kw``: kv_bits ...), in
    the worker's CPU prefill chunks."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    model, tok = ref.load_model(path)
    out = []
    for t, _ in generate_step(mx.array(ids), model, max_tokens=n, prompt_cache=cache, prefill_step_size=256, **kw):
        if t in tok.eos_token_ids:
            break
        out.append(t)
    return out


def _batched(w, reqs):
    """Send every request at once to ``w``; each one's events, all of them decoded in the batch."""
    for r in reqs:
        w.send({"type": "generate", **r})
    got = {r["id"]: w.collect(r["id"]) for r in reqs}
    for rid, evs in got.items():
        assert evs[-1]["type"] == "done" and _stats(evs)["batching"] == "on", (rid, evs[-1])
    assert max(_stats(evs)["concurrent"] for evs in got.values()) >= len(reqs) - 1
    return got


def test_kv_bits_requests_are_batched_with_their_tokens_alone(w, llama_dir):
    """kv_bits in the batch: four requests (one prompt over two prefill chunks, each quantized after it as
    alone) give raw mlx-lm's tokens with the same kv_bits alone. With quantized_kv_start past a prompt, a
    request's cache is quantized when it joins the batch: mlx-lm alone with quantized_kv_start at its prompt's
    length (a prompt past it is quantized during its prefill, as alone)."""
    kv = {"kv_bits": 4, "kv_group_size": 32}
    assert w.load(llama_dir, max_concurrent=4, prefill_step_size=256, **kv)["max_concurrent"] == 4
    # the first decodes longest: it goes on alone in the cache the batch gives back
    reqs = [{"id": f"q{i}", "prompt": {"tokens": random_ids(n, 70 + i)}, "params": {"max_tokens": m}}
            for i, (n, m) in enumerate(((7, 28), (40, 12), (300, 16), (90, 10)))]
    got = _batched(w, reqs)
    for r in reqs:
        want = _mlx_lm_alone(llama_dir, r["prompt"]["tokens"], r["params"]["max_tokens"], quantized_kv_start=0, **kv)
        assert_varied(want, 4, what=f"mlx-lm's quantized output for {r['id']}")
        assert generated_tokens(got[r["id"]]) == want, r["id"]

    w.load(llama_dir, max_concurrent=4, prefill_step_size=256, quantized_kv_start=64, **kv)
    reqs = [{"id": f"s{i}", "prompt": {"tokens": random_ids(n, 80 + i)}, "params": {"max_tokens": 16}}
            for i, n in enumerate((20, 120, 40))]
    got = _batched(w, reqs)
    for r in reqs:
        ids = r["prompt"]["tokens"]
        want = _mlx_lm_alone(llama_dir, ids, 16, quantized_kv_start=min(64, len(ids)), **kv)
        assert_varied(want, 4, what=f"mlx-lm's quantized output for {r['id']}")
        assert generated_tokens(got[r["id"]]) == want, r["id"]
    # (the check tells "quantized when it joins" from "not yet": unquantized, the short one differs)
    assert _mlx_lm_alone(llama_dir, reqs[0]["prompt"]["tokens"], 16) != generated_tokens(got["s0"])


@pytest.mark.parametrize("family", ["llama", "gemma3_w64"])
def test_max_kv_size_requests_are_batched_with_their_tokens_alone(w, family, llama_dir, gemma3_w64_dir):
    """max_kv_size in the batch: windows that keep their first 4 tokens (Gemma 3: beside its own 64-token
    sliding layers). Prompts shorter than the 4 kept tokens, inside the window and past it, each decoding past
    the window while batched, give raw mlx-lm's tokens alone on PROTOCOL.md's layout (each full-attention
    layer mlx-lm's RotatingKVCache(max_kv_size, keep=4))."""
    from mlx_lm.models import cache as mlx_cache

    path, size = (llama_dir, 32) if family == "llama" else (gemma3_w64_dir, 48)
    model, _ = ref.load_model(path)
    assert w.load(path, max_concurrent=4, max_kv_size=size, prefill_step_size=256)["max_concurrent"] == 4
    reqs = [{"id": f"m{i}", "prompt": {"tokens": random_ids(n, 90 + i)}, "params": {"max_tokens": size + 16}}
            for i, n in enumerate((2, 20, size + 13, 150))]
    got = _batched(w, reqs)
    for r in reqs:
        cache = [mlx_cache.RotatingKVCache(max_size=size, keep=4) if type(c) is mlx_cache.KVCache else c
                 for c in mlx_cache.make_prompt_cache(model)]
        want = _mlx_lm_alone(path, r["prompt"]["tokens"], size + 16, cache)
        assert_varied(want, 4, what=f"mlx-lm's windowed output for {r['id']}")
        assert generated_tokens(got[r["id"]]) == want, r["id"]
        assert len(r["prompt"]["tokens"]) + len(want) > size + 8, "it did not decode past the window"


def _continued(prompt, events):
    """The prompt of a follow-up to ``prompt`` answered with ``events``: the messages with the answer and a new
    question, or the tokens with the answer's and a few more."""
    if "messages" in prompt:
        return {"messages": prompt["messages"] + [{"role": "assistant", "content": events[-1]["text"]},
                                                  {"role": "user", "content": "And then?"}]}
    return {"tokens": prompt["tokens"] + generated_tokens(events) + random_ids(5, 10)}


def test_an_image_request_in_the_batch_with_kv_bits(w, tmp_path_factory):
    """Gemma 3 vision with kv_bits (global layers quantized, sliding ones exact): an image question and text
    requests decoded together give what they give alone (``max_concurrent: 1``), and so do their follow-ups,
    which reuse the caches the batch gave back."""
    import numpy as np
    from PIL import Image

    from tests.support.fixtures import build_once
    from tests.support.vlm_fixtures import build_vlm_fixture

    root = tmp_path_factory.mktemp("batch-kv-image")  # a head size of 32: kv_group_size 32 divides it
    path = build_once(root / "vlm-gemma3-head32", lambda tmp: build_vlm_fixture(
        "gemma3", tmp, text_overrides={"head_dim": 32, "query_pre_attn_scalar": 32}))
    img = root / "a.png"
    Image.fromarray(np.random.default_rng(8).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(img)
    image_msg = [{"role": "user", "content": [{"type": "image", "path": str(img)},
                                              {"type": "text", "text": "What is this?"}]}]
    first = [{"id": "image", "prompt": {"messages": image_msg}, "params": {"max_tokens": 12}},
             {"id": "text", "prompt": {"messages": [{"role": "user", "content": "Tell me a story."}]},
              "params": {"max_tokens": 16}},
             {"id": "tokens", "prompt": {"tokens": random_ids(30, 9)}, "params": {"max_tokens": 20}}]
    outs = {}
    for concurrent in (1, 4):
        w.load(path, max_concurrent=concurrent, kv_bits=4, kv_group_size=32)
        one = {r["id"]: w.request({"type": "generate", **r}) for r in first} if concurrent == 1 else _batched(w, first)
        follow = [{"id": f"{r['id']}2", "prompt": _continued(r["prompt"], one[r["id"]]), "params": {"max_tokens": 8}}
                  for r in first]
        two = {r["id"]: w.request({"type": "generate", **r}) for r in follow} if concurrent == 1 else _batched(w, follow)
        outs[concurrent] = {**one, **two}
    for rid, evs in outs[1].items():
        assert_varied(generated_tokens(evs), 3, what=f"the {rid!r} request's output alone")
        assert generated_tokens(outs[4][rid]) == generated_tokens(evs), rid
    assert all(outs[4][f"{r['id']}2"][-1]["cached_tokens"] > 0 for r in first), "the follow-ups reused nothing"

"""Acceptance of the distributed worker (PROTOCOL.md, Distributed): ``python -m worker --ranks 2`` on this
machine (ring backend) gives mlx-lm's tokens, the 1-rank worker's cache figures, tools and images; a cancel
lands within one step; a rank killed or stopped ends the running request with ``rank_lost`` and the worker
with ``fatal``, and no rank is left behind."""

import copy
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.support import reference as ref
from tests.support.client import Worker, generated_tokens
from tests.support.fixtures import fixture_dir
from tests.support.prompts import assert_varied, random_ids

TWO = ["--ranks", "2"]
CONFORMANCE = Path(__file__).resolve().parents[1] / "support" / "conformance"


@pytest.fixture(scope="module")
def ranks2():
    w = Worker(TWO)
    yield w
    w.close()


@pytest.fixture(scope="module")
def single():
    w = Worker()
    yield w
    w.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone too
        return f.read().split(")")[-1].split()[0] != "Z"


def test_ready_reports_the_world(ranks2):
    world = ranks2.ready["ranks"]
    assert world["size"] == 2 and world["backend"] == "ring"
    assert [r["rank"] for r in world["ranks"]] == [0, 1]
    assert world["ranks"][0]["pid"] == ranks2.proc.pid
    assert world["ranks"][1]["pid"] != ranks2.proc.pid and _alive(world["ranks"][1]["pid"])
    assert all(r["memory_bytes"] > 0 for r in world["ranks"])
    assert "distributed" in ranks2.ready["capabilities"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_greedy_tokens_are_mlx_lm_s_over_two_ranks(ranks2, fixtures_root, family):
    path = fixture_dir(family, fixtures_root)
    model = ranks2.load(path)
    split = model["ranks"]
    assert split["parallel"] == "tensor" and len(split["ranks"]) == 2
    full = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    held = [r["weights_bytes"] for r in split["ranks"]]
    assert held[0] == held[1] and held[0] < 0.8 * full, (held, full)  # the layers are halved
    # gemma3_text: a prompt beyond its sliding window (512), so the rotating layers wrap
    for seed, n in ((1, 40), (2, 600 if family == "gemma3_text" else 90)):
        ids = random_ids(n, seed)
        want = ref.generate(path, ids, 24)
        assert_varied(want, 4, what=f"mlx-lm's {family} output")
        evs = ranks2.request({"type": "generate", "id": f"g{seed}", "prompt": {"tokens": ids},
                              "params": {"max_tokens": 24}})
        assert evs[-1]["type"] == "done", evs[-1]
        assert generated_tokens(evs) == want


def test_pipeline_is_refused_where_mlx_lm_has_none(ranks2, llama_dir):
    evs = ranks2.request({"type": "load", "id": "lp", "model_path": str(llama_dir),
                          "options": {"parallel": "pipeline"}})
    assert evs[-1]["type"] == "error" and evs[-1]["code"] == "invalid_params", evs[-1]
    assert "'tensor'" in evs[-1]["message"] and "pipeline" in evs[-1]["message"]
    status = ranks2.request({"type": "status", "id": "st"})[-1]
    assert status["state"] == "empty" and status["ranks"]["size"] == 2


def _chat(w, rid, messages, n=16, **params):
    evs = w.request({"type": "generate", "id": rid, "prompt": {"messages": messages},
                     "params": {"max_tokens": n, **params}})
    assert evs[-1]["type"] == "done", evs[-1]
    return evs


def test_a_follow_up_reuses_what_one_rank_reuses(ranks2, single, gemma3_dir):
    """Two turns past the sliding window: the 2-rank worker answers and reuses exactly as the 1-rank one."""
    out = {}
    for name, w in (("two", ranks2), ("one", single)):
        w.load(gemma3_dir)
        first = [{"role": "user", "content": " ".join(f"w{i}" for i in random_ids(150, 5))}]
        a = _chat(w, f"{name}-a", first)
        second = first + [{"role": "assistant", "content": a[-1]["text"]},
                          {"role": "user", "content": "and then?"}]
        b = _chat(w, f"{name}-b", second)
        out[name] = (generated_tokens(a), generated_tokens(b), b[-2]["cached_tokens"], b[-2]["prompt_tokens"])
    assert_varied(out["one"][0] + out["one"][1], 4, what="the 1-rank worker's answers")
    assert out["two"][2] > 0 and out["two"][2] < out["two"][3]
    assert out["two"] == out["one"]


def test_two_streams_decode_together(ranks2, fixtures_root):
    path = fixture_dir("qwen2", fixtures_root)
    ranks2.load(path, max_concurrent=2)
    ids = {rid: random_ids(30 + 7 * i, 20 + i) for i, rid in enumerate(("s0", "s1"))}
    for rid, p in ids.items():
        ranks2.send({"type": "generate", "id": rid, "prompt": {"tokens": p}, "params": {"max_tokens": 40}})
    for rid, p in ids.items():
        evs = ranks2.collect(rid)
        want = ref.generate(path, p, 40)
        assert_varied(want, 4, what="mlx-lm's output")
        assert generated_tokens(evs) == want
        stats = evs[-2]
        assert stats["batching"] == "on" and stats["concurrent"] == 2, stats


def test_the_kv_ceiling_holds_on_every_rank(ranks2, llama_dir):
    """`kv_memory` over two ranks, each holding half of every token's KV (1 KiB of the llama fixture's 2): a
    request that can never fit is refused on every rank alike; one that fits only alone waits for the other (each
    rank's fit, agreed); both give mlx-lm's tokens."""
    ceiling = (5 + 40 + 255) * 1024  # one row of 45 tokens (+ less than one allocation step), per rank
    ranks2.load(llama_dir, max_concurrent=3, kv_memory=ceiling)
    ids = {"a": random_ids(5, 40), "huge": random_ids(5, 41), "b": random_ids(5, 42)}
    for rid, n in (("a", 40), ("huge", 400), ("b", 16)):
        ranks2.send({"type": "generate", "id": rid, "prompt": {"tokens": ids[rid]}, "params": {"max_tokens": n}})
    huge = ranks2.collect("huge")
    assert [e["type"] for e in huge] == ["error"] and huge[0]["code"] == "out_of_memory", huge
    a, b = ranks2.collect("a"), ranks2.collect("b")
    assert b[0]["seq"] > a[-1]["seq"], "b started beside a"
    assert generated_tokens(a) == ref.generate(llama_dir, ids["a"], 40)
    assert generated_tokens(b) == ref.generate(llama_dir, ids["b"], 16)


def test_a_tool_call_over_two_ranks(ranks2, single, tmp_path):
    from tests.support.tool_fixtures import tool_fixture_dir

    path = tool_fixture_dir("hermes", tmp_path)
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}},
        "required": ["city"], "additionalProperties": False}}}
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    got = {}
    for name, w in (("two", ranks2), ("one", single)):
        w.load(path)
        evs = w.request({"type": "generate", "id": f"t-{name}", "prompt": {
            "messages": ask, "tools": [weather], "tool_choice": "required"}, "params": {"max_tokens": 60}})
        assert evs[-1]["type"] == "done" and evs[-1]["stop_reason"] == "tool_calls", evs[-1]
        got[name] = [(e["call"]["function"], e["tokens"]) for e in evs if e["type"] == "tool_call"]
    assert len(got["one"]) == 1 and got["one"][0][0]["name"] == "get_weather"  # ids are random: not compared
    assert got["two"] == got["one"]


def test_an_image_over_two_ranks(ranks2, single, tmp_path):
    """The vision tower runs whole on every rank (same image, same embeddings); the text model is split."""
    import numpy as np
    from PIL import Image

    from tests.support.vlm_fixtures import vlm_fixture_dir

    path = vlm_fixture_dir("gemma3", tmp_path)
    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(img)
    msg = [{"role": "user", "content": [{"type": "image", "path": str(img)},
                                        {"type": "text", "text": "What is in the picture?"}]}]
    got = {}
    for name, w in (("two", ranks2), ("one", single)):
        info = w.load(path)
        assert info["vision"] is True
        evs = _chat(w, f"i-{name}", msg, 24)
        got[name] = (generated_tokens(evs), evs[-2]["prompt_tokens"])
    assert_varied(got["one"][0], 4, what="the 1-rank worker's image answer")
    assert got["two"] == got["one"]


def test_a_cancel_lands_within_one_step(ranks2, llama_dir):
    ranks2.load(llama_dir)
    ranks2.send({"type": "generate", "id": "c", "prompt": {"tokens": random_ids(20, 9)},
                 "params": {"max_tokens": 400}})  # a cancel missed: it ends by itself, with many late tokens
    for _ in range(5):
        ranks2.wait_for("c", lambda e: e["type"] == "token")
    ack = ranks2.request({"type": "cancel", "id": "cc", "target": "c"})
    assert ack[-1]["cancelled"] is True
    evs = ranks2.collect("c")
    assert evs[-1]["type"] == "done" and evs[-1]["stop_reason"] == "cancelled"
    late = [e for e in evs if e["type"] == "token" and e["seq"] > ack[-1]["seq"]]
    assert len(late) <= 1, late
    ids = random_ids(25, 10)
    want = ref.generate(llama_dir, ids, 12)
    after = ranks2.request({"type": "generate", "id": "after", "prompt": {"tokens": ids},
                            "params": {"max_tokens": 12}})
    assert generated_tokens(after) == want


def _running_with_follower(path, args=()):
    w = Worker([*TWO, *args])
    follower = w.ready["ranks"]["ranks"][1]["pid"]
    w.load(path)
    w.send({"type": "generate", "id": "long", "prompt": {"tokens": random_ids(20, 11)},
            "params": {"max_tokens": 100000}})
    for _ in range(3):
        w.wait_for("long", lambda e: e["type"] == "token")
    return w, follower


def _ends_with_rank_lost(w, follower, within_s):
    t0 = time.monotonic()
    evs = w.collect("long", timeout=within_s + 10)
    assert evs[-1]["type"] == "error" and evs[-1]["code"] == "rank_lost", evs[-1]
    fatal = w.next_event(timeout=within_s + 10)
    assert fatal["type"] == "fatal", fatal
    assert w.proc.wait(timeout=within_s + 10) == 70
    assert time.monotonic() - t0 < within_s + 10
    deadline = time.monotonic() + 10
    while _alive(follower) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(follower), "a rank was left behind"


def test_a_killed_rank_ends_the_request_and_the_worker(llama_dir):
    w, follower = _running_with_follower(llama_dir)
    try:
        os.kill(follower, signal.SIGKILL)
        _ends_with_rank_lost(w, follower, within_s=5)
    finally:
        w.close()


def test_a_stopped_rank_is_given_up_after_the_rank_timeout(llama_dir):
    w, follower = _running_with_follower(llama_dir, ["--rank-timeout", "1"])
    try:
        os.kill(follower, signal.SIGSTOP)
        _ends_with_rank_lost(w, follower, within_s=3)
    finally:
        try:
            os.kill(follower, signal.SIGKILL)
        except ProcessLookupError:
            pass
        w.close()


def test_a_killed_rank_0_takes_the_others_with_it():
    w = Worker(TWO)
    follower = w.ready["ranks"]["ranks"][1]["pid"]
    w.proc.kill()
    w.proc.wait(10)
    deadline = time.monotonic() + 10
    while _alive(follower) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(follower), "rank 1 outlived rank 0"
    w.close()


def test_stdin_closing_ends_every_rank():
    w = Worker(TWO)
    follower = w.ready["ranks"]["ranks"][1]["pid"]
    w.proc.stdin.close()
    assert w.proc.wait(timeout=15) == 0
    assert not _alive(follower)
    w.close()


def _logprobs_under_mlx_lm(path, ids, out, banned=()):
    """Each generated token's log-probability under mlx-lm's unsplit model, given everything before it (with
    the ``banned`` ids' logits lowered by 100, as the request's logit_bias does)."""
    import mlx.core as mx

    model, _ = ref.load_model(path)
    logits = model(mx.array([ids + out]))[0, len(ids) - 1:-1].astype(mx.float32)
    if banned:
        logits[:, mx.array(list(banned))] -= 100
    lps = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return [lps[i, t].item() for i, t in enumerate(out)]


@pytest.mark.parametrize("concurrent", [1, 2])
def test_unseeded_sampling_draws_alike_on_every_rank(ranks2, llama_dir, concurrent):
    """An unseeded sampler draws from each rank's own random key: were they apart, rank 1 would feed the split
    model another token than rank 0 and every later logprob rank 0 reports would be off mlx-lm's."""
    eos = ranks2.load(llama_dir, max_concurrent=concurrent)["eos_token_ids"]
    ids = random_ids(30, 12)
    evs = ranks2.request({"type": "generate", "id": f"u{concurrent}", "prompt": {"tokens": ids},
                          "params": {"max_tokens": 24, "temperature": 1.5, "top_logprobs": 1,
                                     "logit_bias": {str(t): -100 for t in eos}}})  # 24 draws, never cut short
    assert evs[-1]["type"] == "done", evs[-1]
    out = generated_tokens(evs)
    got = [lp["logprob"] for e in evs if e["type"] == "token" for lp in e["logprobs"]]
    assert_varied(out, 8, what="the sampled tokens")
    want = _logprobs_under_mlx_lm(llama_dir, ids, out, eos)
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-3, list(zip(got, want))


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 6}},
          "required": ["a", "b"], "additionalProperties": False}
FEATURES = {  # name: (load options, generate params)
    "logprobs": ({}, {"top_logprobs": 3}),
    "penalties": ({}, {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.3}),
    "logit_bias": ({}, {"logit_bias": {"50": 5.0, "61": -100}}),
    "seeded": ({}, {"temperature": 0.9, "top_p": 0.9, "seed": 7}),
    "json_schema": ({}, {"json_schema": SCHEMA}),
    "stop_string": ({}, {"stop": ["e"]}),
    "kv_bits": ({"kv_bits": 8, "kv_group_size": 32}, {}),
    "max_kv_size": ({"max_kv_size": 24}, {}),
    "draft": ({"draft": True}, {"num_draft_tokens": 3}),
}


@pytest.mark.parametrize("name", list(FEATURES))
def test_features_over_two_ranks_are_one_rank_s(ranks2, single, llama_dir, name):
    """Each feature gives over two ranks what it gives over one (each is checked against mlx-lm alone in its
    own tests); logprobs to float32 noise (the split model sums its halves in another order)."""
    options, params = FEATURES[name]
    if options.pop("draft", None):  # the model as its own draft (whole on every rank): most tokens come from it
        options = {**options, "draft_model_path": str(llama_dir)}
    ids = random_ids(40, 31)
    got = {}
    for label, w in (("two", ranks2), ("one", single)):
        w.load(llama_dir, **options)
        evs = w.request({"type": "generate", "id": f"{name}-{label}", "prompt": {"tokens": ids},
                         "params": {"max_tokens": 30, **params}})
        assert evs[-1]["type"] == "done", evs[-1]
        lps = [(lp["id"], lp["logprob"], [t["id"] for t in lp["top"]])
               for e in evs if e["type"] == "token" for lp in e.get("logprobs") or []]
        drafted = [d for e in evs if e["type"] == "token" for d in e.get("from_draft") or []]
        got[label] = (generated_tokens(evs), evs[-1]["text"], evs[-1]["stop_reason"], lps, drafted)
    one, two = got["one"], got["two"]
    assert_varied(one[0] + [0, 1, 2], 4, what=f"the 1-rank worker's {name} output")
    assert two[:3] == one[:3] and two[4] == one[4]
    assert [(i, top) for i, _, top in two[3]] == [(i, top) for i, _, top in one[3]]
    assert all(abs(a[1] - b[1]) < 1e-4 for a, b in zip(two[3], one[3]))
    if name == "logprobs":
        assert len(one[3]) == len(one[0]) > 0
    if name == "draft":
        assert sum(one[4]) > len(one[4]) / 2, one[4]


def test_a_batched_cancel_lands_within_one_step(ranks2, llama_dir):
    """In the batch a cancel reaches every rank at the next check after it; the other stream runs on."""
    w = ranks2
    w.load(llama_dir, max_concurrent=2)
    keep = random_ids(20, 41)
    w.send({"type": "generate", "id": "k", "prompt": {"tokens": keep}, "params": {"max_tokens": 30}})
    w.send({"type": "generate", "id": "c", "prompt": {"tokens": random_ids(20, 42)},
            "params": {"max_tokens": 400}})
    for _ in range(5):
        w.wait_for("c", lambda e: e["type"] == "token")
    ack = w.request({"type": "cancel", "id": "cc", "target": "c"})
    assert ack[-1]["cancelled"] is True
    evs = w.collect("c")
    assert evs[-1]["stop_reason"] == "cancelled"
    late = [e for e in evs if e["type"] == "token" and e["seq"] > ack[-1]["seq"]]
    assert len(late) <= 1, late
    kept = w.collect("k")
    assert kept[-1]["seq"] > ack[-1]["seq"], "k ended before the cancel: nothing ran on beside it"
    assert generated_tokens(kept) == ref.generate(llama_dir, keep, 30)


def test_the_disk_cache_over_two_ranks(ranks2, llama_dir, tmp_path):
    """With cache_dir each rank keeps its own share of every entry; a new 2-rank worker resumes from them."""
    ids = random_ids(300, 51)
    want = ref.generate(llama_dir, ids, 8)
    reused = []
    for attempt in range(2):
        w = ranks2 if attempt == 0 else Worker(TWO)
        try:
            w.load(llama_dir, cache_dir=str(tmp_path))
            evs = w.request({"type": "generate", "id": f"d{attempt}", "prompt": {"tokens": ids},
                             "params": {"max_tokens": 8}})
            assert generated_tokens(evs) == want
            reused.append(evs[-2]["cached_tokens"])
        finally:
            if w is not ranks2:
                w.close()
            else:
                w.request({"type": "unload", "id": "d-unload"})  # its entry is on disk (written after done)
    assert reused == [0, len(ids) - 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0of2", "rank1of2"]


@pytest.mark.real_model
def test_smollm2_cannot_split_over_two_ranks_and_says_what_works(ranks2, smollm2_dir):
    """SmolLM2-135M has 9 attention heads and 3 KV heads: two ranks cannot split them. The load is refused,
    naming the rank counts that work (3 ranks give mlx-lm's tokens: bench/README.md, Distributed; not run here,
    three ranks on two cores take ~25 s of the suite)."""
    evs = ranks2.request({"type": "load", "id": "l2", "model_path": str(smollm2_dir)})
    assert evs[-1]["type"] == "error" and evs[-1]["code"] == "invalid_params", evs[-1]
    assert "num_attention_heads 9" in evs[-1]["message"] and "works with 3 ranks" in evs[-1]["message"]
    assert ranks2.request({"type": "status", "id": "s-smol"})[-1]["state"] == "empty"


def test_mlx_launch_starts_the_worker_too(llama_dir):
    """``mlx.launch -n 2 ... -m worker``: the ranks find their world in mlx.launch's environment; rank 0 alone
    writes protocol lines. (mlx.launch relays stdin without ever closing it: the host ends with `shutdown`.)"""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = os.path.join(os.path.dirname(sys.executable), "mlx.launch")
    w = Worker(cmd=[launcher, "-n", "2", "--backend", "ring", "-p", str(port), "--", sys.executable, "-m", "worker"])
    try:
        assert w.ready["ranks"]["size"] == 2
        ids = random_ids(30, 61)
        w.load(llama_dir)
        evs = w.request({"type": "generate", "id": "g", "prompt": {"tokens": ids}, "params": {"max_tokens": 8}})
        assert generated_tokens(evs) == ref.generate(llama_dir, ids, 8)
        assert w.request({"type": "shutdown", "id": "bye"})[-1]["type"] == "done"
        assert w.proc.wait(timeout=20) == 0
        assert all(not line.strip() or line.startswith(b"{") for line in w.raw_lines)
    finally:
        if w.proc.poll() is None:
            w.proc.kill()
        w.close()


@pytest.mark.parametrize("parallel", ["tensor", "pipeline"])
def test_a_hybrid_model_in_both_modes(ranks2, single, tmp_path_factory, parallel):
    """Qwen 3.5 (linear-attention and attention layers; mlx-lm has both shard() and pipeline() for it): two
    turns over two ranks give the 1-rank worker's tokens and reuse (its recurrent layers need snapshots)."""
    from tests.support.vlm_fixtures_qwen3 import qwen3_fixture_dir

    path = qwen3_fixture_dir("qwen3_5", tmp_path_factory.mktemp("q35"))
    first = random_ids(70, 71)
    got = {}
    for name, w in (("two", ranks2), ("one", single)):
        info = w.load(path, parallel=parallel)
        if name == "two":
            assert info["ranks"]["parallel"] == parallel
        a = w.request({"type": "generate", "id": f"a-{name}", "prompt": {"tokens": first},
                       "params": {"max_tokens": 16}})
        second = first + generated_tokens(a) + random_ids(20, 72)
        b = w.request({"type": "generate", "id": f"b-{name}", "prompt": {"tokens": second},
                       "params": {"max_tokens": 16}})
        got[name] = (generated_tokens(a), generated_tokens(b), b[-2]["cached_tokens"])
    assert_varied(got["one"][0] + got["one"][1], 6, what="the 1-rank worker's output")
    assert got["one"][2] > 0
    assert got["two"] == got["one"]


def test_a_load_that_fails_on_one_rank_fails_on_all(ranks2, llama_dir, tmp_path):
    """Rank 1 cannot make its cache folder (a file is in the way); rank 0 could load: the load fails on every
    rank with rank 1's error, no rank keeps a model, and the ranks still agree on what comes next."""
    (tmp_path / "rank1of2").write_text("in the way")
    evs = ranks2.request({"type": "load", "id": "bad", "model_path": str(llama_dir),
                          "options": {"cache_dir": str(tmp_path)}})
    assert evs[-1]["type"] == "error" and evs[-1]["code"] == "invalid_params", evs[-1]
    assert evs[-1]["message"].startswith("rank 1: options.cache_dir is not usable"), evs[-1]["message"]
    assert ranks2.request({"type": "status", "id": "s-bad"})[-1]["state"] == "empty"
    ids = random_ids(30, 81)
    ranks2.load(llama_dir)
    evs = ranks2.request({"type": "generate", "id": "g-after", "prompt": {"tokens": ids},
                          "params": {"max_tokens": 12}})
    assert generated_tokens(evs) == ref.generate(llama_dir, ids, 12)


# The conformance suite (tests/process/test_conformance.py runs it against one rank) against two ranks. It runs in
# this file so that one pytest process runs every test of several ranks (ranks waiting in MLX's ring spin a CPU:
# two files of ranks at once on two cores would slow each other and the rest of the suite).
from tests.support.conformance.runner import CaseFailure, Runner, load_cases  # noqa: E402

# Left out: the cases of lines the reader refuses (framing, decoding, ids), answered by rank 0's reader thread
# before any rank sees a request: the same code with one rank or several (test_conformance.py runs them).
READER_ONLY = {"parse_error_json", "parse_error_utf8", "invalid_request_not_object", "invalid_request_no_id",
               "invalid_request_numeric_id", "invalid_request_no_type", "unknown_type", "invalid_params_wrong_type",
               "invalid_params_unknown_field", "invalid_params_out_of_range", "invalid_params_missing_field",
               "invalid_params_cancel_target_type", "invalid_params_image_part", "invalid_params_too_many_stops",
               "invalid_params_two_prompt_kinds", "line_too_long", "line_of_exactly_the_limit_ending_in_crlf",
               "oversized_request_is_answered_with_its_id", "empty_lines_ignored", "crlf_accepted"}
CASES = [c for c in load_cases(sorted(CONFORMANCE.glob("*.jsonl"))) if c["name"] not in READER_ONLY]
# cancelled_prefill_is_resumed prefills 1,500 tokens in chunks of 4, so that the cancel sent at the first progress
# past 40 lands inside the prefill with one rank (~1 s of it left there). Over two ranks a chunk takes 5-110 ms
# here, more the busier the two cores (the whole case: 5-45 s); 400 tokens leave the cancel 0.4-10 s to land in.
SHORTER_PROMPTS = {"cancelled_prefill_is_resumed": 400}


def _over_two_ranks(case: dict) -> dict:
    case = copy.deepcopy(case)
    if case["name"] in SHORTER_PROMPTS:
        sends = [s["send"] for s in case["steps"] if s.get("send", {}).get("type") == "generate"]
        assert [g["prompt"]["tokens"]["$repeat"][1] for g in sends] == [1500, 1500], sends  # the case as written
        for g in sends:
            g["prompt"]["tokens"]["$repeat"][1] = SHORTER_PROMPTS[case["name"]]
    return case


@pytest.fixture(scope="module")
def runner2(llama_dir):
    r = Runner([sys.executable, "-m", "worker", *TWO], str(llama_dir), cwd=str(CONFORMANCE.parents[1]))
    yield r
    r.close()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_conformance_over_two_ranks(runner2, case):
    try:
        runner2.run_case(_over_two_ranks(case))
    except CaseFailure as e:
        pytest.fail(str(e), pytrace=False)

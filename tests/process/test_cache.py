"""Prompt cache through the real worker: follow-ups, several conversations, divergence, cancel, restart."""

import json

import pytest

from tests.support import reference as ref
from tests.support.client import Worker, generated_tokens
from tests.support.prompts import assert_varied, random_ids


def gen(worker, rid, tokens, max_tokens=12, **extra):
    events = worker.request({"type": "generate", "id": rid, "prompt": {"tokens": tokens},
                             "params": {"max_tokens": max_tokens}, **extra})
    assert events[-1]["type"] == "done", events[-1]
    stats = next(e for e in events if e["type"] == "stats")
    return generated_tokens(events), stats, events[-1]


def prompt(seed, n):
    return random_ids(n, seed)


def _common(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_three_turn_conversation(llama_worker, llama_dir):
    llama_worker.request({"type": "cache_clear", "id": "clear3"})
    turn = prompt(1, 40)
    for n in range(3):
        out, stats, done = gen(llama_worker, f"turn{n}", turn)
        want = ref.generate(llama_dir, turn, 12)
        assert_varied(want, what=f"mlx-lm's turn {n}")
        assert out == want, "must equal a cold mlx-lm run"
        if n == 0:
            assert stats["cached_tokens"] == 0 and stats["cache_miss_reason"] == "no_entry"
        else:  # the whole previous turn, its answer included
            assert stats["cached_tokens"] == previous, (stats, previous)
            assert stats.get("cache_miss_reason") is None
            assert done["cached_tokens"] == stats["cached_tokens"]
        previous = len(turn) + len(out)
        turn = turn + out + prompt(n + 5, 15)


def test_messages_follow_up_hits_cache(llama_worker, llama_dir):
    llama_worker.request({"type": "cache_clear", "id": "clear-m"})
    chat = [{"role": "user", "content": "hello there, how are you"}]
    first = llama_worker.request({"type": "generate", "id": "m1", "prompt": {"messages": chat},
                                  "params": {"max_tokens": 8}})
    ids1 = ref.chat_ids(llama_dir, chat)
    assert next(e for e in first if e["type"] == "stats")["prompt_tokens"] == len(ids1)
    stop = [first[-1]["stop_token"]] if first[-1].get("stop_token") is not None else []
    entry = ids1 + generated_tokens(first) + stop  # what m1's entry holds
    chat += [{"role": "assistant", "content": first[-1]["text"]},
             {"role": "user", "content": "and then?"}]
    second = llama_worker.request({"type": "generate", "id": "m2", "prompt": {"messages": chat},
                                   "params": {"max_tokens": 8}})
    stats = next(e for e in second if e["type"] == "stats")
    ids2 = ref.chat_ids(llama_dir, chat)
    assert _common(entry, ids2) >= len(ids1), "the template re-renders the first prompt unchanged"
    assert stats["cached_tokens"] == _common(entry, ids2), (stats, len(ids1), len(entry))


def test_interleaved_conversations(llama_worker, llama_dir):
    llama_worker.request({"type": "cache_clear", "id": "clear-i"})
    a, b = prompt(2, 50), prompt(3, 50)
    assert a[0] != b[0]
    out_a, _, _ = gen(llama_worker, "a1", a)
    out_b, _, _ = gen(llama_worker, "b1", b)
    a2, b2 = a + out_a + prompt(4, 10), b + out_b + prompt(6, 10)
    for rid, p, prev in (("a2", a2, len(a) + len(out_a)), ("b2", b2, len(b) + len(out_b))):
        out, stats, _ = gen(llama_worker, rid, p)
        assert stats["cached_tokens"] == prev, (rid, stats)
        want = ref.generate(llama_dir, p, 12)
        assert_varied(want, what=f"mlx-lm's {rid}")
        assert out == want


def test_divergence_reuses_exactly_the_common_prefix(llama_worker, llama_dir):
    base = prompt(7, 100)
    gen(llama_worker, "d1", base)
    changed = base[:60] + prompt(8, 40)
    assert changed[60] != base[60]
    out, stats, _ = gen(llama_worker, "d2", changed)
    assert stats["cached_tokens"] == 60
    assert stats["cache_miss_reason"] == "prefix_diverged_at 60"
    want = ref.generate(llama_dir, changed, 12)
    assert_varied(want, what="mlx-lm's answer to the changed prompt")
    assert out == want


def test_cache_key_pins_a_conversation(llama_worker):
    llama_worker.request({"type": "cache_clear", "id": "clear-k"})
    p = prompt(9, 30)
    out, _, done = gen(llama_worker, "k1", p, cache_key="alice")
    alice = p + out + ([done["stop_token"]] if done.get("stop_token") is not None else [])  # what her entry holds
    # bob's prompt extends alice's whole entry, yet he only copies it...
    _, stats, _ = gen(llama_worker, "k2", alice + [5, 6], cache_key="bob")
    assert stats["cached_tokens"] == len(alice), "bob copies the prefix he shares with alice's entry"
    # ...so when bob moves on (his key's entry is replaced), alice's conversation is still there
    gen(llama_worker, "k3", prompt(19, 30), cache_key="bob")
    _, stats, _ = gen(llama_worker, "k4", alice + [7, 8], cache_key="alice")
    assert stats["cached_tokens"] == len(alice) and stats.get("cache_miss_reason") is None, \
        "alice's entry is still hers"


def test_status_and_cache_clear(llama_worker):
    gen(llama_worker, "s1", prompt(10, 20))
    status = llama_worker.request({"type": "status", "id": "st"})[-1]
    assert status["cache"]["entries"] >= 1 and status["cache"]["bytes"] > 0
    done = llama_worker.request({"type": "cache_clear", "id": "cc"})[-1]
    assert done["cache"]["entries"] == status["cache"]["entries"]
    status = llama_worker.request({"type": "status", "id": "st2"})[-1]
    assert status["cache"]["entries"] == 0
    _, stats, _ = gen(llama_worker, "s2", prompt(10, 20))
    assert stats["cached_tokens"] == 0 and stats["cache_miss_reason"] == "no_entry"


def test_cancelled_prefill_is_kept(llama_worker, llama_dir):
    worker = llama_worker
    worker.load(llama_dir, prefill_step_size=4)
    try:
        long = prompt(11, 1500)
        worker.send({"type": "generate", "id": "c1", "prompt": {"tokens": long},
                     "params": {"max_tokens": 4}})
        while True:
            ev = worker.next_event()
            if ev["id"] == "c1" and ev["type"] == "progress" and ev["processed"] > 0:
                break
        worker.send({"type": "cancel", "id": "cx", "target": "c1"})
        events = worker.collect("c1")
        assert events[-1]["stop_reason"] == "cancelled"
        processed = max([ev["processed"]] + [e["processed"] for e in events if e["type"] == "progress"])
        out, stats, _ = gen(worker, "c2", long, max_tokens=4)
        assert stats["cached_tokens"] >= processed > 0
        assert out == ref.generate(llama_dir, long, 4)
    finally:
        worker.load(llama_dir)  # the module's worker as the other tests expect it


def test_restart_resumes_from_disk(llama_dir, tmp_path):
    cache_dir = tmp_path / "kv"
    p1 = prompt(12, 80)
    w = Worker()
    try:
        w.load(llama_dir, cache_dir=str(cache_dir))
        out1, _, _ = gen(w, "r1", p1)
        w.request({"type": "shutdown", "id": "bye"})
    finally:
        w.close()
    files = list(cache_dir.rglob("*.safetensors"))
    assert len(files) == 1
    layout_dir = files[0].parent
    # alien, corrupt and truncated files beside the real one must be ignored
    (layout_dir / "alien.json").write_text(json.dumps({"format": 1, "model_id": "other",
                                                       "layout_id": "x", "tokens": p1}))
    (layout_dir / "alien.safetensors").write_bytes(b"junk")
    (layout_dir / "garbage.json").write_text("{not json")
    p2 = p1 + out1 + prompt(13, 10)
    w = Worker()
    try:
        w.load(llama_dir, cache_dir=str(cache_dir))
        out2, stats, _ = gen(w, "r2", p2)
        assert stats["cached_tokens"] == len(p1) + len(out1), stats
        assert out2 == ref.generate(llama_dir, p2, 12)
    finally:
        w.close()
    # now truncate the newest real entry: a new worker must recompute, not crash
    newest = max(layout_dir.glob("[0-9a-f]*.safetensors"), key=lambda f: f.stat().st_mtime)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])
    w = Worker()
    try:
        w.load(llama_dir, cache_dir=str(cache_dir))
        out3, stats, _ = gen(w, "r3", p2)
        assert out3 == ref.generate(llama_dir, p2, 12)
        w.close()
        assert "ignoring" in "".join(w.stderr_lines)
    finally:
        w.close()


def test_layout_change_is_not_reused(llama_dir, tmp_path):
    cache_dir = tmp_path / "kv2"
    p = prompt(14, 40)
    w = Worker()
    try:
        w.load(llama_dir, cache_dir=str(cache_dir))
        gen(w, "o1", p)
        w.load(llama_dir, cache_dir=str(cache_dir), max_kv_size=64)
        _, stats, _ = gen(w, "o2", p + [9])
        assert stats["cached_tokens"] == 0 and stats["cache_miss_reason"] == "options_changed"
    finally:
        w.close()


def test_a_truncated_disk_entry_is_reported_and_removed(llama_dir, tmp_path):
    cache_dir = tmp_path / "pc"
    p1 = prompt(21, 50)
    w = Worker()
    try:
        w.load(llama_dir, cache_dir=str(cache_dir))
        gen(w, "t1", p1)
        w.request({"type": "shutdown", "id": "bye"})
    finally:
        w.close()
    data = next(cache_dir.rglob("*.safetensors"))
    data.write_bytes(data.read_bytes()[:100])
    w = Worker()
    try:
        w.load(llama_dir, cache_dir=str(cache_dir))
        out, stats, _ = gen(w, "t2", p1 + [7, 8])
        assert stats["cached_tokens"] == 0 and stats["cache_miss_reason"] == "disk_entry_unreadable", stats
        assert out == ref.generate(llama_dir, p1 + [7, 8], 12)
        assert not data.exists() and not data.with_suffix(".json").exists()  # removed
    finally:
        w.close()


def test_a_one_token_prompt_has_no_miss_reason(llama_worker):
    gen(llama_worker, "o1", [42, 43, 44])
    _, stats, _ = gen(llama_worker, "o2", [42])
    assert stats["cached_tokens"] == 0 and "cache_miss_reason" not in stats, stats


@pytest.mark.parametrize("concurrent", [1, 2], ids=["alone", "batched"])
def test_the_first_progress_of_a_cached_follow_up_starts_at_cached(llama_dir, concurrent):
    """PROTOCOL.md, generate's events: `processed` counts the cached tokens too, so the first prompt progress
    of a follow-up has `processed == cached` (and `fraction == cached / total`); the last has `total`."""
    w = Worker()
    try:
        w.load(llama_dir, max_concurrent=concurrent, prefill_step_size=16)
        first = prompt(21, 40)
        out, _, done = gen(w, "p1", first, max_tokens=6)
        follow = first + out + prompt(22, 60)
        events = w.request({"type": "generate", "id": "p2", "prompt": {"tokens": follow},
                            "params": {"max_tokens": 4}})
        stats = next(e for e in events if e["type"] == "stats")
        cached = stats["cached_tokens"]
        assert cached >= len(first) + len(out) - 1 > 0, stats
        assert stats.get("batching") == ("on" if concurrent > 1 else None), stats
        progress = [e for e in events if e["type"] == "progress"]
        assert len(progress) >= 2, progress
        assert progress[0] == {**progress[0], "processed": cached, "cached": cached, "total": len(follow),
                               "fraction": round(cached / len(follow), 4)}, progress[0]
        assert progress[-1] == {**progress[-1], "processed": len(follow), "fraction": 1.0}, progress[-1]
        assert all(e["cached"] == cached and e["total"] == len(follow) for e in progress), progress
        steps = [e["processed"] for e in progress]
        assert steps == sorted(steps), steps
    finally:
        w.close()

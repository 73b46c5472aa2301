"""Acceptance: cancel while decoding, while prefilling and while queued; the worker then serves correctly."""

import pytest

from tests.support import reference as ref
from tests.support.client import Worker, generated_tokens
from tests.support.prompts import assert_varied

LONG = {"max_tokens": 100000}


@pytest.fixture(scope="module")
def serving(llama_dir):
    """One worker for the cancels after which it serves on (prompts in chunks of 4 tokens: a long prompt
    has many cancel points)."""
    w = Worker()
    w.load(llama_dir, prefill_step_size=4)
    yield w
    w.close()


def _check_still_serving(worker, path):
    events = worker.request({"type": "generate", "id": "after", "prompt": {"text": "after cancel"},
                             "params": {"max_tokens": 10}})
    want = ref.generate(path, ref.text_ids(path, "after cancel"), 10)
    assert_varied(want, 4, what="mlx-lm's output")
    assert generated_tokens(events) == want


def test_cancel_during_decode(serving, llama_dir):
    worker = serving
    worker.send({"type": "generate", "id": "g", "prompt": {"tokens": [3, 4, 5]}, "params": LONG})
    for _ in range(5):
        worker.wait_for("g", lambda e: e["type"] == "token")
    ack = worker.request({"type": "cancel", "id": "c", "target": "g"})
    assert ack[-1] == {**ack[-1], "type": "done", "cancelled": True}
    events = worker.collect("g")
    assert events[-1]["type"] == "done" and events[-1]["stop_reason"] == "cancelled"
    assert [e for e in events if e["type"] in ("done", "error")] == [events[-1]]
    # the flag is set before the ack is written and checked after every token the request releases: at
    # most the token being released when the cancel landed follows the ack (test_batching.py: the batch)
    late = [e for e in events if e["type"] == "token" and e["seq"] > ack[-1]["seq"]]
    assert len(late) <= 1, late
    _check_still_serving(worker, llama_dir)


def test_cancel_during_prefill(serving, llama_dir):
    worker = serving
    worker.send({"type": "generate", "id": "p", "prompt": {"tokens": [9] * 1800}, "params": LONG})
    first = worker.wait_for("p", lambda e: e["type"] == "progress")
    worker.send({"type": "cancel", "id": "c2", "target": "p"})
    events = [first] + worker.collect("p")
    assert events[-1]["stop_reason"] == "cancelled"
    assert not [e for e in events if e["type"] == "token"], "cancelled before the first token"
    progress = [e for e in events if e["type"] == "progress"]
    assert progress[-1]["processed"] < 1800
    assert worker.collect("c2")[-1]["cancelled"] is True
    _check_still_serving(worker, llama_dir)


def test_rates_are_absent_when_no_token_was_generated(serving):
    """A generate cancelled during prefill (or with max_tokens 0) has no first token: its stats have no
    ttft_s, prompt_tps or generation_tps (not 0s); one token gives ttft_s and prompt_tps, not generation_tps."""
    worker = serving
    worker.send({"type": "generate", "id": "pc", "prompt": {"tokens": [8] * 1800}, "params": LONG})
    worker.wait_for("pc", lambda e: e["type"] == "progress")
    worker.send({"type": "cancel", "id": "c-rates", "target": "pc"})
    events = worker.collect("pc")
    assert worker.collect("c-rates")[-1]["cancelled"] is True
    assert events[-1]["stop_reason"] == "cancelled" and not [e for e in events if e["type"] == "token"]
    rates = ("ttft_s", "prompt_tps", "generation_tps")
    stats = events[-2]
    assert stats["type"] == "stats" and stats["generated_tokens"] == 0, stats
    assert not set(rates) & set(stats), stats
    assert stats["total_s"] > 0 and stats["prompt_tokens"] == 1800, stats
    for n, present in ((0, ()), (1, ("ttft_s", "prompt_tps")), (2, rates)):
        events = worker.request({"type": "generate", "id": f"n{n}", "prompt": {"tokens": [3, 4, 5, n]},
                                 "params": {"max_tokens": n}})
        stats = events[-2]
        assert stats["generated_tokens"] == n and set(rates) & set(stats) == set(present), stats
        assert all(stats[k] > 0 for k in present), stats


def test_cancel_while_queued(serving, llama_dir):
    worker = serving
    worker.send({"type": "generate", "id": "a", "prompt": {"tokens": [3, 4]}, "params": LONG})
    worker.send({"type": "generate", "id": "b", "prompt": {"tokens": [3, 4]}, "params": LONG})
    status = worker.request({"type": "status", "id": "s"})[-1]
    assert "b" in status["queue"] and status["state"] in ("generating", "idle")
    b_events = worker.request({"type": "cancel", "id": "cb", "target": "b"})
    assert b_events[-1]["cancelled"] is True
    b = worker.collect("b")
    assert b == [b[-1]] and b[-1]["stop_reason"] == "cancelled"
    worker.send({"type": "cancel", "id": "ca", "target": "a"})
    assert worker.collect("a")[-1]["stop_reason"] == "cancelled"
    _check_still_serving(worker, llama_dir)


def test_cancel_unknown_or_finished_is_not_an_error(serving):
    llama_worker = serving
    done = llama_worker.request({"type": "cancel", "id": "c", "target": "nope"})[-1]
    assert done["type"] == "done" and done["cancelled"] is False
    llama_worker.request({"type": "generate", "id": "fin", "prompt": {"text": "x"},
                          "params": {"max_tokens": 2}})
    done = llama_worker.request({"type": "cancel", "id": "c3", "target": "fin"})[-1]
    assert done["cancelled"] is False


def test_stdin_eof_exits_quickly(worker, llama_dir):
    import time

    worker.load(llama_dir)
    worker.send({"type": "generate", "id": "g", "prompt": {"tokens": [3]}, "params": LONG})
    worker.wait_for("g", lambda e: e["type"] == "token")
    t = time.monotonic()
    worker.proc.stdin.close()
    assert worker.proc.wait(5) == 0
    assert time.monotonic() - t < 1.5


def test_sigterm_exits_cleanly(worker, llama_dir):
    import signal
    import time

    worker.load(llama_dir)
    worker.send({"type": "generate", "id": "g", "prompt": {"tokens": [3]}, "params": LONG})
    worker.wait_for("g", lambda e: e["type"] == "token")
    t = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(5) == 0
    assert time.monotonic() - t < 1.5
    events = worker.collect("g", timeout=5)
    assert events[-1]["type"] == "done" and events[-1]["stop_reason"] == "cancelled"


def test_shutdown_cancels_queued_work(worker, llama_dir):
    worker.load(llama_dir)
    worker.send({"type": "generate", "id": "g1", "prompt": {"tokens": [3]}, "params": LONG})
    worker.send({"type": "generate", "id": "g2", "prompt": {"tokens": [3]}, "params": LONG})
    worker.wait_for("g1", lambda e: e["type"] == "token")
    worker.send({"type": "shutdown", "id": "bye"})
    assert worker.collect("g2", timeout=10)[-1]["stop_reason"] == "cancelled"
    assert worker.collect("g1", timeout=10)[-1]["stop_reason"] == "cancelled"
    assert worker.collect("bye", timeout=10)[-1]["request"] == "shutdown"
    assert worker.proc.wait(5) == 0

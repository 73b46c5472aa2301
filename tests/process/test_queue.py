"""The queue limit: `ready`'s `limits.max_queue` work requests wait behind a running one; one more is refused at
once with `queue_full` (its id kept), and every queued one is still answered, in order."""

from tests.support.client import Worker


def test_the_queue_holds_max_queue_requests_and_refuses_the_next(llama_dir):
    w = Worker()
    try:
        w.load(llama_dir)
        limit = w.ready["limits"]["max_queue"]
        w.send({"type": "generate", "id": "g", "prompt": {"tokens": [3, 4, 5]}, "params": {"max_tokens": 100000}})
        w.wait_for("g", lambda e: e["type"] == "token")  # it runs: the queue is empty
        w.send({"type": "load", "id": "q0", "model_path": str(llama_dir)})
        for i in range(1, limit):  # queued behind the load (it could change the tokenizer): quick to answer
            w.send({"type": "tokenize", "id": f"q{i}", "text": "a"})
        over = w.request({"type": "tokenize", "id": "over", "text": "a"}, timeout=30)
        assert [(e["type"], e.get("code")) for e in over] == [("error", "queue_full")], over
        assert str(limit) in over[0]["message"]
        status = w.request({"type": "status", "id": "s"})[-1]
        assert status["queue"] == [f"q{i}" for i in range(limit)] and status["running"] == ["g"]
        assert w.request({"type": "cancel", "id": "c", "target": "g"})[-1]["cancelled"] is True
        assert w.collect("g")[-1]["stop_reason"] == "cancelled"
        done = [w.collect(f"q{i}")[-1] for i in range(limit)]
        assert [e["type"] for e in done] == ["done"] * limit and done[-1]["tokens"]
        assert [e["seq"] for e in done] == sorted(e["seq"] for e in done)  # FIFO
        after = w.request({"type": "tokenize", "id": "after", "text": "a"})  # answered at once again
        assert after[-1]["tokens"] == done[-1]["tokens"]
    finally:
        w.close()

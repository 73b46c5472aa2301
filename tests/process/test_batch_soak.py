"""Soak of the batch: 500 generate requests from 8 concurrent clients with random cancels, through one worker
loaded with ``max_concurrent: 8``.

Each client has one request in flight at a time and sends its next one when it ends: mixed prompt lengths
and kinds (tokens, text, chat, a follow-up of its own conversation), greedy and seeded sampling, stop
strings, logprobs, ``max_tokens`` 1-40; a quarter are cancelled (before their first token, or after a few).
Checks: every request gets exactly one terminal event and nothing after it, cancelled ones end
``cancelled``, `seq` is consecutive, the batch really ran several at once, and the worker's RSS does not
grow: measured idle (prompt cache emptied) after a warm-up of the same mix and after each of WINDOWS equal
windows of the run, the lowest of the last three is within 2% of the median of the first three. A leak
raises every later figure (the check catches ~13 KB a request; a request's KV cache kept is megabytes);
a transient bump of one figure (seen: +20 MB once, gone by the next window) moves neither statistic.
"""

import collections
import queue
import random
import statistics
import time

from tests.support.client import TERMINAL, Worker, rss_kb

CLIENTS = 8
WARMUP, REQUESTS, WINDOWS = 120, 500, 5
RSS_GROWTH = 0.02  # most the RSS may grow from the first three idle figures to the last three


class Client:
    def __init__(self, n: int, rng: random.Random):
        self.n, self.rng = n, rng
        self.rid = None
        self.cancel_after = None  # token events before its cancel; None: not cancelled
        self.tokens = 0
        self.history = [rng.randrange(20, 400) for _ in range(rng.randint(5, 60))]

    def request(self, k: int) -> dict:
        rng = self.rng
        self.rid, self.tokens = f"c{self.n}-{k}", 0
        self.cancel_after = rng.choice([0, 1, 3, 6]) if rng.random() < 0.25 else None
        params = {"max_tokens": rng.randint(1, 40)}
        if rng.random() < 0.3:
            params.update(temperature=0.8, seed=rng.randrange(1000), top_p=0.9)
        if rng.random() < 0.15:
            params["stop"] = ["e", "th"]
        if rng.random() < 0.1:
            params["top_logprobs"] = 2
        r = rng.random()
        if r < 0.4:  # a follow-up of this client's conversation: its prompt cache
            self.history += [rng.randrange(20, 400) for _ in range(rng.randint(1, 20))]
            prompt, extra = {"tokens": list(self.history)}, {"cache_key": f"client{self.n}"}
        elif r < 0.7:
            prompt, extra = {"tokens": [rng.randrange(3, 500) for _ in range(rng.randint(1, 200))]}, {}
        elif r < 0.9:
            prompt, extra = {"text": " ".join(rng.choice(["soak", "batch", "é", "中"]) for _ in range(12))}, {}
        else:
            prompt, extra = {"messages": [{"role": "user", "content": f"turn {rng.randrange(9)}"}]}, {}
        return {"type": "generate", "id": self.rid, "prompt": prompt, "params": params, **extra}


class Soak:
    def __init__(self, model_dir, seed=3):
        rng = random.Random(seed)
        self.w = Worker()
        self.w.load(model_dir, max_concurrent=CLIENTS)
        self.clients = [Client(i, random.Random(rng.random())) for i in range(CLIENTS)]
        self.terminal, self.after, self.outcome, self.seqs, self.peers = collections.Counter(), [], {}, [], []
        self.sent, self.by_id = 0, {}

    def start(self, c):
        req = c.request(self.sent)
        self.sent += 1
        self.by_id[req["id"]] = c
        self.w.send(req)
        if c.cancel_after == 0:
            self.w.send({"type": "cancel", "id": f"x-{req['id']}", "target": req["id"]})

    def phase(self, n: int) -> None:
        """n requests, CLIENTS at a time; returns when all have ended (the worker is then idle)."""
        w, last = self.w, self.sent + n
        busy = set()
        for c in self.clients:
            self.start(c)
            busy.add(c.n)
        deadline = time.monotonic() + 900
        while busy:
            assert time.monotonic() < deadline, "stuck"
            try:
                ev = w.next_event(timeout=60)
            except queue.Empty:
                raise AssertionError("no event for 60 s; stderr:\n" + "".join(w.stderr_lines[-20:]))
            self.seqs.append(ev["seq"])
            rid = ev.get("id")
            assert ev["type"] != "fatal", ev
            if rid is None or rid.startswith("x-"):
                assert ev["type"] == "done", ev  # a cancel's ack
                continue
            c = self.by_id[rid]
            if self.terminal[rid]:
                self.after.append((rid, ev["type"]))
            if ev["type"] == "token":
                c.tokens += 1
                if c.cancel_after and c.tokens == c.cancel_after:
                    w.send({"type": "cancel", "id": f"x-{rid}", "target": rid})
            elif ev["type"] == "stats":
                self.peers.append(ev.get("concurrent") or 1)
                assert ev["batching"] == "on", ev
            elif ev["type"] in TERMINAL:
                self.terminal[rid] += 1
                self.outcome[rid] = ev.get("code") or ev.get("stop_reason")
                if c.cancel_after == 0:  # a cancel right behind the request: it cannot have run to its end
                    assert ev.get("stop_reason") == "cancelled", (rid, ev)
                if self.sent < last:
                    self.start(c)
                else:
                    busy.discard(c.n)

    def rss_idle(self) -> int:
        """RSS in the same state after each phase: idle, prompt cache emptied (the median of three reads)."""
        assert self.w.request({"type": "cache_clear", "id": f"cc{self.sent}"})[-1]["type"] == "done"
        reads = []
        for _ in range(3):
            time.sleep(0.1)
            reads.append(rss_kb(self.w.proc.pid))
        return statistics.median(reads)


def test_500_requests_from_8_clients_with_random_cancels(llama_dir):
    s = Soak(llama_dir)
    try:
        s.phase(WARMUP)
        rss = [s.rss_idle()]
        for _ in range(WINDOWS):
            s.phase(REQUESTS // WINDOWS)
            rss.append(s.rss_idle())
        status = s.w.request({"type": "status", "id": "final"})[-1]
    finally:
        s.w.close()
    terminal, after, outcome, seqs, peers = s.terminal, s.after, s.outcome, s.seqs, s.peers
    assert len(terminal) == WARMUP + REQUESTS
    assert set(terminal.values()) == {1}, [r for r, n in terminal.items() if n != 1][:5]
    assert not after, after[:5]
    assert set(outcome.values()) <= {"eos", "max_tokens", "stop_string", "cancelled", "context_full"}, \
        collections.Counter(outcome.values())
    cancelled = sum(1 for code in outcome.values() if code == "cancelled")
    assert cancelled >= 0.1 * len(outcome), cancelled
    assert all(b > a for a, b in zip(seqs, seqs[1:]))  # (cache_clear and status lines are not in it)
    assert max(peers) >= 6 and sum(p >= 4 for p in peers) >= len(peers) // 4, collections.Counter(peers)
    assert status["state"] == "idle" and status["running"] == [] and status["queue"] == []
    first, last = statistics.median(rss[:3]), min(rss[-3:])
    assert last - first <= RSS_GROWTH * first, f"RSS (KB) after the warm-up and after each window: {rss}"
    assert s.w.proc.returncode == 0

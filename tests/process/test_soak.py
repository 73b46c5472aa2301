"""Soak: one worker, a seeded random mix of generates (short), cancels (of active, queued, finished
and unknown ids), loads/unloads, status, tokenize, cache_clear and bad lines, pipelined.

Checks: every request id gets exactly one terminal event and nothing after it; every undecodable
line gets exactly one error (``id: null`` exactly when its id was unreadable); seq is consecutive;
the worker ends alive; its RSS after the run is within 10% of its RSS after a warm-up phase of the
same mix. CI runs ~150 operations; ``bench/reliability/soak.py`` runs 1,000 (bench/reliability/RESULTS.md).
"""

from __future__ import annotations

import collections
import json
import queue
import random
import time

from tests.support.client import TERMINAL, Worker, rss_kb
from tests.process.test_fuzz import classify, gen_line

OPS = {"generate": 40, "cancel": 14, "status": 8, "tokenize": 8, "load": 6, "unload": 2,
       "cache_clear": 4, "bad_line": 18}


class Soak:
    def __init__(self, model_dir, seed=0):
        self.model_dir = str(model_dir)
        self.rng = random.Random(seed)
        self.w = Worker()
        self.n = 0
        self.pending = {}  # id -> kind, awaiting its terminal event
        self.finished = []  # ids that got their terminal
        self.terminal = collections.Counter()  # id -> terminal events seen
        self.after_terminal = []  # (id, type) of events that came after that id's terminal
        self.null_errors = 0
        self.want_null_errors = 0
        self.outcomes = collections.Counter()  # (kind, type/code/stop_reason)
        self.sent = collections.Counter()
        self.kinds = {}
        self.seqs = []
        self.rss_samples = []
        self.long = set()  # long generates: the drain cancels them

    # ---- sending
    def _id(self, kind):
        self.n += 1
        return f"{kind[:3]}{self.n}"

    def send(self, obj):
        self.pending[obj["id"]] = obj["type"]
        self.kinds[obj["id"]] = obj["type"]
        self.sent[obj["type"]] += 1
        self.w.send(obj)

    def op(self, kind):
        rng = self.rng
        if kind == "generate":
            r = rng.random()
            if r < 0.5:
                prompt = {"tokens": [rng.randrange(3, 500) for _ in range(rng.randint(1, 40))]}
            elif r < 0.8:
                prompt = {"text": " ".join(rng.choice(["hello", "world", "soak", "é", "中", "\u2028"])
                                           for _ in range(rng.randint(1, 12)))}
            else:
                prompt = {"messages": [{"role": "user", "content": f"turn {rng.randrange(5)}"}]}
            params = {"max_tokens": rng.randint(0, 12)}
            if rng.random() < 0.3:
                params.update(temperature=0.8, seed=rng.randrange(100), top_k=rng.randint(0, 20))
            if rng.random() < 0.1:
                params["stop"] = ["a", "e"]
            if rng.random() < 0.05:
                params["max_tokens"] = 100000  # a long one: only a cancel (or the drain) ends it
                pass
            rid = self._id("gen")
            if params["max_tokens"] == 100000:
                self.long.add(rid)
            self.send({"type": "generate", "id": rid, "prompt": prompt, "params": params,
                       **({"cache_key": f"k{rng.randrange(3)}"} if rng.random() < 0.2 else {})})
        elif kind == "cancel":
            live = list(self.pending)
            r = rng.random()
            if live and r < 0.6:
                target = rng.choice(live)
            elif self.finished and r < 0.8:
                target = rng.choice(self.finished)
            else:
                target = f"unknown{rng.randrange(10**6)}"
            self.send({"type": "cancel", "id": self._id("can"), "target": target})
        elif kind == "load":
            r = rng.random()
            opts = {}
            path = self.model_dir
            if r < 0.15:
                path = "/nonexistent/soak-model"
            elif r < 0.25:
                opts = {"max_memory": 1024}
            elif r < 0.5:
                opts = {"max_kv_size": rng.choice([32, 64]), "prefill_step_size": rng.choice([4, 16])}
            elif r < 0.6:
                opts = {"cache_max_entries": 0}
            self.send({"type": "load", "id": self._id("load"), "model_path": path, "options": opts})
        elif kind in ("unload", "status", "cache_clear"):
            self.send({"type": kind, "id": self._id(kind)})
        elif kind == "tokenize":
            self.send({"type": "tokenize", "id": self._id("tok"), "text": "tok " * rng.randint(0, 20)})
        elif kind == "bad_line":
            while True:
                _, line = gen_line(rng)
                out = classify(line)
                if out[0] == "error" and line.strip():
                    break  # undecodable lines only (decodable ones could be long generates)
            self.sent["bad_line"] += 1
            if out[2] is None:
                self.want_null_errors += 1
            else:
                rid = out[2]
                assert rid not in self.pending and rid not in self.terminal, rid
                self.pending[rid] = "bad_line"
                self.kinds[rid] = "bad_line"
            self.w.send_raw(line + b"\n")

    # ---- receiving
    def _handle(self, ev):
        self.seqs.append(ev["seq"])
        rid = ev.get("id")
        assert ev["type"] != "fatal", ev
        if rid is None:
            if ev["type"] == "error":
                self.null_errors += 1
            return
        if self.terminal[rid]:
            self.after_terminal.append((rid, ev["type"]))
        if ev["type"] in TERMINAL:
            self.terminal[rid] += 1
            kind = self.kinds.get(rid, "?")
            self.outcomes[(kind, ev.get("code") or ev.get("stop_reason") or "done")] += 1
            if self.pending.pop(rid, None) is not None:
                self.finished.append(rid)

    def poll(self):
        while True:
            try:
                ev = self.w.events.get_nowait()
            except queue.Empty:
                return
            assert ev is not None, "the worker closed stdout:\n" + "".join(self.w.stderr_lines[-20:])
            self._handle(ev)

    def drain(self, timeout=120):
        """Wait for every pending terminal; long generates still running are cancelled first."""
        for rid in [r for r in self.long if r in self.pending]:
            self.send({"type": "cancel", "id": self._id("drain"), "target": rid})
        self.long.clear()
        deadline = time.monotonic() + timeout
        while self.pending:
            assert time.monotonic() < deadline, ("stuck", self.pending)
            try:
                ev = self.w.next_event(timeout=0.5)
            except queue.Empty:
                continue
            self._handle(ev)
        self.poll()

    def phase(self, n_ops):
        kinds, weights = zip(*OPS.items())
        for _ in range(n_ops):
            kind = self.rng.choices(kinds, weights)[0]
            self.op(kind)
            self.poll()
            if len(self.pending) > 12 or self.rng.random() < 0.15:
                self.drain()
            if self.rng.random() < 0.1:
                self.rss_samples.append(rss_kb(self.w.proc.pid))
        self.drain()

    def settle(self):
        """The same end state for both phases: a fresh model, one generate, idle."""
        self.send({"type": "load", "id": self._id("load"), "model_path": self.model_dir})
        self.send({"type": "generate", "id": self._id("gen"), "prompt": {"text": "settle"},
                   "params": {"max_tokens": 4}})
        self.drain()
        time.sleep(0.3)
        return rss_kb(self.w.proc.pid)

    def check(self):
        assert not self.pending, self.pending
        bad = {rid: n for rid, n in self.terminal.items() if n != 1}
        assert not bad, bad
        assert not self.after_terminal, self.after_terminal[:5]
        assert set(self.terminal) == set(self.kinds), set(self.kinds) ^ set(self.terminal)
        assert self.null_errors == self.want_null_errors, (self.null_errors, self.want_null_errors)
        assert self.seqs == list(range(2, 2 + len(self.seqs)))  # 1 was ready
        status = self.w.request({"type": "status", "id": "soak-final-status"})[-1]
        self.seqs.append(status["seq"])
        assert status["engine_alive"] is True


def run_soak(model_dir, n_ops, warmup_ops, seed=0):
    s = Soak(model_dir, seed)
    try:
        t0 = time.monotonic()
        s.phase(warmup_ops)
        rss_warm = s.settle()
        warm_requests = len(s.kinds) + s.want_null_errors
        t1 = time.monotonic()
        s.phase(n_ops)
        rss_end = s.settle()
        t2 = time.monotonic()
        s.check()
        s.w.close()
        assert s.w.proc.returncode == 0
        return {
            "seed": seed, "warmup_ops": warmup_ops, "ops": n_ops,
            "requests": len(s.kinds) + s.want_null_errors, "request_ids": len(s.kinds),
            "main_phase_requests": len(s.kinds) + s.want_null_errors - warm_requests,
            "null_id_errors": s.null_errors, "sent": dict(s.sent),
            "outcomes": {f"{k} -> {v}": n for (k, v), n in sorted(s.outcomes.items())},
            "events": len(s.seqs), "warmup_s": round(t1 - t0, 2), "main_s": round(t2 - t1, 2),
            "rss_after_warmup_kb": rss_warm, "rss_after_run_kb": rss_end,
            "rss_change_pct": round(100 * (rss_end - rss_warm) / rss_warm, 2),
            "rss_max_sampled_kb": max(s.rss_samples + [rss_warm, rss_end]),
        }
    finally:
        s.w.close()


def test_soak(llama_dir):
    figures = run_soak(llama_dir, n_ops=150, warmup_ops=60, seed=7)
    print(json.dumps(figures, indent=1))
    assert figures["main_phase_requests"] >= 150
    assert abs(figures["rss_change_pct"]) <= 10, figures
    # the mix really exercised every kind of operation and outcome
    outcomes = " ".join(figures["outcomes"])
    for needle in ("generate -> cancelled", "cancel -> done", "load -> done", "unload -> done",
                   "bad_line -> invalid_params", "tokenize -> done", "cache_clear -> done"):
        assert needle in outcomes, (needle, figures["outcomes"])

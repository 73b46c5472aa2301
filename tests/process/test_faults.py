"""Faults: a host that stops reading, signals, exceptions inside MLX, a dying engine thread,
out-of-memory on load, and no network ever.

stdin closed in the middle of a generation (exit 0 within ~1 s) is checked by
tests/process/test_cancel.py::test_stdin_eof_exits_quickly and SIGTERM by
tests/process/test_cancel.py::test_sigterm_exits_cleanly; they are not repeated here.

Faults inside the model are injected the way tests/process/test_stdout_guard.py injects prints: a
checkpoint's own ``model_file`` (loaded with trust_remote_code) wraps the llama forward and
raises when the prompt starts with a trigger pair of token ids.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.support.client import ROOT, TERMINAL, Worker, generated_tokens, rss_kb

LONG = {"max_tokens": 100000}

FAULTY = '''
import time
from mlx_lm.models.llama import Model as _Model, ModelArgs

# prompt starting with [401, X] (only prompts hold two tokens in one forward: decoding feeds one)
MARK = 401
RUNTIME, RUNTIME_LATER, SYSTEM_EXIT, KEYBOARD = 402, 403, 404, 405


class Model(_Model):
    countdown = None

    def __call__(self, inputs, *args, **kwargs):
        ids = inputs.reshape(-1).tolist()
        if len(ids) >= 2 and ids[0] == MARK:
            if ids[1] == RUNTIME:
                raise RuntimeError("[metal::malloc] injected MLX failure in prefill")
            if ids[1] == RUNTIME_LATER:
                Model.countdown = 6
            if ids[1] == SYSTEM_EXIT:
                time.sleep(1.0)
                raise SystemExit("injected: the MLX thread exits")
            if ids[1] == KEYBOARD:
                time.sleep(1.0)
                raise KeyboardInterrupt("injected")
        if Model.countdown is not None:
            Model.countdown -= 1
            if Model.countdown == 0:
                Model.countdown = None
                raise RuntimeError("injected MLX failure while decoding")
        return super().__call__(inputs, *args, **kwargs)
'''


@pytest.fixture(scope="module")
def faulty_dir(llama_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("faulty") / "faulty"
    shutil.copytree(llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_file"] = "faulty.py"
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "faulty.py").write_text(FAULTY)
    return d


def _cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _one_terminal(events):
    assert [e for e in events if e["type"] in TERMINAL] == [events[-1]], events[-3:]
    return events[-1]


# ---------------------------------------------------------------- a host that stops reading

class RawWorker:
    """The worker with pipes we read only when we choose to (tests.support.client.Worker always reads)."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "worker"], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.ready = json.loads(self.proc.stdout.readline())

    def send(self, obj):
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def read_until(self, rid, events):
        while True:
            ev = json.loads(self.proc.stdout.readline())
            events.append(ev)
            if ev["id"] == rid and ev["type"] in TERMINAL:
                return ev


def test_host_that_stops_reading_stdout(llama_dir):
    """Start a long generation and flood bad lines, read nothing for ~3 s: the bounded event queue
    fills, the worker stops producing (CPU and RSS flat), then everything arrives in order."""
    w = RawWorker()
    events = []
    try:
        w.send({"type": "load", "id": "l", "model_path": str(llama_dir)})
        w.read_until("l", events)
        w.send({"type": "generate", "id": "g", "prompt": {"tokens": [3, 4, 5]},
                 "params": {**LONG, "top_logprobs": 5}})
        n_bad = 20000

        def flood():  # blocks once the worker stops reading stdin (its reader is blocked too)
            w.proc.stdin.write(b"{bad json\n" * n_bad)
            w.proc.stdin.flush()

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        time.sleep(1.0)
        rss1, cpu1 = rss_kb(w.proc.pid), _cpu_s(w.proc.pid)
        time.sleep(2.0)
        rss2, cpu2 = rss_kb(w.proc.pid), _cpu_s(w.proc.pid)
        assert w.proc.poll() is None
        # paused: the engine and the reader wait on the full queue
        assert rss2 - rss1 < 8 * 1024, (rss1, rss2)
        assert cpu2 - cpu1 < 0.5, (cpu1, cpu2)
        # resume reading: the flood's errors and g's tokens come out in order
        seen_bad = 0
        first_token = None
        while seen_bad < n_bad:
            ev = json.loads(w.proc.stdout.readline())
            events.append(ev)
            if ev["type"] == "error" and ev["id"] is None:
                assert ev["code"] == "parse_error"
                seen_bad += 1
            if ev["id"] == "g" and ev["type"] == "token" and first_token is None:
                first_token = ev
        flooder.join(10)
        w.send({"type": "cancel", "id": "c", "target": "g"})
        w.read_until("g", events)
        w.send({"type": "status", "id": "s"})
        status = w.read_until("s", events)
        assert status["engine_alive"] is True and status["state"] == "idle"
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(2, 2 + len(seqs)))
        g = [e for e in events if e["id"] == "g"]
        types = [e["type"] for e in g]
        assert types[0] == "progress" and types[-2:] == ["stats", "done"]
        assert set(types[1:-2]) <= {"progress", "token"} and "token" in types
        assert _one_terminal(g)["stop_reason"] == "cancelled"
        assert all(len(e["logprobs"]) == len(e["tokens"]) for e in g if e["type"] == "token")
        w.proc.stdin.close()
        assert w.proc.wait(10) == 0
    finally:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


def test_event_queue_is_bounded_in_process():
    """The mechanism itself: with nobody reading the pipe, a producer blocks once the pipe and the
    4096-event queue are full (nothing grows without bound)."""
    from worker.protocol import Error
    from worker.writer import EVENT_QUEUE_SIZE, Writer

    r, wfd = os.pipe()
    writer = Writer(wfd, on_broken=lambda: None)
    writer.start()
    produced = [0]

    def produce():
        for _ in range(10 * EVENT_QUEUE_SIZE):
            writer.put(Error(id=None, code="parse_error", number=-32700, message="x" * 200))
            produced[0] += 1

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    time.sleep(1.0)
    stuck_at = produced[0]
    assert stuck_at < 10 * EVENT_QUEUE_SIZE and writer.q.qsize() == EVENT_QUEUE_SIZE
    time.sleep(0.3)
    assert produced[0] == stuck_at  # blocked, not growing
    total = b""
    with os.fdopen(r, "rb") as rf:
        while total.count(b"\n") < 10 * EVENT_QUEUE_SIZE:
            total += rf.read1(1 << 20)
    t.join(5)
    assert produced[0] == 10 * EVENT_QUEUE_SIZE
    assert [json.loads(x)["seq"] for x in total.splitlines()] == list(range(1, 10 * EVENT_QUEUE_SIZE + 1))


def test_flush_waits_for_the_fatal_line_to_be_written(monkeypatch):
    """The exit path's flush returns only once the last batch (errors, then `fatal`) is on the pipe, even
    when it is called while that batch is being written (CI saw a worker exit 70 with neither)."""
    from worker import writer as W
    from worker.protocol import Error, Fatal

    slow_write = os.write

    def write(fd, data):
        time.sleep(0.5)  # a writer thread the machine schedules late
        return slow_write(fd, data)

    monkeypatch.setattr(W.os, "write", write)
    r, wfd = os.pipe()
    writer = W.Writer(wfd, on_broken=lambda: None)
    writer.start()
    for rid in ("a", "b"):
        writer.put(Error(id=rid, code="internal", number=-32603, message="the worker must exit"))
    writer.put(Fatal(id=None, reason="the engine thread died"))
    deadline = time.monotonic() + 5
    while not writer.closed and time.monotonic() < deadline:  # the batch is encoded, not yet written
        time.sleep(0.01)
    assert writer.closed
    writer.flush(5.0)
    os.close(wfd)
    with os.fdopen(r, "rb") as rf:
        lines = [json.loads(x) for x in rf.read().splitlines()]
    assert [(e["type"], e["id"]) for e in lines] == [("error", "a"), ("error", "b"), ("fatal", None)]


# ---------------------------------------------------------------- signals

def test_sigint_exits_cleanly(worker, llama_dir):
    worker.load(llama_dir)
    worker.send({"type": "generate", "id": "g", "prompt": {"tokens": [3]}, "params": LONG})
    worker.send({"type": "generate", "id": "q", "prompt": {"tokens": [3]}, "params": LONG})
    worker.wait_for("g", lambda e: e["type"] == "token")
    t = time.monotonic()
    worker.proc.send_signal(signal.SIGINT)
    assert worker.proc.wait(5) == 0
    assert time.monotonic() - t < 1.5
    assert _one_terminal(worker.collect("g", timeout=5))["stop_reason"] == "cancelled"
    assert _one_terminal(worker.collect("q", timeout=5))["stop_reason"] == "cancelled"
    assert not any("Traceback" in line for line in worker.stderr_lines), worker.stderr_lines[-10:]


# ---------------------------------------------------------------- exceptions inside MLX / the model

@pytest.fixture(scope="module")
def faulty_worker(faulty_dir):
    w = Worker()
    w.load(faulty_dir, trust_remote_code=True)
    yield w
    w.close()


@pytest.mark.parametrize("trigger,when", [(402, "prefill"), (403, "decode")])
def test_model_exception_fails_only_that_request(faulty_worker, llama_dir, trigger, when):
    w = faulty_worker
    rid = f"boom-{when}"
    w.send({"type": "generate", "id": rid, "prompt": {"tokens": [401, trigger, 7, 8, 9 + trigger]},
            "params": {"max_tokens": 50}})
    w.send({"type": "generate", "id": f"next-{when}", "prompt": {"text": f"after {when}"},
            "params": {"max_tokens": 8}})
    events = w.collect(rid)
    err = _one_terminal(events)
    code = "out_of_memory" if when == "prefill" else "internal"  # MLX's allocator says "[metal::malloc] ..."
    assert err["type"] == "error" and err["code"] == code and "injected" in err["message"], err
    if when == "decode":
        assert generated_tokens(events), "tokens were streamed before the failure"
    after = w.collect(f"next-{when}")
    assert _one_terminal(after)["stop_reason"] == "max_tokens"
    from tests.support import reference as ref
    assert generated_tokens(after) == ref.generate(llama_dir, ref.text_ids(llama_dir, f"after {when}"), 8)
    status = w.request({"type": "status", "id": f"s-{when}"})[-1]
    assert status["engine_alive"] is True and status["state"] == "idle"


# ---------------------------------------------------------------- the engine thread dies

@pytest.mark.parametrize("trigger,exc", [(404, "SystemExit"), (405, "KeyboardInterrupt")])
def test_engine_thread_death_is_fatal(faulty_dir, trigger, exc):
    w = Worker()
    try:
        w.load(faulty_dir, trust_remote_code=True)
        assert w.request({"type": "status", "id": "s0"})[-1]["engine_alive"] is True
        w.send({"type": "generate", "id": "dies", "prompt": {"tokens": [401, trigger, 5]}})
        w.send({"type": "generate", "id": "queued1", "prompt": {"text": "x"}})
        w.send({"type": "tokenize", "id": "queued2", "text": "y"})  # queued: a load is not pending
        w.send({"type": "load", "id": "queued3", "model_path": str(faulty_dir)})
        for i in range(20):  # answered at once while the engine runs (it sleeps 1 s, then dies)
            status = w.request({"type": "status", "id": f"s1-{i}"})[-1]
            if status.get("active") == "dies":
                break
            time.sleep(0.02)
        assert status["engine_alive"] is True and status.get("active") == "dies", status
        assert w.proc.wait(10) == 70
        w.wait_eof()  # the reader thread may still be behind the exited process
        lines = [json.loads(x) for x in w.raw_lines]
        assert lines[-1]["type"] == "fatal" and lines[-1]["id"] is None, lines[-3:]
        assert exc in lines[-1]["reason"]
        terminals = {}
        for ev in lines:
            if ev["type"] in TERMINAL and ev["id"]:
                terminals.setdefault(ev["id"], []).append(ev)
        for rid in ("dies", "queued1", "queued3"):
            assert len(terminals[rid]) == 1 and terminals[rid][0]["code"] == "internal", (rid, terminals.get(rid))
        assert len(terminals["queued2"]) == 1  # tokenize may be answered at once (rule 8)
        assert sum(e["type"] == "fatal" for e in lines) == 1
    finally:
        w.close()


# ---------------------------------------------------------------- out of memory on load

def test_max_memory_smaller_than_the_model(worker, llama_dir):
    err = worker.request({"type": "load", "id": "big", "model_path": str(llama_dir),
                          "options": {"max_memory": 1024}})
    err = _one_terminal(err)
    assert err["type"] == "error" and err["code"] == "out_of_memory" and "max_memory" in err["message"]
    status = worker.request({"type": "status", "id": "s"})[-1]
    assert status["state"] == "empty" and status["engine_alive"] is True
    info = worker.load(llama_dir, max_memory=1 << 30)
    assert info["model_type"] == "llama"
    done = worker.request({"type": "generate", "id": "g", "prompt": {"text": "ok"},
                           "params": {"max_tokens": 3}})[-1]
    assert done["type"] == "done"


# ---------------------------------------------------------------- no network, ever

SITECUSTOMIZE = '''
import socket, sys

print("SITECUSTOMIZE ACTIVE", file=sys.stderr, flush=True)

def _refuse(name):
    def f(*args, **kwargs):
        print(f"NETWORK ATTEMPT {name} {args[1:2] if name.startswith('socket.') else args[:1]!r}",
              file=sys.stderr, flush=True)
        raise OSError(f"network disabled by the test ({name})")
    return f

socket.socket.connect = _refuse("socket.connect")
socket.socket.connect_ex = _refuse("socket.connect_ex")
socket.socket.sendto = _refuse("socket.sendto")
socket.create_connection = _refuse("create_connection")
socket.getaddrinfo = _refuse("getaddrinfo")
socket.gethostbyname = _refuse("gethostbyname")
'''


def test_no_network_ever(llama_dir, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
           # even a host that forgot: the worker must turn these off itself
           "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
    w = Worker(env=env)
    try:
        w.load(llama_dir)
        events = w.request({"type": "generate", "id": "g", "prompt": {
            "messages": [{"role": "user", "content": "hi"}]}, "params": {"max_tokens": 4}})
        assert events[-1]["type"] == "done"
        assert w.request({"type": "tokenize", "id": "t", "text": "hi"})[-1]["type"] == "done"
        for rid, path in (("hub", "org/model"), ("hub2", "HuggingFaceTB/SmolLM2-135M-Instruct"),
                          ("url", "https://huggingface.co/org/model")):
            err = w.request({"type": "load", "id": rid, "model_path": path})[-1]
            assert err["type"] == "error" and err["code"] == "model_not_found", err
        w.load(llama_dir, draft_model_path=str(llama_dir))
        err = w.request({"type": "load_draft", "id": "d", "model_path": "org/draft"})[-1]
        assert err["type"] == "error" and err["code"] == "model_not_found", err
        status = w.request({"type": "status", "id": "s"})[-1]
        assert status["engine_alive"] is True
    finally:
        w.close()
    stderr = "".join(w.stderr_lines)
    assert "SITECUSTOMIZE ACTIVE" in stderr  # the patch was really in the worker process
    assert "NETWORK ATTEMPT" not in stderr, [x for x in w.stderr_lines if "NETWORK" in x]


def test_fatal_is_the_last_line_even_while_the_host_keeps_sending(faulty_dir):
    w = Worker()
    try:
        w.load(faulty_dir, trust_remote_code=True)
        w.send({"type": "generate", "id": "dies", "prompt": {"tokens": [401, 404, 5]}})
        stop = threading.Event()

        def spam():
            i = 0
            while not stop.is_set():
                try:
                    w.send({"type": "status", "id": f"spam{i}"})
                    w.send_raw(b"{bad\n")
                except OSError:
                    return
                i += 1
                time.sleep(0.001)

        threading.Thread(target=spam, daemon=True).start()
        assert w.proc.wait(15) == 70
        stop.set()
        w.wait_eof()
        lines = [json.loads(x) for x in w.raw_lines]
        assert lines[-1]["type"] == "fatal", [(e["type"], e["id"]) for e in lines[-4:]]
    finally:
        w.close()


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "generating"])
def test_stdout_closed_while_idle_exits(llama_dir, busy):
    """PROTOCOL.md, Lifecycle: a host that closes stdout and sends nothing more still sees the worker exit,
    within a few seconds, with nothing to write (idle) as with a generate running (its events have nowhere
    to go: it is cancelled by the exit path)."""
    w = RawWorker()
    try:
        if busy:
            w.send({"type": "load", "id": "l", "model_path": str(llama_dir)})
            w.read_until("l", [])
            w.send({"type": "generate", "id": "g", "prompt": {"tokens": [3, 4, 5]}, "params": LONG})
            while json.loads(w.proc.stdout.readline())["type"] != "token":
                pass
        w.proc.stdout.close()
        t = time.monotonic()
        assert w.proc.wait(10) == 0
        assert time.monotonic() - t < 5
    finally:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


def test_stdout_closed_by_the_host_exits():
    w = RawWorker()
    try:
        w.proc.stdout.close()
        w.send({"type": "status", "id": "s"})  # its answer hits the closed pipe
        assert w.proc.wait(5) == 0
    finally:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()

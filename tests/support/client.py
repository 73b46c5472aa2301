"""A small test host: spawns the real worker process and talks NDJSON to it."""

import json
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = ("done", "error")


def _event_validator():
    """The committed JSON Schema's event part, strict: every event the suite sees must pass it."""
    import jsonschema

    schema = json.loads((ROOT / "schema" / "protocol.schema.json").read_text())
    schema = {**schema, "oneOf": [{"$ref": "#/$defs/Event"}]}
    return jsonschema.Draft202012Validator(schema)


_VALIDATOR = None


def check_event(ev) -> None:
    """Raise AssertionError when an event does not match the schema (a worker bug, or a stale schema)."""
    global _VALIDATOR
    if _VALIDATOR is None:
        _VALIDATOR = _event_validator()
    ev = {k: v for k, v in ev.items() if not k.startswith("_")}  # the benches' own annotations (_t)
    errors = list(_VALIDATOR.iter_errors(ev))
    if errors:
        best = min(errors, key=lambda e: len(list(e.path)))
        raise AssertionError(f"event breaks schema/protocol.schema.json: {best.message} in {ev}")


class Worker:
    def __init__(self, args=(), env=None, cmd=None, cwd=ROOT, validate=True):
        self.validate = validate
        full_env = dict(os.environ)
        full_env.update(env or {})
        base = shlex.split(os.environ["MLX_WORKER_CMD"]) if os.environ.get("MLX_WORKER_CMD") else None
        self.proc = subprocess.Popen(
            cmd or [*(base or [sys.executable, "-m", "worker"]), *args],
            cwd=cwd, env=full_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.events = queue.Queue()
        self.raw_lines = []
        self.stderr_lines = []
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()
        self.pump_err = threading.Thread(target=self._pump_err, daemon=True)
        self.pump_err.start()
        self.backlog = []
        self.ready = self.next_event(timeout=60)
        assert self.ready["type"] == "ready", self.ready

    def _pump(self):
        for line in self.proc.stdout:
            self.raw_lines.append(line)
            self.events.put(json.loads(line))  # a non-JSON line fails the test loudly
        self.events.put(None)

    def wait_eof(self, timeout=10):
        """Wait until every line the worker wrote to stdout and stderr has been read (it closed both)."""
        for t in (self.pump, self.pump_err):
            t.join(timeout)
            assert not t.is_alive(), "the worker's stdout or stderr is still open"

    def _pump_err(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line.decode("utf-8", "replace"))

    def send_raw(self, data: bytes):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, obj):
        self.send_raw((json.dumps(obj) + "\n").encode())

    def next_event(self, timeout=60):
        ev = self.events.get(timeout=timeout)
        if ev is None:
            raise EOFError("worker closed stdout; stderr:\n" + "".join(self.stderr_lines[-20:]))
        if self.validate:
            check_event(ev)
        return ev

    def collect(self, rid, timeout=120):
        """Events of request ``rid`` up to its terminal event (others are kept for later)."""
        out = [e for e in self.backlog if e.get("id") == rid]
        self.backlog = [e for e in self.backlog if e.get("id") != rid]
        deadline = time.monotonic() + timeout
        while not out or out[-1]["type"] not in TERMINAL:
            ev = self.next_event(timeout=max(0.01, deadline - time.monotonic()))
            if ev.get("id") == rid:
                out.append(ev)
            else:
                self.backlog.append(ev)
        return out

    def wait_for(self, rid, pred, timeout=60):
        """The first event of ``rid`` matching ``pred`` (events before it are kept for later)."""
        while True:
            ev = self.next_event(timeout)
            if ev.get("id") == rid and pred(ev):
                return ev
            self.backlog.append(ev)

    def request(self, obj, timeout=120):
        self.send(obj)
        return self.collect(obj["id"], timeout)

    def load(self, path, **options):
        evs = self.request({"type": "load", "id": f"load-{path}", "model_path": str(path),
                            "options": options})
        assert evs[-1]["type"] == "done", evs[-1]
        return evs[-1]["model"]

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for t in (self.pump, self.pump_err):  # what it wrote last is read before the caller looks
            t.join(10)


def rss_kb(pid) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def generated_tokens(events):
    return [t for e in events if e["type"] == "token" for t in e["tokens"]]


def generated_text(events):
    return "".join(e["text"] for e in events if e["type"] == "token")

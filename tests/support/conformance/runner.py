#!/usr/bin/env python3
"""Conformance runner: drives ANY worker command through the cases in tests/support/conformance/*.jsonl.

    python tests/support/conformance/runner.py --worker "python -m worker" --model DIR tests/support/conformance/*.jsonl

Dependency-free (standard library only) so it can check another implementation of the protocol.
The case format is documented in tests/support/conformance/README.md. Exit status 0 when every case passes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TERMINAL = ("done", "error")
DEFAULT_TIMEOUT = 60.0


class CaseFailure(AssertionError):
    pass


# ---------------------------------------------------------------- worker process

class WorkerProc:
    def __init__(self, argv: list[str], cwd: str | None = None):
        self.argv = argv
        self.proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.q: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        self.bad_lines: list[bytes] = []
        self.last_seq = 0
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()
        self.ready = self.next(DEFAULT_TIMEOUT)
        if self.ready is None or self.ready.get("type") != "ready":
            raise CaseFailure(f"first event is not ready: {self.ready!r}\n{self.stderr_tail()}")
        self.last_seq = self.ready.get("seq", 0)

    def _pump(self):
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                self.bad_lines.append(line)
                continue
            self.q.put(ev)
        self.q.put(None)

    def _pump_err(self):
        for line in self.proc.stderr:
            self.stderr.append(line.decode("utf-8", "replace"))
            del self.stderr[:-50]

    def stderr_tail(self, n: int = 10) -> str:
        return "worker stderr (tail):\n" + "".join(self.stderr[-n:])

    def next(self, timeout: float):
        """The next event, None at EOF; raises queue.Empty on timeout."""
        return self.q.get(timeout=max(0.001, timeout))

    def write(self, data: bytes):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self):
        if self.alive():
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------- values, placeholders, matchers

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def subst(value, env: dict):
    """Replace ${VAR} in strings and expand {"$repeat": [x, n]} / {"$concat": [...]} macros."""
    if isinstance(value, str):
        whole = _VAR.fullmatch(value)
        if whole and whole.group(1) in env:
            return env[whole.group(1)]  # "${N}" alone keeps the captured value's JSON type
        def rep(m):
            if m.group(1) not in env:
                raise CaseFailure(f"unknown placeholder ${{{m.group(1)}}}")
            return str(env[m.group(1)])
        return _VAR.sub(rep, value)
    if isinstance(value, list):
        return [subst(v, env) for v in value]
    if isinstance(value, dict):
        if set(value) == {"$repeat"}:
            item, n = subst(value["$repeat"], env)
            return item * n if isinstance(item, str) else [item] * n
        if set(value) == {"$concat"}:
            return "".join(subst(v, env) for v in value["$concat"])
        return {k: subst(v, env) for k, v in value.items()}
    return value


_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
          "array": list, "object": dict, "null": type(None)}


def _type_ok(v, name):
    if name in ("integer", "number") and isinstance(v, bool):
        return False
    return isinstance(v, _TYPES[name])


def match(expected, actual, path="$") -> list[str]:
    """Subset match; returns a list of mismatch descriptions (empty: matches)."""
    if isinstance(expected, dict) and expected and all(k.startswith("$") for k in expected):
        errs = []
        for op, arg in expected.items():
            ok = True
            if op == "$any":
                ok = True
            elif op == "$type":
                names = arg if isinstance(arg, list) else [arg]
                ok = any(_type_ok(actual, n) for n in names)
            elif op in ("$gte", "$gt", "$lte", "$lt"):
                ok = isinstance(actual, (int, float)) and not isinstance(actual, bool) and {
                    "$gte": actual >= arg if isinstance(actual, (int, float)) else False,
                    "$gt": actual > arg if isinstance(actual, (int, float)) else False,
                    "$lte": actual <= arg if isinstance(actual, (int, float)) else False,
                    "$lt": actual < arg if isinstance(actual, (int, float)) else False}[op]
            elif op == "$ne":
                ok = actual != arg
            elif op == "$in":
                ok = actual in arg
            elif op == "$len":
                if not isinstance(actual, (list, str)):
                    ok = False
                else:
                    sub = match(arg, len(actual), path + ".length")
                    errs += sub
            elif op == "$contains":
                ok = isinstance(actual, (list, str)) and arg in actual
            elif op == "$startswith":
                ok = isinstance(actual, str) and actual.startswith(arg)
            elif op == "$each":
                if not isinstance(actual, list):
                    ok = False
                else:
                    for i, item in enumerate(actual):
                        errs += match(arg, item, f"{path}[{i}]")
            elif op == "$not":
                ok = bool(match(arg, actual, path))
            elif op == "$absent":
                ok = True  # handled by the enclosing object
            else:
                errs.append(f"{path}: unknown matcher {op}")
                continue
            if not ok:
                errs.append(f"{path}: {op} {json.dumps(arg)} failed on {json.dumps(actual)[:200]}")
        return errs
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected an object, got {json.dumps(actual)[:200]}"]
        errs = []
        for k, v in expected.items():
            if isinstance(v, dict) and "$absent" in v:
                if (k in actual) == bool(v["$absent"]):
                    errs.append(f"{path}.{k}: expected {'absent' if v['$absent'] else 'present'}")
                continue
            errs += match(v, actual.get(k), f"{path}.{k}")  # missing == null
        return errs
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{path}: expected {json.dumps(expected)[:200]}, got {json.dumps(actual)[:200]}"]
        return [e for i, (x, y) in enumerate(zip(expected, actual)) for e in match(x, y, f"{path}[{i}]")]
    if expected != actual or type(expected) is bool and type(actual) is not bool:
        return [f"{path}: expected {json.dumps(expected)[:200]}, got {json.dumps(actual)[:200]}"]
    return []


def order_regex(pattern: str) -> re.Pattern:
    """"progress+ token* stats? done" -> a regex over space-joined event types."""
    parts = []
    for tok in pattern.split():
        m = re.fullmatch(r"([a-z_|]+)([?*+]?)", tok)
        if not m:
            raise CaseFailure(f"bad order pattern token {tok!r}")
        parts.append(f"(?:(?:{m.group(1)}) ){m.group(2)}")
    return re.compile("".join(parts))


# ---------------------------------------------------------------- running a case

class Case:
    def __init__(self, spec: dict, worker: WorkerProc, env: dict):
        self.spec = spec
        self.w = worker
        self.env = env
        self.events: list[dict] = []      # every event received during this case, in order
        self.sends: dict[str, int] = {}   # id -> number of requests sent with it
        self.req_type: dict[str, str] = {}
        self.eof = False

    # ---- event intake
    def _pull(self, timeout: float) -> bool:
        """Read one event into self.events. False on timeout or EOF."""
        if self.eof:
            return False
        try:
            ev = self.w.next(timeout)
        except queue.Empty:
            return False
        if ev is None:
            self.eof = True
            return False
        self._check_envelope(ev)
        self.events.append(ev)
        return True

    def _check_envelope(self, ev):
        errs = match({"type": {"$type": "string"}, "id": {"$type": ["string", "null"]},
                      "seq": {"$type": "integer"}}, ev)
        if "id" not in ev:
            errs.append("$.id: missing")
        if errs:
            raise CaseFailure(f"malformed event {ev}: {errs}")
        if ev["type"] == "error":
            errs = match({"code": {"$type": "string"}, "number": {"$type": "integer"},
                          "message": {"$type": "string"}}, ev)
            if errs:
                raise CaseFailure(f"malformed error event {ev}: {errs}")
        if ev["seq"] != self.w.last_seq + 1:
            raise CaseFailure(f"seq jumped from {self.w.last_seq} to {ev['seq']}: {ev}")
        self.w.last_seq = ev["seq"]

    def wait_until(self, pred, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0 or (not self._pull(left) and (self.eof or time.monotonic() >= deadline)):
                if pred():
                    return
                raise CaseFailure(f"timed out / EOF waiting for {what}\n{self.w.stderr_tail()}")

    def of(self, rid):
        """The events of ``rid``: those with its id, and the error refusing a line with that id while a request
        with it was still in progress (``id`` null, ``refused_id`` naming it; PROTOCOL.md, Errors)."""
        return [e for e in self.events if e.get("id") == rid or (rid is not None and e.get("refused_id") == rid)]

    def terminals(self, rid):
        return [e for e in self.of(rid) if e["type"] in TERMINAL]

    # ---- steps
    def run(self):
        for i, step in enumerate(self.spec["steps"]):
            try:
                self.step(step)
            except CaseFailure as e:
                raise CaseFailure(f"step {i} {json.dumps(step)[:160]}: {e}") from None
        self.finish()

    def step(self, step: dict):
        timeout = step.get("timeout", DEFAULT_TIMEOUT)
        if "send" in step:
            obj = subst(step["send"], self.env)
            self._register(obj.get("id"), obj.get("type"))
            self.w.write((json.dumps(obj) + "\n").encode())
        elif "raw" in step or "raw_hex" in step:
            data = (bytes.fromhex(step["raw_hex"]) if "raw_hex" in step
                    else subst(step["raw"], self.env).encode())
            if step.get("id"):
                self._register(step["id"], step.get("request_type"))
            self.w.write(data + (b"\n" if step.get("newline", True) else b""))
        elif "wait" in step:
            spec = subst(step["wait"], self.env)
            rid = spec.get("id")
            want = {k: v for k, v in spec.items()}
            self.wait_until(lambda: any(not match(want, e) for e in self.events), timeout,
                            f"an event matching {json.dumps(want)}")
        elif "await" in step:
            ids = step["await"] if isinstance(step["await"], list) else [step["await"]]
            ids = [subst(i, self.env) for i in ids]
            self.wait_until(lambda: all(len(self.terminals(i)) >= self.sends.get(i, 1) for i in ids),
                            timeout, f"terminal events of {ids}")
        elif "expect" in step:
            self.expect(subst(step["expect"], self.env))
        elif "capture" in step:
            self.capture(subst(step["capture"], self.env))
        elif "make_model" in step:
            self.make_model(subst(step["make_model"], self.env))
        elif "expect_no_file" in step:
            p = subst(step["expect_no_file"], self.env)
            if os.path.exists(p):
                raise CaseFailure(f"{p} exists")
        elif "expect_ready" in step:
            errs = match(subst(step["expect_ready"], self.env), self.w.ready, "ready")
            if errs:
                raise CaseFailure("; ".join(errs))
        elif "close_stdin" in step:
            self.w.proc.stdin.close()
        elif "expect_exit" in step:
            self.wait_until(lambda: self.eof, timeout, "stdout to close")
            try:
                rc = self.w.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                raise CaseFailure("worker did not exit") from None
            if rc != step["expect_exit"]:
                raise CaseFailure(f"exit status {rc}, expected {step['expect_exit']}\n{self.w.stderr_tail()}")
        elif "sleep" in step:
            time.sleep(step["sleep"])
        else:
            raise CaseFailure(f"unknown step {step}")

    def _register(self, rid, rtype):
        if isinstance(rid, str):
            self.sends[rid] = self.sends.get(rid, 0) + 1
            self.req_type.setdefault(rid, rtype)

    def expect(self, spec: dict):
        rid = spec.get("id")
        evs = self.of(rid)
        if rid is not None and spec.get("await", True):
            self.wait_until(lambda: len(self.terminals(rid)) >= self.sends.get(rid, 1),
                            spec.get("timeout", DEFAULT_TIMEOUT), f"terminal event of {rid!r}")
            evs = self.of(rid)
        errs: list[str] = []
        types = [e["type"] for e in evs]
        if rid is None:
            evs = [e for e in evs if e["type"] == "error"]
        terms = [e for e in evs if e["type"] in TERMINAL]
        if "terminal" in spec:
            if len(terms) != 1:
                errs.append(f"expected exactly one terminal event, got {len(terms)}: {terms}")
            else:
                errs += match(spec["terminal"], terms[0], "terminal")
        if "terminals" in spec:
            errs += match(spec["terminals"], terms, "terminals")
        if "codes" in spec:
            codes = [e.get("code") for e in terms if e["type"] == "error"]
            if codes != spec["codes"]:
                errs.append(f"error codes {codes}, expected {spec['codes']}")
        if "order" in spec:
            if not order_regex(spec["order"]).fullmatch("".join(t + " " for t in types)):
                errs.append(f"event order {types} does not match {spec['order']!r}")
        for t, m in spec.get("each", {}).items():
            for e in (x for x in evs if x["type"] == t):
                errs += match(m, e, f"{t}#{e['seq']}")
        for t, m in spec.get("first", {}).items():
            sel = [x for x in evs if x["type"] == t]
            errs += match(m, sel[0], f"first {t}") if sel else [f"no {t} event"]
        for t, m in spec.get("last", {}).items():
            sel = [x for x in evs if x["type"] == t]
            errs += match(m, sel[-1], f"last {t}") if sel else [f"no {t} event"]
        for t, m in spec.get("count", {}).items():
            errs += match(m, sum(1 for x in evs if x["type"] == t), f"count({t})")
        if "before" in spec:  # terminal of a arrives before terminal of b
            a, b = spec["before"]
            ta, tb = self.terminals(a), self.terminals(b)
            if not ta or not tb or ta[0]["seq"] > tb[0]["seq"]:
                errs.append(f"terminal of {a!r} does not precede terminal of {b!r}")
        if "tokens_total" in spec:
            n = sum(len(e.get("tokens", [])) for e in evs if e["type"] == "token")
            errs += match(spec["tokens_total"], n, "tokens_total")
        if errs:
            raise CaseFailure("; ".join(errs) + "\nevents: " + json.dumps(evs)[:1500])

    def capture(self, spec: dict):
        rid = spec["from"]
        self.wait_until(lambda: self.terminals(rid), DEFAULT_TIMEOUT, f"terminal event of {rid!r}")
        value = self.terminals(rid)[-1]
        if "event" in spec:  # the last event of that type instead of the terminal one
            value = [e for e in self.of(rid) if e["type"] == spec["event"]][-1]
        for part in spec.get("field", "text").split("."):
            value = value.get(part) if isinstance(value, dict) else value[int(part)]
        if "slice" in spec:
            value = value[spec["slice"][0]:spec["slice"][1]]
        if "until" in spec:
            pos = value.find(spec["until"])
            if pos < 0:
                raise CaseFailure(f"{spec['until']!r} not in {value!r}")
            value = value[:pos]
        if spec.get("json"):
            value = json.dumps(value)
        if value in ("", None) and not spec.get("allow_empty"):
            raise CaseFailure(f"captured an empty value for {spec['var']}")
        self.env[spec["var"]] = value

    def make_model(self, spec: dict):
        dst = Path(self.env["TMP"]) / spec["name"]
        shutil.copytree(spec.get("from", self.env["MODEL"]), dst)
        if "patch_config" in spec:
            cfg = json.loads((dst / "config.json").read_text())
            cfg.update(spec["patch_config"])
            (dst / "config.json").write_text(json.dumps(cfg))
        for name, text in spec.get("write", {}).items():
            (dst / name).write_text(text)
        for name in spec.get("delete", []):
            (dst / name).unlink()
        for name in spec.get("truncate", []):
            data = (dst / name).read_bytes()
            (dst / name).write_bytes(data[: len(data) // 2])
        self.env[spec.get("var", spec["name"].upper())] = str(dst)

    # ---- the invariants every case gets for free
    def finish(self):
        pending = lambda: [i for i, n in self.sends.items() if len(self.terminals(i)) < n]  # noqa: E731
        self.wait_until(lambda: not pending(), DEFAULT_TIMEOUT, f"terminal events of {pending()}")
        # anything still in flight for our ids (e.g. a late extra event) gets a short grace period
        while self._pull(0.05):
            pass
        if self.w.bad_lines:
            raise CaseFailure(f"non-JSON lines on stdout: {self.w.bad_lines[:3]}")
        for rid, n in self.sends.items():
            evs = self.of(rid)
            terms = [e for e in evs if e["type"] in TERMINAL]
            if len(terms) != n:
                raise CaseFailure(f"{rid!r}: {n} request(s) sent, {len(terms)} terminal event(s)")
            if n != 1:
                continue
            if evs[-1]["type"] not in TERMINAL:
                raise CaseFailure(f"{rid!r}: events after the terminal event: {evs}")
            if self.req_type.get(rid) == "generate":
                types = " ".join(e["type"] for e in evs)
                if not re.fullmatch(r"(progress )*(token )*(stats )?(done|error)", types):
                    raise CaseFailure(f"{rid!r}: bad generate event order: {types}")
                done = evs[-1]
                if done["type"] == "done":
                    concat = "".join(e["text"] for e in evs if e["type"] == "token")
                    if (done.get("text") or "") != concat:
                        raise CaseFailure(f"{rid!r}: done.text {done.get('text')!r} != token texts {concat!r}")
                    if done.get("stop_reason") is None:
                        raise CaseFailure(f"{rid!r}: generate done without stop_reason")


# ---------------------------------------------------------------- files and main

def load_cases(paths) -> list[dict]:
    cases = []
    for p in paths:
        for n, line in enumerate(Path(p).read_text().splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("//"):
                continue
            case = json.loads(line)
            case.setdefault("name", f"{Path(p).stem}:{n}")
            case["_file"] = f"{p}:{n}"
            cases.append(case)
    return cases


class Runner:
    """Runs cases in order. Cases share one worker unless they ask for a fresh one
    ("fresh": true or "worker_args"), or the previous case ended it."""

    def __init__(self, worker_cmd: list[str], model: str, cwd: str | None = None):
        self.cmd = worker_cmd
        self.model = model
        self.cwd = cwd
        self.shared: WorkerProc | None = None

    def run_case(self, case: dict):
        fresh = case.get("fresh") or case.get("worker_args")
        with tempfile.TemporaryDirectory(prefix="conf-") as tmp:
            env = {"MODEL": self.model, "TMP": tmp}
            if fresh:
                w = WorkerProc(self.cmd + list(case.get("worker_args", [])), self.cwd)
            else:
                if self.shared is None or not self.shared.alive():
                    self.shared = WorkerProc(self.cmd, self.cwd)
                w = self.shared
            try:
                Case(case, w, env).run()
                if not fresh and case.get("steps") and any("expect_exit" in s for s in case["steps"]):
                    self.shared = None
            except BaseException:
                # a failed case may leave work running: never reuse its worker
                w.close()
                if w is self.shared:
                    self.shared = None
                raise
            finally:
                if fresh:
                    w.close()

    def close(self):
        if self.shared:
            self.shared.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", required=True, help="worker command line, e.g. 'python -m worker'")
    ap.add_argument("--model", required=True, help="tiny model dir (python -m tests.support.fixtures llama DIR)")
    ap.add_argument("-k", default=None, help="only cases whose name contains this")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    cases = [c for c in load_cases(args.files) if not args.k or args.k in c["name"]]
    runner = Runner(shlex.split(args.worker), str(Path(args.model).resolve()))
    failed = 0
    t0 = time.monotonic()
    try:
        for case in cases:
            t = time.monotonic()
            try:
                runner.run_case(copy.deepcopy(case))
                print(f"ok   {case['name']} ({time.monotonic() - t:.2f}s)")
            except (CaseFailure, OSError) as e:
                failed += 1
                print(f"FAIL {case['name']} [{case['_file']}]\n     {e}")
    finally:
        runner.close()
    print(f"{len(cases) - failed}/{len(cases)} passed in {time.monotonic() - t0:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""asyncio client for the mlx-worker protocol (same features as host_examples/node/worker_client.js).

    async with AsyncWorker() as w:
        await w.load(path)
        async for ev in w.generate({"text": "hi"}, {"max_tokens": 20}): ...
"""
from __future__ import annotations

import asyncio
import itertools
import json
import sys
from collections import deque

TERMINAL = ("done", "error")


class WorkerError(RuntimeError):
    def __init__(self, message, stderr_tail=(), event=None):
        super().__init__(message)
        self.stderr_tail, self.event = list(stderr_tail), event


class AsyncWorker:
    def __init__(self, cmd=(sys.executable, "-m", "worker"), cwd=None, restart=True, ready_timeout=120):
        self.cmd, self.cwd, self.restart, self.ready_timeout = list(cmd), cwd, restart, ready_timeout
        self.proc = None
        self.ready = None
        self.streams: dict[str, asyncio.Queue] = {}
        self.stderr_tail: deque[str] = deque(maxlen=20)
        self.restarts = 0
        self._ids = itertools.count(1)
        self._closing = False
        self._tasks = []

    async def start(self):
        self._closing = False
        self.proc = await asyncio.create_subprocess_exec(
            *self.cmd, cwd=self.cwd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, limit=64 * 1024 * 1024)
        self.stderr_tail.clear()
        self._tasks = [asyncio.create_task(self._read_err(self.proc))]
        line = await asyncio.wait_for(self.proc.stdout.readline(), self.ready_timeout)
        if not line:
            await self.proc.wait()
            raise self._crash("exited before ready")
        self.ready = json.loads(line)
        self._tasks.append(asyncio.create_task(self._read(self.proc)))
        return self.ready

    def _crash(self, what):
        tail = "\n".join(self.stderr_tail)
        return WorkerError(f"worker {what}" + (f"; stderr tail:\n{tail}" if tail else ""), self.stderr_tail)

    async def _read_err(self, proc):
        async for line in proc.stderr:
            self.stderr_tail.append(line.decode("utf-8", "replace").rstrip("\n"))

    async def _read(self, proc):
        async for line in proc.stdout:
            ev = json.loads(line)
            q = self.streams.get(ev.get("id"))
            if q is not None:
                q.put_nowait(ev)
                if ev["type"] in TERMINAL:
                    self.streams.pop(ev["id"], None)
        rc = await proc.wait()
        await asyncio.sleep(0.05)  # let the stderr reader finish
        err = self._crash(f"exited (status {rc})")
        for q in self.streams.values():
            q.put_nowait(err)
        self.streams.clear()
        if not self._closing and self.restart:
            self.restarts += 1
            await self.start()

    async def request(self, req: dict):
        """Async generator of the request's events, ending with its terminal event."""
        rid = req.get("id") or f"r{next(self._ids)}"
        # type and id first: the error of a line over the size limit then still names the request
        req = {"type": req.get("type"), "id": rid, **{k: v for k, v in req.items() if k not in ("type", "id")}}
        q: asyncio.Queue = asyncio.Queue()
        self.streams[req["id"]] = q
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        await self.proc.stdin.drain()  # backpressure: waits while the pipe is full
        while True:
            ev = await q.get()
            if isinstance(ev, Exception):
                raise ev
            yield ev
            if ev["type"] in TERMINAL:
                return

    async def result(self, req: dict):
        ev = None
        async for ev in self.request(req):
            pass
        if ev["type"] == "error":
            raise WorkerError(f"{ev['code']}: {ev['message']}", event=ev)
        return ev

    def generate(self, prompt, params=None, **extra):
        return self.request({"type": "generate", "prompt": prompt, "params": params or {}, **extra})

    def chat(self, messages, tools=None, tool_choice="auto", template_kwargs=None, params=None, **extra):
        """A chat turn's events (``token`` with ``channel`` for reasoning models, ``tool_call``, ...)."""
        prompt = {"messages": messages}
        if tools:
            prompt.update(tools=tools, tool_choice=tool_choice)
        if template_kwargs:
            prompt["template_kwargs"] = template_kwargs
        return self.generate(prompt, params, **extra)

    async def load(self, path, **options):
        return await self.result({"type": "load", "model_path": str(path), "options": options})

    async def cancel(self, target):
        return await self.result({"type": "cancel", "target": target})

    async def close(self, timeout=5):
        if not self.proc or self.proc.returncode is not None:
            return
        self._closing = True
        try:
            self.proc.stdin.write(b'{"type":"shutdown","id":"__shutdown"}\n')
            self.proc.stdin.close()
            await asyncio.wait_for(self.proc.wait(), timeout)
        except (asyncio.TimeoutError, ConnectionError):
            self.proc.kill()
            await self.proc.wait()
        for t in self._tasks:
            t.cancel()

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc):
        await self.close()

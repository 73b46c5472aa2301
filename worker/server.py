"""Threads, queue, dispatch, cancellation and shutdown.

Three threads: the reader (stdin -> requests; answers control requests at once), the engine
(the only thread that touches MLX; runs work requests FIFO) and the writer (events -> stdout).
"""

import collections
import logging
import threading
import traceback
from dataclasses import dataclass, field
from typing import BinaryIO, Optional

from . import engine
from .protocol import (
    DEFAULT_MAX_LINE_BYTES, CacheClear, CacheStats, Cancel, Done, Error, Fatal, Generate, Load,
    LoadDraft, Shutdown, Status, Tokenize, TooLong, Unload, WorkerError, decode_request, read_lines,
)
from .writer import Writer

log = logging.getLogger("worker")

MAX_QUEUE = 256
EOF_EXIT_S = 0.8


@dataclass
class Job:
    req: object
    cancel: threading.Event = field(default_factory=threading.Event)


class Server:
    def __init__(self, out_fd: int, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES):
        self.max_line_bytes = max_line_bytes
        self.writer = Writer(out_fd, on_broken=self._stdout_broken)
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)
        self.queue = collections.deque()
        self.live = {}  # id -> Job, for every request not yet answered
        self.active: Optional[Job] = None
        self.kit = None
        self.exiting = threading.Event()
        self.exit_code = 0
        self.shutdown_job: Optional[Job] = None
        self.engine_idle = threading.Event()  # set when no job runs and its cache is persisted
        self.engine_idle.set()
        self.engine_thread = threading.Thread(target=self._engine_loop, name="engine", daemon=True)

    # ------------------------------------------------------------ plumbing

    def emit(self, event) -> None:
        self.writer.put(event)

    def error(self, rid, exc: WorkerError) -> None:
        self.emit(Error(id=rid, code=exc.code, number=exc.number, message=exc.message))

    def serve(self, stdin: BinaryIO, ready_event) -> int:
        self.writer.start()
        self.emit(ready_event)
        self.engine_thread.start()
        reader = threading.Thread(target=self._read_loop, args=(stdin,), name="reader", daemon=True)
        reader.start()
        self.exiting.wait()
        return self._finish()

    def request_exit(self, code: int = 0) -> None:
        self.exit_code = code
        self.exiting.set()

    def _stdout_broken(self) -> None:
        log.error("stdout is closed: the host is gone; exiting")
        self.request_exit(0)

    def _finish(self) -> int:
        """Cancel everything, let the engine end its request, answer shutdown, flush, exit."""
        self._cancel_all()
        # a shutdown request waits for the running request and its cache write; EOF waits < 1 s
        self.engine_idle.wait(60.0 if self.shutdown_job else EOF_EXIT_S)
        if self.shutdown_job is not None:
            self.emit(Done(id=self.shutdown_job.req.id, request="shutdown"))
        self.writer.flush(0.5)
        return self.exit_code

    def _cancel_all(self) -> None:
        with self.lock:
            queued = list(self.queue)
            self.queue.clear()
            if self.active is not None:
                self.active.cancel.set()
        for job in queued:
            self._finish_job(job, Done(id=job.req.id, request=_kind(job.req), stop_reason="cancelled"))

    def _finish_job(self, job: Job, event) -> None:
        with self.lock:
            self.live.pop(job.req.id, None)
        self.emit(event)

    # ------------------------------------------------------------ reader side

    def _read_loop(self, stdin: BinaryIO) -> None:
        try:
            for line in read_lines(stdin, self.max_line_bytes):
                if isinstance(line, TooLong):
                    self.error(None, WorkerError(
                        "line_too_long",
                        f"the line had {line.size} bytes; the limit is {self.max_line_bytes}; skipped"))
                    continue
                if not line.strip():
                    continue  # blank lines are allowed as keep-alives
                try:
                    req = decode_request(line)
                except WorkerError as exc:
                    self.error(getattr(exc, "request_id", None), exc)
                    continue
                except Exception as exc:  # decode_request promises WorkerError only; never stop reading
                    traceback.print_exc()
                    self.error(None, WorkerError("parse_error", f"unreadable line: {type(exc).__name__}"))
                    continue
                try:
                    self._dispatch(req)
                except WorkerError as exc:
                    self.error(req.id, exc)
                except Exception as exc:  # a bug: report it, keep serving
                    traceback.print_exc()
                    self.error(req.id, WorkerError("internal", f"{type(exc).__name__}: {exc}"))
        except Exception:
            traceback.print_exc()
        log.info("stdin closed; exiting")
        self.request_exit(0)

    def _dispatch(self, req) -> None:
        if self.exiting.is_set():
            raise WorkerError("shutting_down", "the worker is shutting down")
        with self.lock:
            if req.id in self.live:
                raise WorkerError(
                    "invalid_request",
                    f"id {req.id!r} belongs to a request still in progress; this duplicate was refused")
            job = Job(req)
            if isinstance(req, Cancel):
                self.emit(self._cancel(req))
                return
            if isinstance(req, Status):
                self.emit(self._status(req))
                return
            if isinstance(req, Shutdown):
                self.shutdown_job = job
                self.live[req.id] = job
                self.exiting.set()
                return
            if isinstance(req, Tokenize) and self._tokenize_now():
                kit = self.kit
            else:
                if len(self.queue) >= MAX_QUEUE:
                    raise WorkerError("queue_full", f"{MAX_QUEUE} requests are already queued")
                self.live[req.id] = job
                self.queue.append(job)
                self.work.notify()
                return
        self.emit(engine.tokenize(kit, req))

    def _tokenize_now(self) -> bool:
        """Tokenize is answered at once unless a load/unload before it could change the model."""
        if self.kit is None:
            return False
        pending = list(self.queue) + ([self.active] if self.active else [])
        return not any(isinstance(j.req, (Load, Unload)) for j in pending)

    def _cancel(self, req: Cancel) -> Done:
        target = self.live.get(req.target)
        found = False
        if target is not None and target is not self.shutdown_job:
            found = True
            target.cancel.set()
            if target in self.queue:
                self.queue.remove(target)
                self.live.pop(req.target, None)
                self.emit(Done(id=req.target, request=_kind(target.req), stop_reason="cancelled"))
        return Done(id=req.id, request="cancel", cancelled=found)

    def _status(self, req: Status) -> Done:
        if self.active is None:
            state = "idle" if self.kit is not None else "empty"
        else:
            state = {Load: "loading", Generate: "generating"}.get(type(self.active.req), "busy")
        return Done(
            id=req.id, request="status", state=state,
            model=self.kit.info if self.kit is not None else None,
            draft=self.kit.draft.info if self.kit is not None and self.kit.draft else None,
            active=self.active.req.id if self.active else None,
            queue=[j.req.id for j in self.queue],
            engine_alive=self.engine_thread.is_alive(),
            cache=CacheStats(**self.kit.cache.stats()) if self.kit is not None else None,
        )

    # ------------------------------------------------------------ engine side

    def _engine_loop(self) -> None:
        try:
            self._engine_jobs()
        except BaseException as exc:  # the MLX thread is gone: say so, then exit non-zero
            traceback.print_exc()
            reason = f"the engine thread died: {type(exc).__name__}: {exc}"
            with self.lock:
                self.exit_code = 70
                self.exiting.set()  # no new work from here on
                lost = list(self.live.values())
                self.live.clear()
                self.queue.clear()
                self.shutdown_job = None
            for job in lost:
                self.emit(Error(id=job.req.id, code="internal", number=-32603,
                                message=f"the worker must exit: {reason}"))
            self.emit(Fatal(id=None, reason=reason))
            self.engine_idle.set()

    def _engine_jobs(self) -> None:
        while True:
            with self.work:
                while not self.queue:
                    self.work.wait()
                job = self.queue.popleft()
                self.active = job
                self.engine_idle.clear()
            event = self._run(job)
            with self.lock:
                if isinstance(event, Done) and event.request == "generate" and job.cancel.is_set():
                    event.stop_reason = "cancelled"  # a cancel answered `cancelled: true` never lies
                self.live.pop(job.req.id, None)
                self.active = None
            self.emit(event)
            if self.kit is not None:
                try:
                    self.kit.cache.persist()
                except Exception:
                    log.exception("prompt cache: could not persist an entry")
            with self.lock:
                self.engine_idle.set()

    def _run(self, job: Job):
        req = job.req
        if job.cancel.is_set():
            return Done(id=req.id, request=_kind(req), stop_reason="cancelled")
        try:
            if isinstance(req, Load):
                self.kit = None  # the old model is released before the new one is read
                self.kit = engine.load(req, self.emit, job.cancel.is_set)
                return Done(id=req.id, request="load", model=self.kit.info,
                            draft=self.kit.draft.info if self.kit.draft else None,
                            warnings=self.kit.warnings or None)
            if isinstance(req, Unload):
                self.kit = None
                engine.release_memory()
                return Done(id=req.id, request="unload")
            if self.kit is None:
                raise WorkerError("no_model", "no model is loaded; send a `load` request first")
            if isinstance(req, Tokenize):
                return engine.tokenize(self.kit, req)
            if isinstance(req, LoadDraft):
                self.kit.draft = None
                engine.release_memory()
                if req.model_path is not None:
                    self.kit.draft = engine.load_draft(self.kit, req, self.emit, job.cancel.is_set)
                return Done(id=req.id, request="load_draft",
                            draft=self.kit.draft.info if self.kit.draft else None)
            if isinstance(req, CacheClear):
                dropped = self.kit.cache.clear()
                engine.release_memory()
                return Done(id=req.id, request="cache_clear", cache=CacheStats(**dropped))
            return engine.generate(self.kit, req, self.emit, job.cancel.is_set)
        except WorkerError as exc:
            return Error(id=req.id, code=exc.code, number=exc.number, message=exc.message)
        except engine.LoadCancelled:
            return Done(id=req.id, request=_kind(req), stop_reason="cancelled")
        except Exception as exc:
            traceback.print_exc()
            return Error(id=req.id, code="internal", number=-32603,
                         message=f"{type(exc).__name__}: {exc}")


def _kind(req) -> str:
    return type(req).__struct_config__.tag

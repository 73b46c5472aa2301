"""Threads, queue, dispatch, cancellation and shutdown.

Three threads: the reader (stdin -> requests; answers control requests at once), the engine
(the only thread that touches MLX; runs work requests FIFO) and the writer (events -> stdout).
"""

import collections
import functools
import logging
import threading
import traceback
from dataclasses import dataclass, field
from typing import BinaryIO, Optional

from .engine import Engine, tokenize
from .protocol import (
    DEFAULT_MAX_LINE_BYTES, Cancel, Done, Error, Fatal, Generate, Load, LoadDraft, Shutdown,
    Status, Tokenize, TooLong, Unload, WorkerError, decode_request, read_lines,
)
from .writer import Writer

log = logging.getLogger("worker")

MAX_QUEUE = 256
# stdin closing / SIGTERM: how long the running request may take to reach its next cancel check (the end
# of a prefill chunk or a decode step) before the worker answers it itself and exits (PROTOCOL.md).
EXIT_GRACE_S = 2.0
FLUSH_S = 10.0  # at exit, for the last events to reach a host that reads slowly (or stopped reading)
SHUTDOWN_GRACE_S = 60.0
# Running requests of these types stop at their next cancel check; the others finish (they are short).
CANCELLABLE_RUNNING = (Generate, Load, LoadDraft)


@dataclass
class Job:
    req: object
    cancel: threading.Event = field(default_factory=threading.Event)
    answered: bool = False  # its terminal event was written (by the engine, or by the exit path)
    emitting: threading.Lock = field(default_factory=threading.Lock)  # answered + emit, atomically

    def emit_unless_answered(self, emit, event) -> None:
        """The engine's events for this job: none after its terminal event (the exit path may write it)."""
        with self.emitting:
            if not self.answered:
                emit(event)


class Server:
    def __init__(self, out_fd: int, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES):
        self.max_line_bytes = max_line_bytes
        self.writer = Writer(out_fd, on_broken=self._stdout_broken)
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)
        self.queue = collections.deque()
        self.live = {}  # id -> Job, for every request not yet answered
        self.running: list = []  # jobs the engine started and did not end, oldest first
        self.engine = Engine()
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
        """Cancel everything, let the engine end its request, answer shutdown, flush, exit.

        Every request gets its terminal event before the process exits: one still running when the
        grace ends (a long prefill chunk) is answered here with ``stop_reason: "cancelled"``.
        """
        self._cancel_all()
        self.engine_idle.wait(SHUTDOWN_GRACE_S if self.shutdown_job else EXIT_GRACE_S)
        with self.lock:
            late = [job for job in self.running if not job.answered]
        for job in late:
            if job.emitting.acquire(timeout=1.0):
                try:
                    if not job.answered:
                        job.answered = True
                        log.warning("exiting while %s still runs: answered as cancelled", job.req.id)
                        self.emit(_cancelled_done(job.req))
                finally:
                    job.emitting.release()
        if self.shutdown_job is not None:
            self.emit(Done(id=self.shutdown_job.req.id, request="shutdown"))
        self.writer.flush(FLUSH_S)
        return self.exit_code

    def _cancel_all(self) -> None:
        with self.lock:
            queued = list(self.queue)
            self.queue.clear()
            for job in self.running:
                job.cancel.set()
        for job in queued:
            self._finish_job(job, _cancelled_done(job.req))

    def _finish_job(self, job: Job, event) -> None:
        with self.lock:
            self.live.pop(job.req.id, None)
            job.answered = True
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
            tokenizer = self.engine.snapshot.tokenizer
            if isinstance(req, Tokenize) and tokenizer is not None and self._tokenize_now():
                pass
            else:
                if len(self.queue) >= MAX_QUEUE:
                    raise WorkerError("queue_full", f"{MAX_QUEUE} requests are already queued")
                self.live[req.id] = job
                self.queue.append(job)
                self.work.notify()
                return
        self.emit(tokenize(tokenizer, req))

    def _tokenize_now(self) -> bool:
        """Tokenize is answered at once unless a load/unload before it could change the model."""
        pending = list(self.queue) + self.running
        return not any(isinstance(j.req, (Load, Unload)) for j in pending)

    def _cancel(self, req: Cancel) -> Done:
        target = self.live.get(req.target)
        found = False
        if target is not None and target is not self.shutdown_job:
            if target in self.queue:
                found = True
                target.cancel.set()
                self.queue.remove(target)
                self.live.pop(req.target, None)
                target.answered = True
                self.emit(_cancelled_done(target.req))
            elif isinstance(target.req, CANCELLABLE_RUNNING):
                found = True
                target.cancel.set()
        return Done(id=req.id, request="cancel", cancelled=found)

    def _status(self, req: Status) -> Done:
        snap = self.engine.snapshot
        running = list(self.running)
        if not running:
            state = "idle" if snap.model is not None else "empty"
        else:
            state = {Load: "loading", Generate: "generating"}.get(type(running[0].req), "busy")
        return Done(
            id=req.id, request="status", state=state, model=snap.model, draft=snap.draft,
            active=running[0].req.id if running else None, running=[j.req.id for j in running],
            queue=[j.req.id for j in self.queue],
            engine_alive=self.engine_thread.is_alive(),
            cache=snap.cache, draft_cache=snap.draft_cache,
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
                with job.emitting:  # answered once: the exit path skips what is answered here
                    if job.answered:
                        continue
                    job.answered = True
                self.emit(Error(id=job.req.id, code="internal", number=-32603,
                                message=f"the worker must exit: {reason}"))
            self.emit(Fatal(id=None, reason=reason))
            self.engine_idle.set()

    def _engine_jobs(self) -> None:
        """FIFO from the queue: a generate the batch takes is admitted while others decode; any other
        request (or a generate that must run alone) waits for the batch to end, then runs alone."""
        engine = self.engine
        while True:
            job, route = None, None
            with self.work:
                while not self.queue and not engine.batch_busy:
                    self.work.wait()
                if self.queue:
                    route = engine.route(self.queue[0].req)
                    if (engine.batch_room() if route == "batch" else not engine.batch_busy):
                        job = self.queue.popleft()
                        self.running.append(job)
                        self.engine_idle.clear()
            if job is not None:
                emit = functools.partial(job.emit_unless_answered, self.emit)
                if route == "batch":
                    event = engine.admit(job, emit, job.cancel.is_set)
                    if event is not None:
                        self._conclude(job, event)
                else:
                    self._conclude(job, engine.run(job.req, emit, job.cancel.is_set))
            if engine.batch_busy:
                for done_job, event in engine.tick():
                    self._conclude(done_job, event)

    def _conclude(self, job: Job, event) -> None:
        """A job's terminal event, exactly once (the exit path may have answered it already)."""
        with self.lock:  # from here no cancel can reach this job: its flag is final
            self.live.pop(job.req.id, None)
        if job.cancel.is_set():
            event = self.engine.cancelled_late(job.req, event)  # `cancelled: true` never lies
        with job.emitting:
            if not job.answered:
                job.answered = True
                self.emit(event)
        with self.lock:
            self.running.remove(job)
        self.engine.persist()
        with self.lock:
            if not self.running:
                self.engine_idle.set()


def _kind(req) -> str:
    return type(req).__struct_config__.tag


def _cancelled_done(req) -> Done:
    """The terminal event of a request cancelled before the engine answered it."""
    return Done(id=req.id, request=_kind(req), stop_reason="cancelled",
                text="" if isinstance(req, Generate) else None)

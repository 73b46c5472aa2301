"""The queue of work requests and the engine thread that runs them (the only thread that touches MLX).
FIFO: a generate the batch takes is admitted while others decode; any other request runs alone, after it.

Every field below is shared with the reader thread under ``lock``; the methods marked "lock held" are
called by the server inside its own ``with scheduler.lock`` block (dispatch is one atomic decision).
"""

import collections
import functools
import logging
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable

from .engine import Engine, Route
from .protocol import AnyRequest, Fatal, Generate, Load, LoadDraft, Unload, WorkerError
from .protocol.events import cancelled_done, internal_error

log = logging.getLogger("worker")

MAX_QUEUE = 256
# Running requests of these types stop at their next cancel check; the others finish (they are short).
CANCELLABLE_RUNNING = (Generate, Load, LoadDraft)


@dataclass
class Job:
    req: AnyRequest
    cancel: threading.Event = field(default_factory=threading.Event)
    answered: bool = False  # its terminal event was written (by the engine, or by the exit path)
    emitting: threading.Lock = field(default_factory=threading.Lock)  # answered + emit, atomically

    def emit_unless_answered(self, emit, event) -> None:
        """The engine's events for this job: none after its terminal event (the exit path may write it)."""
        with self.emitting:
            if not self.answered:
                emit(event)


class Scheduler:
    def __init__(self, engine: Engine, emit: Callable, on_engine_death: Callable[[], None]):
        self.engine = engine
        self.emit = emit
        self.on_engine_death = on_engine_death  # called with the lock held, before the lost jobs are answered
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)
        self.queue = collections.deque()
        self.live = {}  # id -> Job, for every request not yet answered
        self.running: list = []  # jobs the engine started and did not end, oldest first
        self.idle = threading.Event()  # set when no job runs and its cache is persisted
        self.idle.set()
        self.thread = threading.Thread(target=self._engine_loop, name="engine", daemon=True)

    # ------------------------------------------------------------ reader side (lock held)

    def submit(self, job: Job) -> None:
        if len(self.queue) >= MAX_QUEUE:
            raise WorkerError("queue_full", f"{MAX_QUEUE} requests are already queued")
        self.live[job.req.id] = job
        self.queue.append(job)
        self.work.notify()

    def cancel(self, rid: str) -> bool:
        """Cancel request ``rid``: a queued one ends here, a running one at its next cancel check.
        True when it was found and will end cancelled."""
        target = self.live.get(rid)
        if target is None:
            return False
        if target in self.queue:
            target.cancel.set()
            self.queue.remove(target)
            self.live.pop(rid, None)
            target.answered = True
            self.emit(cancelled_done(target.req))
            return True
        if isinstance(target.req, CANCELLABLE_RUNNING):
            target.cancel.set()
            return True
        return False

    def tokenize_now(self) -> bool:
        """Tokenize is answered at once unless a load/unload before it could change the model."""
        pending = list(self.queue) + self.running
        return not any(isinstance(j.req, (Load, Unload)) for j in pending)

    # ------------------------------------------------------------ exit path (main thread)

    def cancel_all(self) -> None:
        """Every queued request ends cancelled; every running one is told to stop."""
        with self.lock:
            queued = list(self.queue)
            self.queue.clear()
            for job in self.running:
                job.cancel.set()
        for job in queued:
            with self.lock:
                self.live.pop(job.req.id, None)
                job.answered = True
            self.emit(cancelled_done(job.req))

    def answer_unfinished(self) -> None:
        """The grace has passed: a request still running (a long prefill chunk) is answered as cancelled."""
        with self.lock:
            late = [job for job in self.running if not job.answered]
        for job in late:
            if job.emitting.acquire(timeout=1.0):
                try:
                    if not job.answered:
                        job.answered = True
                        log.warning("exiting while %s still runs: answered as cancelled", job.req.id)
                        self.emit(cancelled_done(job.req))
                finally:
                    job.emitting.release()

    # ------------------------------------------------------------ engine thread

    def _engine_loop(self) -> None:
        try:
            self._run_jobs()
        except BaseException as exc:  # the MLX thread is gone: say so, then exit non-zero
            traceback.print_exc()
            self._engine_died(exc)

    def _engine_died(self, exc: BaseException) -> None:
        what = "the engine thread died"
        with self.lock:
            self.on_engine_death()  # no new work from here on
            lost = list(self.live.values())
            self.live.clear()
            self.queue.clear()
        for job in lost:
            with job.emitting:  # answered once: the exit path skips what is answered here
                if job.answered:
                    continue
                job.answered = True
            self.emit(internal_error(job.req.id, exc, f"the worker must exit: {what}"))
        self.emit(Fatal(id=None, reason=f"{what}: {type(exc).__name__}: {exc}"))
        self.idle.set()

    def _run_jobs(self) -> None:
        """FIFO from the queue: a generate the batch takes is admitted while others decode; any other
        request (or a generate that must run alone) waits for the batch to end, then runs alone."""
        engine = self.engine
        while True:
            job, route = self._next_job()
            if job is not None:
                emit = functools.partial(job.emit_unless_answered, self.emit)
                if route is Route.BATCH:
                    event = engine.admit(job, emit, job.cancel.is_set)
                    if event is not None:
                        self._conclude(job, event)
                else:
                    self._conclude(job, engine.run(job.req, emit, job.cancel.is_set))
            if engine.batch_busy:
                for done_job, event in engine.tick():
                    self._conclude(done_job, event)

    def _next_job(self) -> tuple:
        """(job, its route) when the queue's head can start now, else (None, None); waits for work."""
        engine = self.engine
        with self.work:
            while not self.queue and not engine.batch_busy:
                self.work.wait()
            if not self.queue:
                return None, None
            route = engine.route(self.queue[0].req)
            if not (engine.batch_room() if route is Route.BATCH else not engine.batch_busy):
                return None, None
            job = self.queue.popleft()
            self.running.append(job)
            self.idle.clear()
            return job, route

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
                self.idle.set()

"""The queue of work requests and the engine thread that runs them (the only thread that touches MLX).
FIFO: a generate the batch takes is admitted while others decode; any other request runs alone, after it.

Every field below is shared with the reader thread under ``lock``; the methods marked "lock held" are
called by the server inside its own ``with scheduler.lock`` block (dispatch is one atomic decision).
"""

import collections
import functools
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import msgspec

from .engine import Engine, Route
from .protocol import AnyRequest, decode_request, Fatal, Generate, Load, LoadDraft, Unload, WorkerError
from .distributed.group import RankLost, seed_alike
from .protocol.events import cancelled_done, error_event, internal_error

log = logging.getLogger("worker")

MAX_QUEUE = 256
# With ranks, an idle rank 0 shares an empty step every IDLE_STEP_S, and the other ranks nap that long less
# NAP_MARGIN_S after one: a rank waiting inside a collective spins a CPU core (MLX's ring), so they wait in a nap
# instead. After IDLE_STEPS_BEFORE_LONG empty steps in a row (a second idle) the step is LONG_IDLE_STEP_S. The
# first step of a request that comes while all are idle waits for their nap (at most 45 ms, 245 ms after 1 s).
IDLE_STEP_S, LONG_IDLE_STEP_S, NAP_MARGIN_S, IDLE_STEPS_BEFORE_LONG = 0.05, 0.25, 0.005, 20
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


@dataclass(frozen=True)
class Step:
    """What the engine thread does next: start ``job`` (by ``route``), then tick the batch if it is busy."""

    job: Optional[Job] = None
    route: Optional[Route] = None
    stop: bool = False  # the worker exits: the engine loop ends (on every rank)


def step_to_wire(step: Step) -> bytes:
    return msgspec.json.encode({
        "req": msgspec.json.encode(step.job.req).decode() if step.job else None,
        "route": step.route.value if step.route else None,
        "stop": step.stop})


def step_from_wire(data: bytes) -> Step:
    d = msgspec.json.decode(data)
    job = Job(decode_request(d["req"].encode())) if d["req"] is not None else None
    return Step(job=job, route=Route(d["route"]) if d["route"] else None, stop=d["stop"])


class Scheduler:
    def __init__(self, engine: Engine, emit: Callable, on_engine_death: Callable[[], None], world=None):
        self.engine = engine
        self.world = world  # a distributed.group.World with several ranks, else None
        self.cancels: Optional[frozenset] = None  # with ranks: batched requests cancelled, as last shared
        self.stopping = False  # the engine loop ends once the queue and the batch are empty
        self.waiting = False  # the engine thread waits for work (rank 0's watchdog reads it)
        self.loading = False  # the engine thread loads a model (no shared step until its end)
        self.idle_steps = 0  # with ranks: empty steps in a row (the ranks then nap; _shared_step)
        self.dead = False  # the engine is gone (its requests were answered with errors, then fatal)
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

    def stop(self) -> None:
        """The exit path: the engine loop ends once the queue and the batch are empty (on every rank)."""
        with self.lock:
            self.stopping = True
            self.work.notify()

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
            if not isinstance(exc, RankLost):
                traceback.print_exc()
            self._engine_died(exc)

    def _engine_died(self, exc: BaseException) -> None:
        """Every live request ends with an error, then ``fatal``. Called once: by the engine thread, or by
        the server's watchdog while the engine thread waits on a rank that stopped answering."""
        what = "the engine thread died"
        with self.lock:
            if self.dead:
                return
            self.dead = True
            self.on_engine_death()  # no new work from here on
            lost = list(self.live.values())
            self.live.clear()
            self.queue.clear()
        gone = isinstance(exc, RankLost)
        for job in lost:
            with job.emitting:  # answered once: the exit path skips what is answered here
                if job.answered:
                    continue
                job.answered = True
            if gone:
                self.emit(error_event(job.req.id, WorkerError("rank_lost", f"the worker must exit: {exc}")))
            else:
                self.emit(internal_error(job.req.id, exc, f"the worker must exit: {what}"))
        self.emit(Fatal(id=None, reason=str(exc) if gone else f"{what}: {type(exc).__name__}: {exc}"))
        self.idle.set()

    def _run_jobs(self) -> None:
        """FIFO from the queue: a generate the batch takes is admitted while others decode; any other
        request (or a generate that must run alone) waits for the batch to end, then runs alone.
        With several ranks, each step rank 0 decides (``_decide``) is shared and every rank takes it."""
        if self.world is not None:
            seed_alike(self.world)  # MLX's random key is per thread: this one's
        while True:
            step = self._decide() if self.world is None else self._shared_step()
            if step.stop:
                return
            self._take(step)

    def _take(self, step: "Step") -> None:
        engine = self.engine
        self.cancels = None  # shared afresh at the first check after the admission, and after the tick
        job = step.job
        if job is not None:
            emit = functools.partial(job.emit_unless_answered, self.emit)
            if step.route is Route.BATCH:
                event = engine.admit(job, emit, self._batch_cancelled(job))
                if event is not None:
                    self._conclude(job, event)
            else:
                self.loading = isinstance(job.req, (Load, LoadDraft))  # the watchdog waits for a load
                try:
                    event = engine.run(job.req, emit, self._alone_cancelled(job))
                finally:
                    self.loading = False
                self._conclude(job, event)
        if engine.batch_busy:
            self.cancels = None
            for done_job, event in engine.tick():
                self._conclude(done_job, event)

    def _decide(self, wait_s: Optional[float] = None) -> "Step":
        """The next step: the queue's head when it can start now, else a tick of the batch; waits for work
        (at most ``wait_s``: then an empty step, a heartbeat of the ranks)."""
        engine = self.engine
        with self.work:
            while not self.queue and not engine.batch_busy and not self.stopping:
                self.waiting = True
                woke = self.work.wait(wait_s)
                self.waiting = False
                if self.world is not None:
                    self.world.touch()
                if not woke and wait_s is not None:
                    return Step()
            if self.stopping and not self.queue and not engine.batch_busy:
                return Step(stop=True)
            if not self.queue:
                return Step()
            route = engine.route(self.queue[0].req)
            if not (engine.batch_room() if route is Route.BATCH else not engine.batch_busy):
                return Step()
            job = self.queue.popleft()
            self.running.append(job)
            self.idle.clear()
            return Step(job=job, route=route)

    def _batch_cancelled(self, job: Job) -> Callable[[], bool]:
        """A batched request's cancel check: its flag; with ranks, rank 0's flags shared at the first check of
        an admission or a tick (one collective for the whole batch; the tokens it checks are computed)."""
        if self.world is None:
            return job.cancel.is_set
        rid = job.req.id
        return lambda: rid in self._shared_cancels()

    def _shared_cancels(self) -> frozenset:
        if self.cancels is None:
            with self.lock:
                mine = sorted(j.req.id for j in self.running if j.cancel.is_set())
            data = self.world.share(msgspec.json.encode(mine) if self.world.rank == 0 else None)
            self.cancels = frozenset(msgspec.json.decode(data) if data else ())
        return self.cancels

    def _alone_cancelled(self, job: Job) -> Callable[[], bool]:
        """A request run alone checks at each chunk and token: with ranks, rank 0's flag, shared."""
        if self.world is None:
            return job.cancel.is_set
        return lambda: self.world.flag(job.cancel.is_set())

    def _shared_step(self) -> "Step":
        """Rank 0 decides and shares the step; the other ranks receive it."""
        world = self.world
        wait = LONG_IDLE_STEP_S if self.idle_steps >= IDLE_STEPS_BEFORE_LONG else IDLE_STEP_S
        if world.rank == 0:
            step = self._decide(wait)
            world.share(step_to_wire(step))
        else:
            if self.idle_steps:
                time.sleep(wait - NAP_MARGIN_S)
            step = step_from_wire(world.share(None))
            if step.job is not None:
                self.live[step.job.req.id] = step.job
                self.running.append(step.job)
        idle = step.job is None and not step.stop and not self.engine.batch_busy
        self.idle_steps = self.idle_steps + 1 if idle else 0  # alike on every rank: the steps are shared
        return step

    def _conclude(self, job: Job, event) -> None:
        """A job's terminal event, exactly once (the exit path may have answered it already)."""
        with self.lock:  # from here no cancel can reach this job: its flag is final
            self.live.pop(job.req.id, None)
        late = job.cancel.is_set()
        if self.world is not None:
            late = self.world.flag(late)  # rank 0's: a cancelled load drops the model on every rank
        if late:
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

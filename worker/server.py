"""The process: the reader thread (stdin -> requests; cancel, status and shutdown answered at once), dispatch
to the scheduler (scheduler.py: the queue and the engine thread), the writer (events -> stdout), and exit.
"""

import logging
import threading
import time
import traceback
from typing import BinaryIO, Optional

from .engine import Engine, tokenize
from .protocol import (
    DEFAULT_MAX_LINE_BYTES, Cancel, Done, Generate, Load, Shutdown, Status, Tokenize, TooLong, WorkerError,
    decode_request, read_lines,
)
from .protocol.framing import id_in_head
from .protocol.events import error_event, internal_error
from .distributed.group import RankLost
from .scheduler import Job, Scheduler
from .writer import Writer

log = logging.getLogger("worker")

# stdin closing / SIGTERM: how long the running request may take to reach its next cancel check (the end
# of a prefill chunk or a decode step) before the worker answers it itself and exits (PROTOCOL.md).
EXIT_GRACE_S = 2.0
FLUSH_S = 10.0  # at exit, for the last events to reach a host that reads slowly (or stopped reading)
SHUTDOWN_GRACE_S = 60.0


class Server:
    def __init__(self, out_fd: int, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, world=None, ranks=None,
                 rank_timeout_s: float = 60.0, followers=None):
        self.max_line_bytes = max_line_bytes
        self.writer = Writer(out_fd, on_broken=self._stdout_broken)
        self.engine = Engine(world)
        self.engine.ranks = ranks
        self.world, self.rank_timeout_s, self.followers = world, rank_timeout_s, followers
        self.scheduler = Scheduler(self.engine, self.emit, on_engine_death=self._engine_died, world=world)
        self.exiting = threading.Event()
        self.exit_code = 0
        self.shutdown_job: Optional[Job] = None

    def emit(self, event) -> None:
        self.writer.put(event)

    def serve(self, stdin: BinaryIO, ready_event) -> int:
        self.writer.start()
        self.emit(ready_event)
        self.scheduler.thread.start()
        reader = threading.Thread(target=self._read_loop, args=(stdin,), name="reader", daemon=True)
        reader.start()
        if self.world is not None:
            threading.Thread(target=self._watch_ranks, name="ranks-watchdog", daemon=True).start()
        self.exiting.wait()
        return self._finish()

    def request_exit(self, code: int = 0) -> None:
        self.exit_code = code
        self.exiting.set()

    # ------------------------------------------------------------ exit

    def _stdout_broken(self) -> None:
        log.error("stdout is closed: the host is gone; exiting")
        self.request_exit(0)

    def _engine_died(self) -> None:
        """The scheduler's engine thread died (called with its lock held): exit 70, no new work."""
        self.exit_code = 70
        self.exiting.set()
        self.shutdown_job = None  # answered with the other lost requests

    def _finish(self) -> int:
        """Cancel everything, let the engine end its request, answer shutdown, flush, exit.

        Every request gets its terminal event before the process exits: one still running when the
        grace ends (a long prefill chunk) is answered here with ``stop_reason: "cancelled"``.
        """
        self.scheduler.cancel_all()
        self.scheduler.idle.wait(SHUTDOWN_GRACE_S if self.shutdown_job else EXIT_GRACE_S)
        self.scheduler.answer_unfinished()
        if self.world is not None and not self.scheduler.dead:  # the other ranks end with the last step
            self.scheduler.stop()
            self.scheduler.thread.join(EXIT_GRACE_S)
        if self.shutdown_job is not None:
            self.emit(Done(id=self.shutdown_job.req.id, request="shutdown"))
        self.writer.flush(FLUSH_S)
        return self.exit_code

    def _watch_ranks(self) -> None:
        """Rank 0's watchdog: a rank whose process ended (the ranks this worker started), or that stops
        answering (one shared step, or the model's own collectives while a request runs, silent for
        ``rank_timeout_s``) ends every request with ``rank_lost`` and the worker with ``fatal``: never a hang.
        (A collective with a dead peer does not always fail: MLX's ring may leave it pending.)"""
        world, sched, limit = self.world, self.scheduler, self.rank_timeout_s
        while not self.exiting.wait(min(0.5, limit / 4)):
            dead = self.followers.dead() if self.followers is not None else []
            now = time.monotonic()
            inside = world.inside_since
            stuck = inside is not None and now - inside > limit
            quiet = not (sched.waiting or sched.loading) and now - world.last_done > limit
            if dead:
                why = ", ".join(f"rank {r} exited ({code})" for r, code in dead)
            elif stuck or quiet:
                why = f"a rank has not answered for {limit:g} s (--rank-timeout)"
            else:
                continue
            log.error("%s: exiting", why)
            sched._engine_died(RankLost(why))
            return

    # ------------------------------------------------------------ reader

    def _read_loop(self, stdin: BinaryIO) -> None:
        try:
            for line in read_lines(stdin, self.max_line_bytes):
                if isinstance(line, TooLong):
                    self._refuse(id_in_head(line.head), WorkerError(
                        "line_too_long",
                        f"the line had {line.size} bytes; the limit is {self.max_line_bytes}; skipped"))
                    continue
                if not line.strip():
                    continue  # blank lines are allowed as keep-alives
                try:
                    req = decode_request(line)
                except WorkerError as exc:
                    self._refuse(getattr(exc, "request_id", None), exc)
                    continue
                except Exception as exc:  # decode_request promises WorkerError only; never stop reading
                    traceback.print_exc()
                    unreadable = WorkerError("parse_error", f"unreadable line: {type(exc).__name__}")
                    self.emit(error_event(None, unreadable))
                    continue
                try:
                    self._dispatch(req)
                except WorkerError as exc:
                    self._refuse(req.id, exc)
                except Exception as exc:  # a bug: report it, keep serving
                    traceback.print_exc()
                    self.emit(internal_error(req.id, exc))
        except Exception:
            traceback.print_exc()
        log.info("stdin closed; exiting")
        self.request_exit(0)

    def _refuse(self, rid: Optional[str], exc: WorkerError) -> None:
        """The error of a line the worker refused. It carries the line's id, unless a request with that id is
        still in progress: then ``id`` is null and ``refused_id`` names it, so the error ends nothing (a host
        that ends a request on its one done/error never ends the running one)."""
        with self.scheduler.lock:
            live = rid is not None and rid in self.scheduler.live
        self.emit(error_event(None, exc, refused_id=rid) if live else error_event(rid, exc))

    def _dispatch(self, req) -> None:
        """Control requests are answered here, at once; work requests go to the scheduler's queue (a
        tokenize is answered at once too, when no load or unload before it could change the model)."""
        if self.exiting.is_set():
            raise WorkerError("shutting_down", "the worker is shutting down")
        sched = self.scheduler
        with sched.lock:
            if req.id in sched.live:
                raise WorkerError(
                    "invalid_request",
                    f"id {req.id!r} belongs to a request still in progress; this duplicate was refused "
                    "(the running one is unaffected)")
            if isinstance(req, Cancel):
                self.emit(Done(id=req.id, request="cancel", cancelled=sched.cancel(req.target)))
                return
            if isinstance(req, Status):
                self.emit(self._status(req))
                return
            if isinstance(req, Shutdown):
                self.shutdown_job = sched.live[req.id] = Job(req)
                self.exiting.set()
                return
            tokenizer = self.engine.view.tokenizer
            if not (isinstance(req, Tokenize) and tokenizer is not None and sched.tokenize_now()):
                sched.submit(Job(req))
                return
        self.emit(tokenize(tokenizer, req))

    def _status(self, req: Status) -> Done:
        view, sched = self.engine.view, self.scheduler
        running = list(sched.running)
        if not running:
            state = "idle" if view.model is not None else "empty"
        else:
            state = {Load: "loading", Generate: "generating"}.get(type(running[0].req), "busy")
        return Done(
            id=req.id, request="status", state=state, model=view.model, draft=view.draft,
            active=running[0].req.id if running else None, running=[j.req.id for j in running],
            queue=[j.req.id for j in sched.queue],
            engine_alive=sched.thread.is_alive(),
            cache=view.cache, draft_cache=view.draft_cache, kv_memory=view.kv.figures if view.kv else None,
            ranks=(view.model.ranks if view.model is not None and view.model.ranks else self.engine.ranks),
        )

"""The scheduler with a stand-in engine (no model): the races a real worker hits only now and then, made certain.

The stand-in holds each request until the test releases it, so a cancel can land after the request's last cancel
check, the exit path can answer a request the engine still holds, and the engine thread can die with work queued.
"""

import threading
import time

import msgspec
import pytest

from worker.engine import Route
from worker.protocol import AnyRequest, Done, Fatal, WorkerError
from worker.scheduler import MAX_QUEUE, Job, Scheduler


def req(**fields):
    return msgspec.convert(fields, AnyRequest)


def gen(rid):
    return req(type="generate", id=rid, prompt={"tokens": [1, 2]})


class StandIn:
    """What the scheduler asks of the Engine; ``run`` waits for ``release`` and never looks at ``cancelled``."""

    batch_busy = False

    def __init__(self, die_with=None):
        self.release = threading.Event()
        self.started = threading.Event()
        self.die_with = die_with
        self.late = []

    def route(self, r):
        return Route.ALONE

    def run(self, r, emit, cancelled):
        self.started.set()
        assert self.release.wait(10)
        if self.die_with is not None:
            raise self.die_with
        return Done(id=r.id, request="generate", stop_reason="eos", text="x")

    def cancelled_late(self, r, event):
        self.late.append(r.id)
        event.stop_reason = "cancelled"
        return event

    def persist(self):
        pass


@pytest.fixture
def make():
    made = []

    def make(engine):
        events, died = [], []
        s = Scheduler(engine, events.append, on_engine_death=lambda: died.append(s.lock.locked()))
        made.append(engine)
        return s, events, died

    yield make
    for engine in made:
        engine.release.set()


def submit(s, r):
    with s.lock:
        s.submit(Job(r))


def test_a_cancel_after_the_last_check_still_ends_cancelled(make):
    engine = StandIn()
    s, events, _ = make(engine)
    s.thread.start()
    submit(s, gen("g"))
    assert engine.started.wait(10)
    with s.lock:
        assert s.cancel("g") is True  # running, cancellable: `cancelled: true`
    engine.release.set()
    assert _wait(lambda: events) and s.idle.wait(10)
    assert engine.late == ["g"]
    assert [(e.id, e.stop_reason) for e in events] == [("g", "cancelled")]


def test_a_queued_cancel_ends_at_once_and_the_queue_is_fifo(make):
    engine = StandIn()
    s, events, _ = make(engine)
    for rid in ("a", "b", "c"):
        submit(s, gen(rid))
    with s.lock:
        assert s.cancel("b") is True
        assert s.cancel("nope") is False
        assert [j.req.id for j in s.queue] == ["a", "c"] and set(s.live) == {"a", "c"}
    assert [(e.id, e.stop_reason, e.text) for e in events] == [("b", "cancelled", "")]
    s.thread.start()
    engine.release.set()
    assert _wait(lambda: len(events) == 3)
    assert [e.id for e in events] == ["b", "a", "c"] and not s.live


def test_the_queue_refuses_past_max_queue(make):
    s, _, _ = make(StandIn())
    for i in range(MAX_QUEUE):
        submit(s, req(type="tokenize", id=f"t{i}", text="a"))
    with pytest.raises(WorkerError) as err, s.lock:
        s.submit(Job(req(type="tokenize", id="over", text="a")))
    assert err.value.code == "queue_full" and "over" not in s.live


def test_the_exit_path_answers_a_request_the_engine_still_holds_once(make):
    engine = StandIn()
    s, events, _ = make(engine)
    s.thread.start()
    submit(s, gen("g"))
    submit(s, gen("queued"))
    assert engine.started.wait(10)
    s.cancel_all()
    assert not s.idle.wait(0.2)  # the engine holds "g"
    s.answer_unfinished()
    assert [(e.id, e.stop_reason, e.text) for e in events] == [("queued", "cancelled", ""), ("g", "cancelled", "")]
    engine.release.set()
    assert s.idle.wait(10)
    assert len(events) == 2  # the engine's own answer came too late: dropped


def test_engine_death_answers_every_request_then_fatal(make):
    engine = StandIn(die_with=SystemExit(3))
    s, events, died = make(engine)
    s.thread.start()
    submit(s, gen("g"))
    submit(s, gen("queued"))
    assert engine.started.wait(10)
    engine.release.set()
    assert s.idle.wait(10) and _wait(lambda: len(events) == 3)
    assert died == [True]  # told under the lock, before anything is answered
    errors, fatal = events[:2], events[2]
    assert sorted(e.id for e in errors) == ["g", "queued"]
    assert all(e.code == "internal" and e.number == -32603 for e in errors)
    assert errors[0].message == "the worker must exit: the engine thread died: SystemExit: 3"
    assert isinstance(fatal, Fatal) and fatal.reason == "the engine thread died: SystemExit: 3"
    assert not s.live and not s.queue


def _wait(pred, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(pred())

"""The stdout writer thread: assigns ``seq`` and writes whole lines, coalescing bursts.

It never dies of a bad event (a string that cannot be encoded becomes an ASCII `internal` error
with ``id: null`` at worst), and once a `fatal` event is written nothing follows it. While idle it watches
stdout: a host that closed its end is noticed then, not only by the next write.
"""

import logging
import os
import queue
import select
import threading

import msgspec

from .protocol import Fatal, WorkerError
from .protocol.events import error_event
from .protocol.framing import valid_text

log = logging.getLogger("worker")

EVENT_QUEUE_SIZE = 4096  # a host that stops reading stalls generation here; memory stays bounded
IDLE_POLL_S = 0.5  # with nothing to write, how often stdout is checked for a reader that went away


def reader_gone(fd: int) -> bool:
    """Whether the read end of ``fd`` is closed: poll reports POLLERR (a pipe without readers) or POLLHUP
    (a socket or terminal hung up). A file or a platform without poll() never says so."""
    if not hasattr(select, "poll"):
        return False
    p = select.poll()
    p.register(fd, 0)  # no events asked for: only the error conditions, always reported
    try:
        return any(ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, ev in p.poll(0))
    except OSError:
        return False


class Writer(threading.Thread):
    def __init__(self, fd: int, on_broken):
        super().__init__(name="writer", daemon=True)
        self.fd = fd
        self.q = queue.Queue(EVENT_QUEUE_SIZE)
        self.seq = 0
        self.on_broken = on_broken
        self.enc = msgspec.json.Encoder()
        self.pending = 0  # events put but not yet written
        self.cv = threading.Condition()
        self.closed = False  # after `fatal` or a broken pipe: nothing more is written
        self.broken = False  # stdout is gone: nothing can be written

    def put(self, event) -> None:
        with self.cv:
            self.pending += 1
        self.q.put(event)

    def flush(self, timeout: float) -> None:
        """Wait until every event put so far has been written or dropped (after `fatal`), until stdout
        breaks, or until the timeout passes (a host that stopped reading). ``closed`` alone is not
        enough: it is set when `fatal` is encoded, before its batch is written."""
        with self.cv:
            self.cv.wait_for(lambda: self.pending == 0 or self.broken, timeout)

    def run(self) -> None:
        buf = bytearray()
        while True:
            batch = [self._next_event()]
            try:
                while len(batch) < 256:
                    batch.append(self.q.get_nowait())
            except queue.Empty:
                pass
            buf.clear()
            if not self.closed:
                for ev in batch:
                    self._encode(ev, buf)
                    if isinstance(ev, Fatal):
                        self.closed = True
                        break
                try:
                    with memoryview(buf) as view:
                        done = 0
                        while done < len(view):
                            done += os.write(self.fd, view[done:])
                except OSError:
                    self._broke()
            with self.cv:
                self.pending -= len(batch)
                self.cv.notify_all()

    def _next_event(self):
        """The next event to write; while none comes, stdout is watched (a broken one ends the process)."""
        while True:
            try:
                return self.q.get(timeout=IDLE_POLL_S)
            except queue.Empty:
                if not self.broken and reader_gone(self.fd):
                    self._broke()

    def _broke(self) -> None:
        self.closed = True
        with self.cv:
            self.broken = True
            self.cv.notify_all()
        self.on_broken()

    def _encode(self, ev, buf: bytearray) -> None:
        self.seq += 1
        ev.seq = self.seq
        start = len(buf)
        try:
            self.enc.encode_into(ev, buf, start)
        except Exception:  # e.g. a lone surrogate in a string: never break the stream
            log.exception("could not encode a %s event; sending an internal error instead", type(ev).__name__)
            del buf[start:]
            rid = ev.id if ev.id is None or valid_text(ev.id) else None
            err = error_event(rid, WorkerError("internal", "the worker could not encode an event"))
            err.seq = self.seq
            self.enc.encode_into(err, buf, start)
        buf += b"\n"

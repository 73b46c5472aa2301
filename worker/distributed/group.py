"""The ranks of one worker, on mx.distributed: rank 0 decides, every rank follows.

Every rank runs the same engine code on the same inputs; what only rank 0 can know (the next request, a
cancel, the time) crosses to the others through ``share``: rank 0's bytes, summed with the others' zeros by
``all_sum`` (mlx-lm's server does the same, ``ResponseGenerator._share_object``). Every collective is called
by the one engine thread of each rank, in the same order on every rank.
"""

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import msgspec
from mlx_lm.generate import generation_stream

from .launch import cuda_available

_SIZE = mx.int64


class RankLost(RuntimeError):
    """A collective failed: a peer rank died, or the connection to it broke."""


@dataclass
class World:
    group: object  # mx.distributed.Group
    backend: str
    # for rank 0's watchdog (read by another thread: plain floats, written by the engine thread alone)
    inside_since: Optional[float] = None  # a shared collective began then and has not returned
    last_done: float = field(default_factory=time.monotonic)  # the last one returned (or the engine woke)

    def touch(self) -> None:
        self.last_done = time.monotonic()

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    def _sum(self, x: mx.array) -> mx.array:
        """all_sum on the stream the model computes on (mlx-lm's generation_stream): the collectives inside
        the model and these run in one order, the order the (identical) engine code submits them on every
        rank. On another stream they could interleave differently on each rank, and the ring would hang."""
        self.inside_since = time.monotonic()
        try:
            out = mx.distributed.all_sum(x, group=self.group, stream=generation_stream)
            mx.eval(out)
            return out
        except RuntimeError as exc:
            raise RankLost(f"a rank is gone: {exc}") from exc
        finally:
            self.inside_since = None
            self.touch()

    def share(self, data: Optional[bytes]) -> bytes:
        """Rank 0's ``data`` on every rank (the others pass None)."""
        mine = data if self.rank == 0 else b""
        size = int(self._sum(mx.array([len(mine)], dtype=_SIZE)).item())
        if size == 0:
            return b""
        buf = mx.array(memoryview(mine), dtype=mx.uint8) if mine else mx.zeros((size,), dtype=mx.uint8)
        return bytes(memoryview(self._sum(buf)))

    def agree(self, obj):
        """Rank 0's ``obj`` (msgspec-encodable) on every rank: a figure each rank measures for itself (cache
        bytes, with pipeline layers of other kinds on each rank) that every rank must decide on alike."""
        return msgspec.json.decode(self.share(msgspec.json.encode(obj) if self.rank == 0 else None))

    def every(self, value: bool) -> bool:
        """True on every rank when ``value`` is true on every rank (a decision each rank must make alike)."""
        return int(self._sum(mx.array([int(bool(value))], dtype=mx.int32)).item()) == self.size

    def flag(self, value: bool) -> bool:
        """Rank 0's ``value`` on every rank."""
        return bool(self._sum(mx.array([int(value) if self.rank == 0 else 0], dtype=mx.int32)).item())

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (msgspec-encodable), in rank order, on every rank."""
        mine = msgspec.json.encode(obj)
        sizes = mx.zeros((self.size,), dtype=_SIZE)
        sizes[self.rank] = len(mine)
        sizes = [int(s) for s in self._sum(sizes).tolist()]
        buf = mx.zeros((sum(sizes),), dtype=mx.uint8)
        start = sum(sizes[: self.rank])
        if mine:
            buf[start:start + len(mine)] = mx.array(memoryview(mine), dtype=mx.uint8)
        flat = bytes(memoryview(self._sum(buf)))
        out, at = [], 0
        for s in sizes:
            out.append(msgspec.json.decode(flat[at:at + s]))
            at += s
        return out


def first_failure(failures: list):
    """The first of every rank's failures (``[code, message]`` or None, in rank order) as a WorkerError that
    names the rank when it is not rank 0; None when every rank succeeded."""
    from ..protocol import WorkerError

    for rank, f in enumerate(failures):
        if f is not None:
            return WorkerError(f[0], f[1] if rank == 0 else f"rank {rank}: {f[1]}")
    return None


def agreed_failure(world: World, failure):
    """``failure`` (a WorkerError or None) of this rank -> the first rank's, on every rank alike."""
    return first_failure(world.gather(None if failure is None else [failure.code, failure.message]))


def init() -> Optional[World]:
    """The world this process belongs to (MLX_RANK set by ``--ranks``, ``--hostfile`` or mlx.launch), or None
    when it runs alone."""
    if "MLX_RANK" not in os.environ:
        return None
    backend = os.environ.get("MLX_WORKER_BACKEND") or ("nccl" if cuda_available() else "ring")
    group = mx.distributed.init(strict=True, backend=backend)
    if group.size() < 2:
        return None
    return World(group, backend)


def lost(exc: BaseException) -> bool:
    """Whether an exception raised by MLX means a rank is gone (a collective inside the model failed)."""
    if isinstance(exc, RankLost):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("[ring]" in text or "[nccl]" in text.lower()
                                              or "peer was lost" in text)


def memory_bytes() -> int:
    """This rank's memory for the model: the GPU's where MLX has one, else the machine's."""
    if mx.default_device().type == mx.DeviceType.gpu:
        info = mx.device_info()
        got = info.get("memory_size") or info.get("total_memory")
        if got:
            return int(got)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def host_name() -> str:
    return socket.gethostname()


def seed_alike(world: World) -> None:
    """The calling thread's random key from one seed (rank 0's) on every rank: an unseeded sampler then draws
    the same token on every rank. Drawn apart, the ranks would feed different tokens to one split model.
    (MLX's random key is per thread: the engine thread calls this.)"""
    seed = int.from_bytes(os.urandom(4), "little") if world.rank == 0 else 0
    mx.random.seed(int.from_bytes(world.share(seed.to_bytes(4, "little")), "little"))


def describe(world: World):
    """The world as ``ready`` reports it: every rank's host and memory (gathered: each rank says its own)."""
    from ..protocol import RankInfo, Ranks

    mine = {"host": host_name(), "pid": os.getpid(), "memory_bytes": memory_bytes()}
    every = world.gather(mine)
    return Ranks(size=world.size, backend=world.backend,
                 ranks=[RankInfo(rank=i, **r) for i, r in enumerate(every)])

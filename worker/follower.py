"""A rank other than 0: no stdin, no stdout. It runs the engine loop on the steps rank 0 shares
(scheduler.Scheduler._shared_step) until rank 0 says stop or is gone."""

import logging

from .engine import Engine
from .scheduler import Scheduler

log = logging.getLogger("worker")


def follow(world, ranks) -> int:
    """The engine loop on this (the only MLX) thread; 0 when rank 0 ended it, 70 when rank 0 is gone."""
    engine = Engine(world)
    engine.ranks = ranks
    scheduler = Scheduler(engine, lambda event: None, on_engine_death=lambda: None, world=world)
    try:
        scheduler._run_jobs()
    except Exception as exc:
        log.error("rank %d: %s; exiting", world.rank, exc)
        return 70
    return 0

"""The Engine: the one owner of the loaded model (text model, tokenizer, add-on, draft, prompt caches, batcher),
and what runs on it: each work request alone, or generates admitted to the batch (its ``Route``).

Every method but reading ``view`` runs on the engine thread, the only thread that touches MLX.
After each change the engine publishes a new immutable ``EngineView`` (one attribute assignment);
the reader thread answers ``status`` and early ``tokenize`` from it and never sees a half-built kit.
"""

import enum
import functools
import gc
import logging
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import msgspec

from .generation import decode_batch as _batch
from .generation import memory
from .generation import solo as _generate
from .generation import warmup
from .loading import model as _model
from .generation.batcher import Batcher, PrefillFailed
from .protocol import (
    CacheClear, CacheStats, Done, Generate, Load, LoadDraft, ModelInfo, Progress, Ranks, Tokenize, Unload,
    WorkerError,
)
from .distributed.group import RankLost, agreed_failure, first_failure, lost
from .protocol.events import cancelled_done, error_event, internal_error

log = logging.getLogger("worker")


class Route(enum.Enum):
    """Where the scheduler sends a work request."""

    BATCH = "batch"  # a generate the batch takes: admitted while others decode
    ALONE = "alone"  # anything else: runs alone, after the batch ends


class LoadCancelled(Exception):
    """Raised from a load's progress callback when the load was cancelled."""


@dataclass(frozen=True)
class EngineView:
    """What other threads may know of the engine: copies, never the live objects it mutates."""

    model: Optional[ModelInfo] = None
    draft: Optional[ModelInfo] = None
    cache: Optional[CacheStats] = None
    draft_cache: Optional[CacheStats] = None
    tokenizer: object = None  # read-only use: encode for an early `tokenize`
    kv: object = None  # the KV memory ledger: read its `figures` (replaced, never changed) for `status`


def tokenize(tokenizer, req: Tokenize) -> Done:
    ids = tokenizer.encode(req.text, add_special_tokens=req.add_special_tokens)
    return Done(id=req.id, request="tokenize", tokens=[int(t) for t in ids])


def release_memory() -> None:
    """Free what was dropped: Python objects, MLX's buffer cache, and (glibc) the heap pages malloc keeps."""
    gc.collect()
    mx.clear_cache()
    _malloc_trim()


def _malloc_trim() -> None:
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes
            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def _copy(info: Optional[ModelInfo]) -> Optional[ModelInfo]:
    return msgspec.structs.replace(info) if info is not None else None


class Engine:
    def __init__(self, world=None):
        self.world = world  # a distributed.group.World with several ranks, else None
        self.ranks: Optional[Ranks] = None  # the world as `ready` reports it (set by the server at boot)
        self.kit: Optional[_model.ModelKit] = None
        self.batcher: Optional[Batcher] = None  # with max_concurrent > 1 and a model that batches
        self.batch_off: Optional[str] = None  # why batching is off for the loaded model (it was asked for)
        self.view = EngineView()
        self._handlers = {Load: self._load, Unload: self._unload, LoadDraft: self._load_draft,
                          Tokenize: self._tokenize, CacheClear: self._cache_clear, Generate: self._generate}

    def run(self, req, emit: Callable, cancelled: Callable[[], bool]):
        """Run one work request; returns its terminal event (``Done`` or ``Error``), never raises."""
        try:
            if cancelled():
                return cancelled_done(req)
            return self._handlers[type(req)](req, emit, cancelled)
        except WorkerError as exc:
            return error_event(req.id, exc)
        except LoadCancelled:
            return cancelled_done(req)
        except Exception as exc:  # a bug of ours, or an allocation failed: the trace to stderr, the worker carries on
            _raise_if_lost(exc)
            traceback.print_exc()
            return _failure(req.id, exc)
        finally:
            self._publish()

    # ---- batching: the scheduler admits generates while others decode ----------------------------

    def route(self, req) -> Route:
        if self.batcher is None or not isinstance(req, Generate):
            return Route.ALONE
        if self.kit.info.max_concurrent == 1:  # one at a time: the batch's decode step takes prompt lookup's
            return Route.BATCH if req.params.prompt_lookup else Route.ALONE
        return Route.BATCH

    @property
    def batch_busy(self) -> bool:
        return self.batcher is not None and self.batcher.busy

    def batch_room(self) -> bool:
        return self.batcher.room()

    def admit(self, job, emit, cancelled):
        """Start a generate in the batch; returns its terminal event when it ended at once (bad input)."""
        try:
            if cancelled():
                return cancelled_done(job.req)
            self.batcher.admit(job, emit, cancelled)
            return None
        except WorkerError as exc:
            return error_event(job.req.id, exc)
        except Exception as exc:
            _raise_if_lost(exc)
            traceback.print_exc()
            return internal_error(job.req.id, exc)

    def tick(self) -> list:
        """One prefill chunk and one decode step of the batch: the (job, terminal event) pairs that ended."""
        try:
            done = [(f.job, f.event) for f in self.batcher.tick()]
        except PrefillFailed as failed:  # on the request's own cache: it alone ends, the others go on
            _raise_if_lost(failed.__cause__)
            traceback.print_exc()
            done = [(failed.job, _failure(failed.job.req.id, failed.__cause__, "its prefill failed"))]
            release_memory()
        except Exception as exc:  # a bug of ours, or the device failed in a decode step: the batch shares it,
            _raise_if_lost(exc)  # so every request of the batch ends
            traceback.print_exc()
            err = WorkerError("out_of_memory" if _oom(exc) else "internal",
                              f"the batch failed: {type(exc).__name__}: {exc}")
            done = [(f.job, f.event) for f in self.batcher.fail_all(lambda req: error_event(req.id, err))]
            release_memory()
        if done:
            self._publish()
        return done

    def cancelled_late(self, req, event):
        """The request was cancelled (``cancelled: true`` was answered) but ran to its end: make it true."""
        if not isinstance(event, Done) or event.stop_reason == "cancelled":
            return event
        if isinstance(req, Load):
            self._drop_model()
        elif isinstance(req, LoadDraft) and self.kit is not None:
            self.kit.draft = None
            release_memory()
        elif not isinstance(req, Generate):
            return event  # the others are not cancellable once running (see Scheduler.cancel)
        self._publish()
        event.stop_reason = "cancelled"
        return event

    def persist(self) -> None:
        """Write the last request's cache entry to disk (with cache_dir), after its terminal event."""
        if self.kit is None:
            return
        try:
            self.kit.cache.persist()
        except Exception:
            log.exception("prompt cache: could not persist an entry")

    def _publish(self) -> None:
        kit = self.kit
        if kit is None:
            self.view = EngineView()
            return
        draft = kit.draft
        self.view = EngineView(model=_copy(kit.info), draft=_copy(draft.info if draft else None),
                                 cache=CacheStats(**kit.cache.stats()), tokenizer=kit.tokenizer,
                                 draft_cache=CacheStats(**draft.cache.stats()) if draft else None, kv=kit.kv)

    def _drop_model(self) -> None:
        self.kit, self.batcher, self.batch_off = None, None, None
        self._publish()
        release_memory()

    def _progress(self, req, emit, cancelled):
        def progress(fraction: float):
            # with ranks a load is not cancelled midway (a rank that failed early would miss the shared
            # check): it ends, then a cancel drops the model on every rank (Scheduler._conclude)
            if self.world is None and cancelled():
                raise LoadCancelled()
            emit(Progress(id=req.id, stage="load", fraction=fraction))

        return progress

    def _load(self, req: Load, emit, cancelled):
        self._drop_model()  # the old model is released before the new one is read
        progress = self._progress(req, emit, cancelled)
        try:
            kit = self._agreed(lambda: _model.load(req.model_path, req.options, progress,
                                                   self.world.group if self.world else None))
            off = _batching_off(kit)
            if warmup.wanted(kit.options):  # also compiles each batch size's kernels
                progress(0.97)
                kit.info.warmup_s = warmup.warm_up(kit, kit.info.max_concurrent)
            kit.kv = memory.ledger_for(kit)  # the KV layouts measured, the ceiling chosen
            progress(1.0)  # the last cancel check: nothing is published before it
        except BaseException:
            release_memory()  # whatever was built is unreachable now
            raise
        self.kit, self.batch_off = kit, off
        if self.world is not None:
            kit.info.ranks = msgspec.structs.replace(self.ranks, parallel=kit.parallel, ranks=self._shares(kit))
            kit.cache.agree = self.world.agree  # every rank keeps and evicts the same entries
            kit.agree_failure = functools.partial(agreed_failure, self.world)  # a request fails on every rank
        if kit.info.max_concurrent > 1 or (off is None and _batch.blocker(kit) is None):
            self.batcher = Batcher(kit, every_rank=self.world.every if self.world else None)
        return Done(id=req.id, request="load", model=_copy(kit.info), draft=_copy(kit.draft.info if kit.draft else None),
                    warnings=kit.warnings or None)

    def _agreed(self, load: Callable):
        """``load()`` on every rank; with ranks, it succeeds only where it succeeded on all of them (a path
        missing on one host fails the load everywhere, with that rank's error)."""
        if self.world is None:
            return load()
        try:
            out, failure = load(), None
        except WorkerError as exc:
            out, failure = None, [exc.code, exc.message]
        except Exception as exc:  # a bug of ours: the others must hear of it too
            _raise_if_lost(exc)
            traceback.print_exc()
            out, failure = None, ["internal", f"{type(exc).__name__}: {exc}"]
        failed = first_failure(self.world.gather(failure))
        if failed is not None:
            out = None
            release_memory()
            raise failed
        return out

    def _shares(self, kit) -> list:
        """Each rank's entry of `ranks`, with the bytes of the weights it holds."""
        held = self.world.gather(kit.weights_bytes)
        return [msgspec.structs.replace(r, weights_bytes=b) for r, b in zip(self.ranks.ranks, held)]

    def _unload(self, req: Unload, emit, cancelled):
        self._drop_model()
        return Done(id=req.id, request="unload")

    def _kit(self) -> _model.ModelKit:
        if self.kit is None:
            raise WorkerError("no_model", "no model is loaded; send a `load` request first")
        return self.kit

    def _load_draft(self, req: LoadDraft, emit, cancelled):
        kit = self._kit()
        kit.draft = None
        release_memory()
        if req.model_path is not None:
            progress = self._progress(req, emit, cancelled)
            draft = self._agreed(lambda: _model.load_draft(kit, req.model_path, progress))
            progress(1.0)
            kit.draft = draft
        kit.kv = memory.ledger_for(kit)  # the draft's KV too, and its weights out of the default ceiling
        return Done(id=req.id, request="load_draft", draft=_copy(kit.draft.info if kit.draft else None))

    def _tokenize(self, req: Tokenize, emit, cancelled):
        return tokenize(self._kit().tokenizer, req)

    def _cache_clear(self, req: CacheClear, emit, cancelled):
        kit = self._kit()
        dropped = kit.cache.clear()
        if kit.draft is not None:
            kit.draft.cache.clear()
        release_memory()
        return Done(id=req.id, request="cache_clear", cache=CacheStats(**dropped))

    def _generate(self, req: Generate, emit, cancelled):
        label = f"off: {self.batch_off}" if self.batch_off is not None else None  # stats.batching, run alone
        kit = self._kit()
        try:
            return _generate.run(kit, req, emit, cancelled, batching=label)
        finally:
            if kit.kv is not None:
                kit.kv.release(req.id)  # solo.run reserved it; finish() released it unless the run failed


def _batching_off(kit) -> Optional[str]:
    """Why the batch cannot take this model's requests (max_concurrent becomes 1, with a warning), or None."""
    if kit.info.max_concurrent <= 1:
        return None
    why = _batch.blocker(kit)
    if why is not None:
        kit.warnings.append(f"batching is off for this model ({why}): generate requests run one at a time")
        kit.info.max_concurrent = 1
    return why


def _raise_if_lost(exc: Exception) -> None:
    """A collective failed inside the model: a rank is gone, and the engine with it (Scheduler._engine_died)."""
    if isinstance(exc, RankLost):
        raise exc
    if lost(exc):
        raise RankLost(f"a rank is gone: {exc}") from exc


def _oom(exc: Exception) -> bool:
    """An allocation failed (MLX's messages: "[metal::malloc] ...", "... out of memory")."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "malloc" in text or "allocat" in text


def _failure(rid, exc: Exception, what: str = ""):
    """The error event of an unexpected failure: ``out_of_memory`` when an allocation failed, else ``internal``."""
    if not _oom(exc):
        return internal_error(rid, exc, what)
    said = f"{what}: " if what else ""
    return error_event(rid, WorkerError("out_of_memory", f"{said}out of memory: {type(exc).__name__}: {exc} (a "
                                        "smaller options.kv_memory or max_concurrent leaves more room)"))

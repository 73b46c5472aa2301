"""Continuous batching on the engine thread: generate requests admitted while others decode.

A request joins when the batch has room (``load.options.max_concurrent``). Its prompt is prefilled alone,
on its own cache, as generate_step would (with its input embeddings, images included): one chunk per
tick, each tick also running one decode step of the sequences already in the batch, so a long prompt
does not freeze the other streams (chunks of at most ``INTERLEAVE_STEP`` tokens while others decode).
The forward pass of its last prompt token samples its first token; it then joins the ``DecodeBatch``
(decode_batch.py). Every sampled token goes through the request's own ``Run`` (stop strings, channels, tools,
logprobs, cancel); a request that ends leaves the batch with its own cache, stored as a solo run stores it.
"""

import functools
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Union

import mlx.core as mx
from mlx_lm.generate import generation_stream, maybe_quantize_kv_cache
from mlx_lm.models.cache import TokenBuffer

from ..cache.snapshots import bounded
from ..loading.model import ModelKit
from ..protocol import Done, Error
from . import memory, snapshot_policy
from .decode_batch import DecodeBatch, Seq
from .finish import finish, give_back
from .lookup import Lookup
from .prefill import chunk_size, prefill, prefill_chunk, stops
from .run import Cancelled, Run
from .sampling import keyed_sampler, processors_for
from .start import start
from .step import sample

log = logging.getLogger("worker")

INTERLEAVE_STEP = 512  # most prompt tokens per prefill chunk while other sequences decode


@dataclass
class Admission:
    """A request being prefilled, before it joins the batch."""

    job: object  # the scheduler's job (opaque here)
    run: Run
    seq: Seq
    on_prefill: Callable
    embeddings: Optional[mx.array] = None  # input embeddings of the uncached suffix (images), or None
    pos: int = 0  # suffix tokens processed
    started: bool = False
    stops: List[int] = field(default_factory=list)  # checkpoints to snapshot at (prompt positions)


@dataclass
class Finished:
    job: object
    event: Union[Done, Error]


class PrefillFailed(Exception):
    """A prefill chunk of one request failed (on its own cache): that request alone ends, with the cause."""

    def __init__(self, job):
        super().__init__(f"the prefill of {job.req.id} failed")
        self.job = job


@dataclass
class Batcher:
    kit: ModelKit
    batch: DecodeBatch = None
    admitting: List[Admission] = field(default_factory=list)
    every_rank: Optional[Callable[[bool], bool]] = None  # with ranks: true only where true on all of them

    def __post_init__(self):
        self.batch = DecodeBatch(self.kit.model, self.kit.addon)
        self.bounded = [bounded(c) for c in self.kit.cache.fresh()]
        if self.kit.kv is None:  # the engine sets it at load
            self.kit.kv = memory.ledger_for(self.kit)
        self.waits = 0  # ticks an admission waited for memory (tests and logs)

    def fits(self, a: Admission) -> bool:
        """Admission by memory (memory.py): a request whose KV reservation (prompt + max_tokens, or its window)
        does not fit the ceiling beside the running ones' waits while they run; alone, it always fits (start()
        refused it otherwise)."""
        if not self.batch.seqs:
            return True
        fits = self.kit.kv.fits(*memory.claim(a.run))
        return self.every_rank(fits) if self.every_rank else fits  # each rank's memory is its own

    @property
    def busy(self) -> bool:
        return bool(self.admitting or self.batch.seqs)

    def room(self) -> bool:
        return len(self.admitting) + len(self.batch) < self.kit.info.max_concurrent

    def admit(self, job, emit, cancelled) -> None:
        """Start a request (validation, prompt, cache); its errors propagate to the caller."""
        run = start(self.kit, job.req, emit, cancelled, batched=True)
        run.batching = "on" if self.kit.info.max_concurrent > 1 else None
        params, plan, spec = job.req.params, run.plan, run.spec
        procs = processors_for(params, []) + ([run.constraint] if run.constraint else [])
        sampler = keyed_sampler(params, params.seed) if params.seed is not None else run.sampler
        seq = Seq(run=run, job=job, sampler=sampler, processors=procs,
                  context=TokenBuffer(plan.ids) if procs else None, wants_logprobs=run.want_lp,
                  greedy=params.temperature == 0, rope=plan.state, draft=spec.on,
                  k=params.num_draft_tokens if spec.on else params.prompt_lookup_tokens if spec.lookup else 0,
                  # (+ 1: the continuation's first token is the lookup's guess of the pending token)
                  lookup=Lookup(plan.ids, params.prompt_lookup_tokens + 1, spec.lookup_auto) if spec.lookup else None)
        emb = plan.embed(run.lease.reused) if plan.embed is not None else None
        run.out.marks["embedded"] = time.perf_counter()  # phases of MLX_WORKER_LOG=debug (finish.py)
        at = stops(plan.checkpoints, run.lease.reused, run.n_prompt) if self.kit.cache.bounded else []
        self.admitting.append(Admission(job, run, seq, run.prefill_reporter(), emb, stops=at))

    def tick(self) -> List[Finished]:
        """One prefill chunk of the oldest admission, then one decode step of the batch."""
        done = []
        if self.admitting:
            done += self._prefill_chunk(self.admitting[0])
        if self.batch.seqs:
            done += self._decode_step()
        return done

    def fail_all(self, make_event) -> List[Finished]:
        """The batch failed as a whole (an exception in a decode step): every request ends with it."""
        out = [Finished(s.job, make_event(s.run.req)) for s in self.batch.seqs]
        out += [Finished(a.job, make_event(a.run.req)) for a in self.admitting]
        self.batch = DecodeBatch(self.kit.model, self.kit.addon)
        self.admitting.clear()
        self.kit.kv.clear()
        return out

    # ------------------------------------------------------------------

    def _prefill_chunk(self, a: Admission) -> List[Finished]:
        run, model = a.run, self.kit.model
        suffix = run.plan.ids[run.lease.reused:]
        total, cache = len(suffix), run.lease.cache
        state = run.plan.state if run.plan.state is not None else nullcontext()
        try:
            if not a.started:
                if not self.fits(a):
                    self.waits += 1
                    if self.waits % 1000 == 1:
                        log.info("batching: %s waits for memory (%d running)", run.req.id, len(self.batch))
                    return []
                a.started = True
                self.kit.kv.reserve(run.req.id, *memory.claim(run))  # released by finish() or below
                if not self.batch.seqs:
                    mx.reset_peak_memory()
                a.on_prefill(0, total)
            step = self.kit.options.prefill_step_size
            if self.batch.seqs:
                step = min(step, INTERLEAVE_STEP)
            if total - a.pos > 1:  # all but the last token, in chunks, as generate_step
                n = chunk_size(total - a.pos, step)
                at = [c - run.lease.reused for c in a.stops if a.pos < c - run.lease.reused <= a.pos + n]
                n = at[0] - a.pos if at else n  # a chunk ends at a checkpoint, for its snapshot
                with mx.stream(generation_stream), state:
                    emb = a.embeddings[a.pos:a.pos + n] if a.embeddings is not None else None
                    prefill_chunk(model, cache, suffix[a.pos:a.pos + n], emb,
                                  functools.partial(maybe_quantize_kv_cache, **run.quant))
                a.pos += n
                if at:
                    snapshot_policy.snapshot_into(run.snapshots, cache, run.lease.reused + a.pos)
                a.on_prefill(a.pos, total)
                mx.clear_cache()
                return []
        except Cancelled:
            self.admitting.remove(a)
            run.out.reason = "cancelled"
            run.end_stream()
            return [Finished(a.job, finish(run, cache))]
        except BaseException as exc:
            self.admitting.remove(a)
            self.kit.kv.release(run.req.id)
            give_back(run)
            if isinstance(exc, Exception):  # its own cache failed (out of memory?): the others go on
                raise PrefillFailed(a.job) from exc
            raise
        self.admitting.remove(a)
        return self._join(a, suffix[-1], cache, state)

    def _join(self, a: Admission, last: int, cache: list, state) -> List[Finished]:
        """The last prompt token's forward pass samples the first token; the sequence joins the batch (with
        ``max_tokens`` 0 it ends there, its prompt cached, as generate_step ends)."""
        seq, run = a.seq, a.run
        run.out.marks["prefilled"] = time.perf_counter()
        with mx.stream(generation_stream), state:
            emb = a.embeddings[-1:][None] if a.embeddings is not None else None
            kw = {"input_embeddings": emb} if emb is not None else {}
            logits = self.kit.model(mx.array([last])[None], cache=cache, **kw)[:, -1, :]
            # kv_bits: a sequence joins quantized, whatever its length (PROTOCOL.md, quantized_kv_start)
            maybe_quantize_kv_cache(cache, **{**run.quant, "quantized_kv_start": 0})
            if run.budget == 0:
                mx.eval(logits, [c.state for c in cache])
                total = run.n_prompt - run.lease.reused
                a.on_prefill(total, total)
                run.end_stream()
                return [Finished(a.job, finish(run, cache))]
            context = mx.array(run.plan.ids) if seq.processors else None
            y, logprobs = sample(logits, seq.processors, context, seq.sampler)
            mx.async_eval(y, logprobs)
        seq.first, seq.on_prefill = True, a.on_prefill
        self.batch.add(seq, cache, y, logprobs[0], self._draft_prefill(seq) if seq.draft else None)
        return []

    def _draft_prefill(self, seq: Seq) -> list:
        """The draft's cache of a draft row: its best cached prefix, then the prompt but its last token."""
        run, draft = seq.run, self.kit.draft
        lease = draft.cache.take(run.plan.key, run.req.cache_key)
        ids = run.plan.ids
        quantize = functools.partial(maybe_quantize_kv_cache, **{**run.quant, "quantized_kv_start": 0})
        with mx.stream(generation_stream):
            prefill(draft.model, lease.cache, ids[lease.reused:], self.kit.options.prefill_step_size, quantize,
                    lambda n: None)
        seq.last, self.batch.draft_model = ids[-1], draft.model
        return lease.cache

    def _decode_step(self) -> List[Finished]:
        rows = self.batch.step()
        n_batch, ended, left = len(rows), [], {}
        for i, (seq, items) in enumerate(rows):
            run = seq.run
            run.peers = max(run.peers, n_batch)
            if seq.first:  # as generate_step: a snapshot of prompt + first token, then progress 1.0
                seq.first = False
                snapshot_policy.add(run.snapshots, run.n_prompt + 1, self._take(i))
                total = run.n_prompt - run.lease.reused
                seq.on_prefill(total, total)
            before = len(run.out.generated)
            for j, (token, lp, from_draft) in enumerate(items):
                stop = run.accept(int(token), lp, from_draft)
                if stop or len(run.out.generated) >= run.budget:
                    ended.append(i)
                    left[i] = len(items) - j - 1  # fed (accepted proposals) but not reported
                    break
            else:
                n = len(run.out.generated)
                if seq.lookup is not None:
                    seq.lookup.extend(run.out.generated[before:])
                every = snapshot_policy.DECODE_SNAPSHOT_EVERY  # a step of several tokens may pass a multiple
                at = n if n // every == before // every else n - n % every
                snapshot_policy.while_decoding(run.decode_snaps, at, run.n_prompt + n, self._take(i))
        out = []
        for i, cache in zip(ended, self.batch.remove(ended)):
            seq = rows[i][0]
            if left[i]:
                for c in cache:
                    c.trim(left[i])
            seq.run.end_stream()
            out.append(Finished(seq.job, finish(seq.run, cache)))
            if seq.draft_cache is not None:
                run = seq.run
                self.kit.draft.cache.put(run.plan.key + run.out.generated, seq.draft_cache, run.req.cache_key)
        return out

    def _take(self, row: int):
        """How to snapshot a row's bounded layers holding n tokens (None: the model has none)."""
        return lambda n: self.batch.snapshot(row, n, self.bounded) if any(self.bounded) else None

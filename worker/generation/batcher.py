"""Continuous batching on the engine thread: generate requests admitted while others decode.

A request joins when the batch has room (``load.options.max_concurrent``). Its prompt is prefilled alone,
on its own cache, as generate_step would (with its input embeddings, images included): one chunk per
tick, each tick also running one decode step of the sequences already in the batch, so a long prompt
does not freeze the other streams (chunks of at most ``INTERLEAVE_STEP`` tokens while others decode).
The forward pass of its last prompt token samples its first token; it then joins the ``DecodeBatch``
(batch.py). Every sampled token goes through the request's own ``Run`` (stop strings, channels, tools,
logprobs, cancel); a request that ends leaves the batch with its own cache, stored as a solo run stores it.
"""

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import mlx.core as mx
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import TokenBuffer

from .decode_batch import DecodeBatch, Seq
from ..cache.snapshots import bounded
from .solo import DECODE_SNAPSHOT_EVERY, DECODE_SNAPSHOTS
from .run import Cancelled, Run, finish, give_back, start
from .sampling import keyed_sampler, processors_for

log = logging.getLogger("worker")

INTERLEAVE_STEP = 512  # most prompt tokens per prefill chunk while other sequences decode


@dataclass
class Admission:
    """A request being prefilled, before it joins the batch."""

    job: Any
    run: Run
    seq: Seq
    on_prefill: Callable
    embeddings: Any = None  # input embeddings of the uncached suffix (images), or None
    pos: int = 0  # suffix tokens processed
    started: bool = False


@dataclass
class Finished:
    job: Any
    event: Any


@dataclass
class Batcher:
    kit: Any
    batch: DecodeBatch = None
    admitting: List[Admission] = field(default_factory=list)

    def __post_init__(self):
        self.batch = DecodeBatch(self.kit.model, self.kit.addon)
        self.bounded = [bounded(c) for c in self.kit.cache.fresh()]
        self.kv_per_token = _kv_bytes_per_token(self.kit)
        self.waits = 0  # ticks an admission waited for memory (tests and logs)

    def fits(self, a: Admission) -> bool:
        """Admission by memory: a request whose KV cache (prompt + max_tokens, at most the context) would
        not fit beside what is allocated waits while others run; alone, it always runs."""
        if not self.batch.seqs:
            return True
        run = a.run
        tokens = run.n_prompt - run.lease.reused + run.budget
        need = tokens * self.kv_per_token
        return mx.get_active_memory() + need <= mx.get_memory_limit()

    @property
    def busy(self) -> bool:
        return bool(self.admitting or self.batch.seqs)

    def room(self) -> bool:
        return len(self.admitting) + len(self.batch) < self.kit.info.max_concurrent

    def admit(self, job, emit, cancelled) -> None:
        """Start a request (validation, prompt, cache); its errors propagate to the caller."""
        run = start(self.kit, job.req, emit, cancelled)
        run.batching = "on"
        params, plan = job.req.params, run.plan
        procs = processors_for(self.kit, params, []) + ([run.constraint] if run.constraint else [])
        sampler = keyed_sampler(params, params.seed) if params.seed is not None else run.sampler
        seq = Seq(run=run, job=job, sampler=sampler, processors=procs,
                  context=TokenBuffer(plan.ids) if procs else None, wants_logprobs=run.want_lp,
                  greedy=params.temperature == 0, rope=plan.state)
        emb = plan.embed(run.lease.reused) if plan.embed is not None else None
        self.admitting.append(Admission(job, run, seq, run.prefill_reporter(), emb))

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
                if not self.batch.seqs:
                    mx.reset_peak_memory()
                a.on_prefill(0, total)
            step = self.kit.options.prefill_step_size
            if self.batch.seqs:
                step = min(step, INTERLEAVE_STEP)
            remaining = total - a.pos - 1
            if remaining > 0:  # all but the last token, in chunks, as generate_step
                n = min(step, remaining)
                with mx.stream(generation_stream), state:
                    emb = a.embeddings[a.pos:a.pos + n][None] if a.embeddings is not None else None
                    kw = {"input_embeddings": emb} if emb is not None else {}
                    model(mx.array(suffix[a.pos:a.pos + n])[None], cache=cache, **kw)
                    mx.eval([c.state for c in cache])
                a.pos += n
                a.on_prefill(a.pos, total)
                mx.clear_cache()
                return []
        except Cancelled:
            self.admitting.remove(a)
            run.out.reason = "cancelled"
            run.end_stream()
            return [Finished(a.job, finish(run, cache))]
        except BaseException:
            self.admitting.remove(a)
            give_back(run)
            raise
        self.admitting.remove(a)
        self._join(a, suffix[-1], cache, state)
        return []

    def _join(self, a: Admission, last: int, cache: list, state) -> None:
        """The last prompt token's forward pass samples the first token; the sequence joins the batch."""
        seq, run = a.seq, a.run
        with mx.stream(generation_stream), state:
            emb = a.embeddings[-1:][None] if a.embeddings is not None else None
            kw = {"input_embeddings": emb} if emb is not None else {}
            logits = self.kit.model(mx.array([last])[None], cache=cache, **kw)[:, -1, :]
            if seq.processors:
                ctx = mx.array(run.plan.ids)
                for p in seq.processors:
                    logits = p(ctx, logits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            y = seq.sampler(logprobs)
            mx.async_eval(y, logprobs)
        seq.first, seq.on_prefill = True, a.on_prefill
        self.batch.add(seq, cache, y, logprobs[0])

    def _decode_step(self) -> List[Finished]:
        rows = self.batch.step()
        n_batch, ended = len(rows), []
        for i, (seq, token, lp) in enumerate(rows):
            run = seq.run
            run.peers = max(run.peers, n_batch)
            if seq.first:  # as generate_step: a snapshot of prompt + first token, then progress 1.0
                seq.first = False
                self._snapshot(i, run, run.snapshots, run.n_prompt + 1)
                total = run.n_prompt - run.lease.reused
                seq.on_prefill(total, total)
            stop = run.accept(int(token), lp)
            n = len(run.out.generated)
            if stop or n >= run.budget:
                ended.append(i)
            elif n % DECODE_SNAPSHOT_EVERY == 0:
                self._snapshot(i, run, run.decode_snaps, run.n_prompt + n)
                del run.decode_snaps[:-DECODE_SNAPSHOTS]
        out = []
        for i, cache in zip(ended, self.batch.remove(ended)):
            seq = rows[i][0]
            seq.run.end_stream()
            out.append(Finished(seq.job, finish(seq.run, cache)))
        return out

    def _snapshot(self, row: int, run: Run, into: list, n: int) -> None:
        if any(self.bounded) and not (into and into[-1].n >= n):
            into.append(self.batch.snapshot(row, n, self.bounded))



def _kv_bytes_per_token(kit) -> int:
    """KV bytes one token adds to a fresh cache (a one-token forward pass; layers allocate 256 at once)."""
    cache = kit.cache.fresh()
    kit.model(mx.array([[0]]), cache=cache)
    mx.eval([c.state for c in cache])
    per = sum(c.nbytes for c in cache) // 256
    del cache
    mx.clear_cache()
    return max(1, per)

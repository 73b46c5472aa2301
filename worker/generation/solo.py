"""One generate request run alone: the token source (mlx-lm's ``generate_step``, or with a draft model
speculation.py's source) driven through the request's ``Run``. Runs on the engine thread only; emits events
through ``emit``, never formats JSON. The batch (batcher.py) shares everything but the token source."""

import functools
import time
from contextlib import nullcontext
from typing import Callable

import mlx.core as mx
from mlx_lm.generate import generate_step, maybe_quantize_kv_cache

from ..cache import cache_len
from ..cache.snapshots import bounded, take_snapshot
from ..loading.model import ModelKit
from ..protocol import Done, Generate
from . import snapshot_policy
from .finish import finish, give_back
from .memory import claim
from .prefill import prefill, stops
from .run import Cancelled, Run
from .sampling import processors_for
from .speculation import speculative_source
from .start import start


def _to_checkpoints(run: Run, embeddings, on_prefill) -> int:
    """Prefill up to the prompt's last checkpoint, a snapshot at each (bounded layers only: the others are cut
    back anywhere); returns the tokens processed. generate_step does the rest."""
    plan, lease, kit = run.plan, run.lease, run.kit
    at = stops(plan.checkpoints, lease.reused, len(plan.ids)) if kit.cache.bounded else []
    done, total = 0, len(plan.ids) - lease.reused
    if at:
        on_prefill(0, total)
    quantize = functools.partial(maybe_quantize_kv_cache, **run.quant)
    for c in at:
        part = c - lease.reused - done
        emb = embeddings[done:done + part] if embeddings is not None else None
        prefill(kit.model, lease.cache, plan.ids[lease.reused + done:c], kit.options.prefill_step_size, quantize,
                lambda n, d=done: on_prefill(d + n, total), emb, stop=part)
        done += part
        snapshot_policy.snapshot_into(run.snapshots, lease.cache, c)
    return done


def plain_source(run: Run, on_prefill):
    """mlx-lm's generate_step over the uncached suffix, as (token, logprobs, from_draft)."""
    kit, plan, lease, params = run.kit, run.plan, run.lease, run.req.params
    ids, cached = plan.ids, lease.reused
    embeddings = plan.embed(cached) if plan.embed is not None else None
    run.out.marks["embedded"] = time.perf_counter()
    done = _to_checkpoints(run, embeddings, on_prefill)
    # generate_step hands the processors only the tokens it is given: add back the part before them
    processors = processors_for(params, ids[:cached + done]) + ([run.constraint] if run.constraint else [])
    total = len(ids) - cached
    gen = generate_step(
        mx.array(ids[cached + done:]), kit.model, max_tokens=run.budget, sampler=run.sampler,
        logits_processors=processors or None, prompt_cache=lease.cache,
        prefill_step_size=kit.options.prefill_step_size,
        prompt_progress_callback=(lambda n, _: on_prefill(done + n, total)) if done else on_prefill,
        input_embeddings=embeddings[done:] if embeddings is not None and done else embeddings, **run.quant)
    try:
        for token, logprobs in gen:
            yield token, logprobs, False
    finally:
        gen.close()


def _with_snapshots(gen, cache, out: list):
    """Pass ``gen`` through, snapshotting the bounded layers as snapshot_policy.py says."""
    try:
        for i, item in enumerate(gen, 1):
            yield item
            snapshot_policy.while_decoding(out, i, cache_len(cache), lambda n: take_snapshot(cache, n))
    finally:
        gen.close()


def _decode(run: Run, gen) -> None:
    """Drive the token source through the request: stop conditions, held-back text, token events."""
    try:
        for token, logprobs, from_draft in gen:
            if run.accept(int(token), logprobs, from_draft):
                break
    except Cancelled:
        run.out.reason = "cancelled"
    finally:
        gen.close()
    run.end_stream()


def run(kit: ModelKit, req: Generate, emit: Callable, cancelled: Callable[[], bool], batching=None) -> Done:
    r = start(kit, req, emit, cancelled)
    r.batching = batching
    if kit.kv is not None:  # released by finish(), or by the engine when the run fails
        kit.kv.reserve(req.id, *claim(r))
    if req.params.seed is not None:
        mx.random.seed(req.params.seed)
    on_prefill = r.prefill_reporter()
    mx.reset_peak_memory()
    d_lease = None
    if r.spec.solo:
        d_lease = kit.draft.cache.take(r.plan.key, req.cache_key)
        gen = speculative_source(r, d_lease, on_prefill)
        n_new = r.n_prompt - r.lease.reused
        r.on_first = functools.partial(on_prefill, n_new, n_new)
    else:  # generate_step reports the end of prefill itself
        gen = plain_source(r, on_prefill)
    if not r.spec.solo and any(bounded(c) for c in r.lease.cache):
        gen = _with_snapshots(gen, r.lease.cache, r.decode_snaps)
    try:
        with r.plan.state if r.plan.state is not None else nullcontext():
            _decode(r, gen)
    except BaseException:
        give_back(r)
        raise
    done = finish(r, r.lease.cache)
    if d_lease is not None:
        kit.draft.cache.put(r.plan.key + r.out.generated, d_lease.cache, req.cache_key)
    return done

"""One generate request run alone: the token source (mlx-lm's generate_step, or its speculative
variant with a draft model) driven through the request's ``Run`` (request.py).

Runs on the engine thread only. Emits events through ``emit``; never formats JSON. The batch path
(batch.py) shares everything but the token source.
"""

import functools
import time
from contextlib import nullcontext
from typing import Callable, List

import mlx.core as mx
from mlx_lm.generate import generate_step, maybe_quantize_kv_cache, speculative_generate_step

from ..cache import cache_len
from ..cache.snapshots import bounded
from ..loading.model import ModelKit
from ..protocol import Done, Generate
from .run import Cancelled, Run, finish, give_back, snapshot_into, start
from .sampling import processors_for

DECODE_SNAPSHOT_EVERY = 4  # tokens between snapshots of the bounded layers while decoding
DECODE_SNAPSHOTS = 2  # the newest ones are kept: 1-4 and 5-8 tokens before the end


def _prefill(model, cache, tokens: List[int], step: int, quantize, on_chunk) -> None:
    """Process all but the last token into ``cache`` in chunks (as generate_step does)."""
    pos = 0
    while len(tokens) - pos > 1:
        n = min(step, len(tokens) - pos - 1)
        model(mx.array(tokens[pos:pos + n])[None], cache=cache)
        quantize(cache)
        mx.eval([c.state for c in cache])
        pos += n
        on_chunk(pos)
        mx.clear_cache()


def _plain_source(run: Run, on_prefill):
    """mlx-lm's generate_step over the uncached suffix, as (token, logprobs, from_draft)."""
    kit, plan, lease, params = run.kit, run.plan, run.lease, run.req.params
    ids, cached = plan.ids, lease.reused
    # generate_step hands the processors only the tokens it is given: add back the cached prefix
    processors = processors_for(kit, params, ids[:cached]) + ([run.constraint] if run.constraint else [])
    embeddings = plan.embed(cached) if plan.embed is not None else None
    run.out.marks["embedded"] = time.perf_counter()
    gen = generate_step(
        mx.array(ids[cached:]), kit.model, max_tokens=run.budget, sampler=run.sampler,
        logits_processors=processors or None, prompt_cache=lease.cache,
        prefill_step_size=kit.options.prefill_step_size, prompt_progress_callback=on_prefill,
        input_embeddings=embeddings, **run.quant)
    try:
        for token, logprobs in gen:
            yield token, logprobs, False
    finally:
        gen.close()


class _NoCache:
    """The cache entry of a layer that keeps none (Gemma 4's KV-shared layers: mlx-lm's cache list is
    shorter than the model's layers). speculative_generate_step splits main and draft caches at
    ``len(model.layers)``: the main cache is padded with these, or the draft's layers land in the main's."""

    state = ()

    def is_trimmable(self):
        return True

    def trim(self, n):
        return n

    def update_and_fetch(self, keys, values):
        return keys, values


def _speculative_source(run: Run, d_lease, on_prefill):
    """Prefill main and draft caches ourselves (with progress and cancel), then mlx-lm speculates."""
    kit, ids, lease, params = run.kit, run.plan.ids, run.lease, run.req.params
    draft, step = kit.draft, kit.options.prefill_step_size
    # quantize from the start: speculative_generate_step would swap cache objects we cannot see
    quantize = functools.partial(maybe_quantize_kv_cache, **{**run.quant, "quantized_kv_start": 0})
    suffix = ids[lease.reused:]
    on_prefill(0, len(suffix))

    def check(_):
        if run.cancelled():
            raise Cancelled()

    # the main model first: a cancel mid-prefill then keeps the expensive part for a re-send
    _prefill(kit.model, lease.cache, suffix, step, quantize, lambda n: on_prefill(n, len(suffix)))
    _prefill(draft.model, d_lease.cache, ids[d_lease.reused:], step, quantize, check)
    quantize(lease.cache)
    quantize(d_lease.cache)

    def draft_model(*args, **kwargs):  # each call during decoding proposes one token
        run.proposed += 1
        return draft.model(*args, **kwargs)

    # speculative_generate_step hands the processors only the last prompt token: add back the rest
    processors = processors_for(kit, params, ids[:-1])
    yield from speculative_generate_step(
        mx.array(ids[-1:]), kit.model, draft_model, num_draft_tokens=params.num_draft_tokens,
        max_tokens=run.budget, sampler=run.sampler, logits_processors=processors or None,
        prompt_cache=lease.cache + [_NoCache() for _ in range(len(kit.model.layers) - len(lease.cache))]
        + d_lease.cache, **run.quant)


def _with_snapshots(gen, cache, out: list):
    """Pass ``gen`` through, snapshotting the bounded layers every few tokens into ``out`` (the newest
    DECODE_SNAPSHOTS): a follow-up whose re-rendered answer differs in its last tokens (a trimmed
    newline, a stop string cut off) then resumes a few tokens before the end, not at the prompt."""
    try:
        for i, item in enumerate(gen, 1):
            yield item
            if i % DECODE_SNAPSHOT_EVERY == 0:
                snapshot_into(out, cache, cache_len(cache))
                del out[:-DECODE_SNAPSHOTS]
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
    if req.params.seed is not None:
        mx.random.seed(req.params.seed)
    on_prefill = r.prefill_reporter()
    mx.reset_peak_memory()
    d_lease = None
    if r.spec.on:
        d_lease = kit.draft.cache.take(r.plan.key, req.cache_key)
        gen = _speculative_source(r, d_lease, on_prefill)
        n_new = r.n_prompt - r.lease.reused
        r.on_first = functools.partial(on_prefill, n_new, n_new)
    else:  # generate_step reports the end of prefill itself
        gen = _plain_source(r, on_prefill)
    if not r.spec.on and any(bounded(c) for c in r.lease.cache):
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

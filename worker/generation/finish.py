"""A generate request's end: its cache stored back (or given back when it failed), its stats, its terminal event."""

import logging
import time

import mlx.core as mx

from ..cache import cache_len
from ..prompting.tools import wire_call
from ..protocol import Done, Stats
from .run import Run

log = logging.getLogger("worker")


def give_back(run: Run) -> None:
    """A request failed: the cache it took goes back if nothing touched it yet."""
    if cache_len(run.lease.cache) == run.lease.reused:
        run.kit.cache.put(run.plan.key, run.lease.cache, run.req.cache_key, run.snapshots)


def finish(run: Run, cache: list) -> Done:
    """Store the request's cache, emit its stats, return its terminal event."""
    kit, req, out, params = run.kit, run.req, run.out, run.req.params
    out.marks["decoded"] = time.perf_counter()
    if kit.kv is not None:
        kit.kv.release(req.id)  # its KV reservation (memory.py)
    kit.cache.put(run.plan.key + out.generated, cache, req.cache_key, run.snapshots + run.decode_snaps)
    if run.plan.remember is not None and out.generated:
        run.plan.remember(out.generated)
    if out.reason is None:
        out.reason = "cancelled" if run.cancelled() else (
            "max_tokens" if run.budget == params.max_tokens else "context_full")
    run.emit(stats(run))
    if log.isEnabledFor(logging.DEBUG):  # MLX_WORKER_LOG=debug: where the time to the first token went
        marks = dict(out.marks, first=out.t_first, stored=time.perf_counter())
        log.debug("generate %s: %s ms (cached %d of %d)", req.id, ", ".join(
            f"{k} {(v - run.tic) * 1000:.1f}" for k, v in marks.items() if v is not None),
            run.lease.reused, run.n_prompt)
    stream = run.stream
    if stream.calls and out.reason == "eos":
        out.reason = "tool_calls"
    return Done(id=req.id, request="generate", stop_reason=out.reason, stop_string=stream.stop_string,
                stop_token=out.stop_token, text=stream.text, cached_tokens=run.lease.reused,
                cache_miss_reason=run.lease.miss_reason,
                reasoning="".join(stream.reasoning) if stream.markers.think else None,
                tool_calls=[wire_call(c) for c in stream.calls] or None)


def stats(run: Run) -> Stats:
    toc, out, spec, cached = time.perf_counter(), run.out, run.spec, run.lease.reused
    n_gen, t_first, n_prompt = len(out.generated), out.t_first, run.n_prompt
    prompt_s = (t_first or toc) - run.tic
    decode_s = toc - t_first if t_first is not None else 0.0
    return Stats(
        id=run.req.id, prompt_tokens=n_prompt, cached_tokens=cached, cache_miss_reason=run.lease.miss_reason,
        generated_tokens=n_gen,
        # no first token (cancelled in prefill, max_tokens 0): no time to it and no rate, rather than a 0
        ttft_s=round(prompt_s, 6) if t_first is not None else None,
        prompt_tps=round((n_prompt - cached) / prompt_s, 3) if t_first is not None and prompt_s > 0 else None,
        generation_tps=round((n_gen - 1) / decode_s, 3) if n_gen > 1 and decode_s > 0 else None,
        peak_memory_bytes=int(mx.get_peak_memory()),
        total_s=round(toc - run.tic, 6),
        speculative=spec.label, prompt_lookup=spec.lookup_label,
        draft_tokens_accepted=out.from_draft if spec.proposing else None,
        draft_tokens_proposed=run.proposed if spec.proposing else None,
        reasoning_tokens=run.stream.reasoning_tokens if run.stream.markers.think else None,
        batching=run.batching, concurrent=run.peers if run.batching else None,
    )

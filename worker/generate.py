"""One generate request: prompt -> token ids -> mlx-lm generate_step -> token events, stats, done.

Runs on the engine thread only. Emits events through ``emit``; never formats JSON.
"""

import collections
import functools
import time
from contextlib import nullcontext
from typing import Callable, List

import mlx.core as mx
from mlx_lm.generate import generate_step, maybe_quantize_kv_cache, speculative_generate_step

from .model import ModelKit
from .prompt import build_prompt
from .protocol import Done, Generate, Progress, Stats, Token, WorkerError
from .sampling import JsonConstraint, logprob_report, processors_for, sampler_for
from .textstream import TextStream

PROGRESS_INTERVAL_S = 0.1


class Cancelled(Exception):
    """Raised from inside prefill when the request was cancelled."""


def _speculation(kit: ModelKit, req: Generate, plan) -> str:
    """"on", or why the draft model is not used for this request ("" when there is none)."""
    if kit.draft is None:
        return ""
    for cond, why in ((not req.params.speculative, "request"), (plan.embeddings is not None, "images"),
                      (req.params.json_schema is not None, "json_schema"),
                      (kit.options.max_kv_size is not None, "max_kv_size")):
        if cond:
            return f"off: {why}"
    return "on"


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


def _speculative(kit, ids, lease, d_lease, params, budget, sampler, processors, quant, on_prefill,
                 cancelled, proposed):
    """Prefill main and draft caches ourselves (with progress and cancel), then mlx-lm speculates."""
    draft, step = kit.draft, kit.options.prefill_step_size
    # quantize from the start: speculative_generate_step would swap cache objects we cannot see
    quantize = functools.partial(maybe_quantize_kv_cache, **{**quant, "quantized_kv_start": 0})
    suffix = ids[lease.reused:]
    on_prefill(0, len(suffix))

    def check(_):
        if cancelled():
            raise Cancelled()

    # the main model first: a cancel mid-prefill then keeps the expensive part for a re-send
    _prefill(kit.model, lease.cache, suffix, step, quantize, lambda n: on_prefill(n, len(suffix)))
    _prefill(draft.model, d_lease.cache, ids[d_lease.reused:], step, quantize, check)
    quantize(lease.cache)
    quantize(d_lease.cache)
    def draft_model(*args, **kwargs):  # each call during decoding proposes one token
        proposed[0] += 1
        return draft.model(*args, **kwargs)

    yield from speculative_generate_step(
        mx.array(ids[-1:]), kit.model, draft_model, num_draft_tokens=params.num_draft_tokens,
        max_tokens=budget, sampler=sampler, logits_processors=processors or None,
        prompt_cache=lease.cache + d_lease.cache, **quant)


def run(kit: ModelKit, req: Generate, emit: Callable, cancelled: Callable[[], bool]) -> Done:
    tic = time.perf_counter()
    params, opts = req.params, kit.options
    plan = build_prompt(kit, req)
    ids = plan.ids
    n_prompt = len(ids)
    ctx = kit.info.context_length if opts.max_kv_size is None else None
    if ctx is not None and n_prompt >= ctx:
        raise WorkerError("context_overflow", f"the prompt has {n_prompt} tokens; the context holds {ctx}")
    bad_stop = [t for t in params.stop_token_ids if t >= kit.info.vocab_size]
    if bad_stop:
        raise WorkerError("invalid_params", f"params.stop_token_ids outside the vocabulary: {bad_stop[:5]}")
    budget = params.max_tokens if ctx is None else min(params.max_tokens, ctx - n_prompt)
    if params.seed is not None:
        mx.random.seed(params.seed)
    sampler = sampler_for(params)
    constraint = JsonConstraint(kit, params.json_schema) if params.json_schema is not None else None
    speculation = _speculation(kit, req, plan)
    bad_bias = [t for t in params.logit_bias if t >= kit.info.vocab_size]
    if bad_bias:
        raise WorkerError("invalid_params", f"params.logit_bias has ids outside the vocabulary: {bad_bias[:5]}")

    lease = kit.cache.take(plan.key, req.cache_key)
    cached = lease.reused
    processors = processors_for(kit, params, ids[:cached]) + ([constraint] if constraint else [])
    quant = dict(kv_bits=opts.kv_bits, kv_group_size=opts.kv_group_size,
                 quantized_kv_start=opts.quantized_kv_start)
    last_progress = [0.0]

    def on_prefill(processed: int, total: int):
        if cancelled():
            raise Cancelled()
        now = time.perf_counter()
        if processed in (0, total) or now - last_progress[0] >= PROGRESS_INTERVAL_S:
            last_progress[0] = now
            done = cached + processed
            emit(Progress(id=req.id, stage="prompt", fraction=round(done / n_prompt, 4),
                          total=n_prompt, cached=cached, processed=done))

    mx.reset_peak_memory()
    d_lease, proposed = None, [0]
    if speculation == "on":
        d_lease = kit.draft.cache.take(plan.key, req.cache_key)
        gen = _speculative(kit, ids, lease, d_lease, params, budget, sampler, processors, quant,
                           on_prefill, cancelled, proposed)
    else:
        gen = generate_step(
            mx.array(ids[cached:]), kit.model, max_tokens=budget, sampler=sampler,
            logits_processors=processors or None, prompt_cache=lease.cache,
            prefill_step_size=opts.prefill_step_size, prompt_progress_callback=on_prefill,
            input_embeddings=plan.embeddings[cached:] if plan.embeddings is not None else None,
            **quant)

    stream = TextStream(kit.tokenizer.detokenizer, params.stop)
    eos, stop_ids = set(kit.info.eos_token_ids), set(params.stop_token_ids)
    extras = collections.deque()  # (logprob report, from_draft) per token not yet released
    want_lp = params.top_logprobs > 0
    n_gen, n_draft, reason, stop_token, t_first = 0, 0, None, None, None
    generated = []

    def release(text, tok_ids):
        if not (text or tok_ids):
            return
        ev = Token(id=req.id, text=text, tokens=tok_ids)
        if want_lp or speculation == "on":
            got = [extras.popleft() for _ in tok_ids]
            ev.logprobs = [g[0] for g in got] if want_lp else None
            ev.from_draft = [g[1] for g in got] if speculation == "on" else None
        emit(ev)

    try:
        with plan.state if plan.state is not None else nullcontext():
            for out in gen:
                token, logprobs = int(out[0]), out[1]
                from_draft = bool(out[2]) if len(out) > 2 else False
                if t_first is None:
                    t_first = time.perf_counter()
                    if speculation == "on":
                        on_prefill(n_prompt - cached, n_prompt - cached)
                n_gen += 1
                n_draft += from_draft
                generated.append(token)
                if token in eos or token in stop_ids:
                    reason, stop_token = ("eos" if token in eos else "stop_token"), token
                    break
                if want_lp or speculation == "on":
                    extras.append((logprob_report(kit, token, logprobs, params.top_logprobs)
                                   if want_lp else None, from_draft))
                release(*stream.add(token))
                if stream.stop_string is not None:
                    reason = "stop_string"
                    break
                if cancelled():
                    reason = "cancelled"
                    break
    except Cancelled:
        reason = "cancelled"
    finally:
        gen.close()
    kit.cache.put(plan.key + generated, lease.cache, req.cache_key)
    if d_lease is not None:
        kit.draft.cache.put(plan.key + generated, d_lease.cache, req.cache_key)
    if reason is None:
        reason = "max_tokens" if budget == params.max_tokens else "context_full"
        if cancelled():
            reason = "cancelled"
    if reason != "stop_string":
        release(*stream.finish())
    toc = time.perf_counter()
    prompt_s = (t_first or toc) - tic
    decode_s = toc - t_first if t_first is not None else 0.0
    emit(Stats(
        id=req.id, prompt_tokens=n_prompt, cached_tokens=cached,
        cache_miss_reason=lease.miss_reason, generated_tokens=n_gen,
        ttft_s=round(prompt_s, 6) if t_first is not None else 0.0,
        prompt_tps=round((n_prompt - cached) / prompt_s, 3) if t_first is not None and prompt_s > 0 else 0.0,
        generation_tps=round((n_gen - 1) / decode_s, 3) if n_gen > 1 and decode_s > 0 else 0.0,
        peak_memory_bytes=int(mx.get_peak_memory()), total_s=round(toc - tic, 6),
        speculative=speculation or None, draft_tokens_accepted=n_draft if speculation == "on" else None,
        draft_tokens_proposed=proposed[0] if speculation == "on" else None,
    ))
    return Done(id=req.id, request="generate", stop_reason=reason, stop_string=stream.stop_string,
                stop_token=stop_token, text=stream.text, cached_tokens=cached,
                cache_miss_reason=lease.miss_reason)

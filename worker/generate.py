"""One generate request: validate -> prompt plan -> token source -> decode loop -> stats and done.

Runs on the engine thread only. Emits events through ``emit``; never formats JSON.
"""

import collections
import functools
import json
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import mlx.core as mx
import msgspec
from mlx_lm.generate import generate_step, maybe_quantize_kv_cache, speculative_generate_step

from .cache import cache_len
from .cache.layout import trimmable_span
from .cache.snapshots import bounded, take_snapshot
from .model import ModelKit
from .prompt import build_prompt
from .channels import Channels, Markers, initial_channel
from .protocol import Done, FunctionCall, Generate, Progress, Stats, Token, ToolCall, ToolCallEvent, WorkerError
from .sampling import AnswerOnly, JsonConstraint, ToolCallConstraint, logprob_report, processors_for, sampler_for
from .tools import call_grammar, tools_on

log = logging.getLogger("worker")

PROGRESS_INTERVAL_S = 0.1
DECODE_SNAPSHOT_EVERY = 4  # tokens between snapshots of the bounded layers while decoding
DECODE_SNAPSHOTS = 2  # the newest ones are kept: 1-4 and 5-8 tokens before the end


class Cancelled(Exception):
    """Raised from inside prefill when the request was cancelled."""


@dataclass(frozen=True)
class Speculation:
    """Whether the draft model decodes this request; ``label`` is what ``stats.speculative`` says."""

    on: bool = False
    label: Optional[str] = None  # None without a draft model, else "on" or "off: <why>"


def speculation_for(kit: ModelKit, req: Generate, plan, budget: int) -> Speculation:
    if kit.draft is None:
        return Speculation()
    spans = [s for s in (trimmable_span(kit.cache.fresh()), trimmable_span(kit.draft.cache.fresh())) if s is not None]
    # mlx-lm rewinds rejected drafts: a sliding window must not wrap before the end (prompt + answer + drafts)
    wraps = bool(spans) and len(plan.ids) + budget + req.params.num_draft_tokens >= min(spans)
    for cond, why in ((not req.params.speculative, "request"), (plan.embed is not None, "images"),
                      (req.params.json_schema is not None, "json_schema"),
                      (req.prompt.tools and req.prompt.tool_choice not in ("auto", "none"), "tool_choice"),
                      (kit.options.max_kv_size is not None, "max_kv_size"), (wraps, "sliding window")):
        if cond:
            return Speculation(False, f"off: {why}")
    return Speculation(True, "on")


def _markers(kit: ModelKit, req: Generate) -> Markers:
    tok, fmt = kit.tokenizer, kit.tool_format if tools_on(kit, req.prompt) else None
    think = (tok.think_start, tok.think_end) if getattr(tok, "has_thinking", False) else None
    if fmt is None:
        return Markers(think=think)
    tools = [msgspec.to_builtins(t) for t in req.prompt.tools]
    return Markers(think=think, tool=(fmt.start, fmt.end), parser=fmt.parse, tools=tools)


def _constraint(kit: ModelKit, req: Generate, initial: str):
    """The request's grammar (json_schema, or a constrained tool call), for the answer only on a model
    with single-token thinking markers."""
    grammar = call_grammar(kit, req.prompt, kit.tool_format) if tools_on(kit, req.prompt) else None
    schema = req.params.json_schema
    if grammar is not None and schema is not None:
        raise WorkerError("invalid_params", "params.json_schema and a constrained prompt.tool_choice cannot be "
                          "combined")
    if schema is None and grammar is None:
        return None
    c = JsonConstraint(kit, schema) if schema is not None else ToolCallConstraint(kit, grammar)
    tok = kit.tokenizer
    if getattr(tok, "has_thinking", False) and len(tok.think_start_tokens) == 1 == len(tok.think_end_tokens):
        return AnswerOnly(c, tok.think_start_tokens[0], tok.think_end_tokens[0], initial)
    return c


def check_params(kit: ModelKit, req: Generate) -> None:
    """The cheap checks, before the prompt is built or a grammar compiled."""
    params, vocab = req.params, kit.info.vocab_size
    bad_stop = [t for t in params.stop_token_ids if t >= vocab]
    if bad_stop:
        raise WorkerError("invalid_params", f"params.stop_token_ids outside the vocabulary: {bad_stop[:5]}")
    bad_bias = [t for t in params.logit_bias if t >= vocab]
    if bad_bias:
        raise WorkerError("invalid_params", f"params.logit_bias has ids outside the vocabulary: {bad_bias[:5]}")
    if params.json_schema is False:
        raise WorkerError("invalid_params", "params.json_schema is false: no output could match it")


@dataclass
class Outcome:
    """What the decode loop produced."""

    generated: List[int] = field(default_factory=list)
    reason: Optional[str] = None
    stop_token: Optional[int] = None
    t_first: Optional[float] = None
    marks: dict = field(default_factory=dict)  # phase name -> perf_counter, for the debug log
    from_draft: int = 0
    calls: int = 0  # tool_call events emitted


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


def _plain_source(kit, plan, lease, params, budget, sampler, quant, on_prefill, constraint, marks):
    """mlx-lm's generate_step over the uncached suffix, as (token, logprobs, from_draft)."""
    ids, cached, opts = plan.ids, lease.reused, kit.options
    # generate_step hands the processors only the tokens it is given: add back the cached prefix
    processors = processors_for(kit, params, ids[:cached]) + ([constraint] if constraint else [])
    embeddings = plan.embed(cached) if plan.embed is not None else None
    marks["embedded"] = time.perf_counter()
    gen = generate_step(
        mx.array(ids[cached:]), kit.model, max_tokens=budget, sampler=sampler,
        logits_processors=processors or None, prompt_cache=lease.cache,
        prefill_step_size=opts.prefill_step_size, prompt_progress_callback=on_prefill,
        input_embeddings=embeddings, **quant)
    try:
        for token, logprobs in gen:
            yield token, logprobs, False
    finally:
        gen.close()


def _speculative_source(kit, ids, lease, d_lease, params, budget, sampler, quant, on_prefill, cancelled,
                        proposed):
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

    # speculative_generate_step hands the processors only the last prompt token: add back the rest
    processors = processors_for(kit, params, ids[:-1])
    yield from speculative_generate_step(
        mx.array(ids[-1:]), kit.model, draft_model, num_draft_tokens=params.num_draft_tokens,
        max_tokens=budget, sampler=sampler, logits_processors=processors or None,
        prompt_cache=lease.cache + d_lease.cache, **quant)


def _snapshot_into(snapshots: list, cache: list, n) -> None:
    """Append a snapshot of ``cache`` holding ``n`` tokens, unless the newest one already lies there."""
    if n and not (snapshots and snapshots[-1].n >= n):
        snap = take_snapshot(cache, n)
        if snap is not None:
            snapshots.append(snap)


def _with_snapshots(gen, cache, out: list):
    """Pass ``gen`` through, snapshotting the bounded layers every few tokens into ``out`` (the newest
    DECODE_SNAPSHOTS): a follow-up whose re-rendered answer differs in its last tokens (a trimmed
    newline, a stop string cut off) then resumes a few tokens before the end, not at the prompt."""
    try:
        for i, item in enumerate(gen, 1):
            yield item
            if i % DECODE_SNAPSHOT_EVERY == 0:
                _snapshot_into(out, cache, cache_len(cache))
                del out[:-DECODE_SNAPSHOTS]
    finally:
        gen.close()


def _decode(kit, req, gen, stream, emit, cancelled, spec: Speculation, on_first, out: Outcome) -> None:
    """Drive the token source into ``out``: stop conditions, held-back text, token events."""
    params = req.params
    eos, stop_ids = set(kit.info.eos_token_ids), set(params.stop_token_ids)
    want_lp, extras = params.top_logprobs > 0, collections.deque()  # (logprob report, from_draft)

    thinking = stream.markers.think is not None

    def release(pieces):
        for piece in pieces:
            ids = piece.ids
            got = [extras.popleft() for _ in ids] if want_lp or spec.on else []
            if piece.kind == "tool_call":  # the call's ids go with its first event (no logprobs)
                for call in piece.calls:
                    emit(ToolCallEvent(id=req.id, index=out.calls, call=_tool_call(call), tokens=ids))
                    out.calls, ids = out.calls + 1, []
                continue
            if not (piece.text or ids):
                continue
            ev = Token(id=req.id, text=piece.text, tokens=ids,
                       channel=("reasoning" if piece.kind == "reasoning" else "answer") if thinking else None)
            if got:
                ev.logprobs = [g[0] for g in got] if want_lp else None
                ev.from_draft = [g[1] for g in got] if spec.on else None
            emit(ev)

    try:
        for token, logprobs, from_draft in gen:
            token = int(token)
            if out.t_first is None:
                out.t_first = time.perf_counter()
                on_first()
            out.from_draft += bool(from_draft)
            out.generated.append(token)
            if token in eos or token in stop_ids:
                out.reason, out.stop_token = ("eos" if token in eos else "stop_token"), token
                break
            if want_lp or spec.on:
                report = logprob_report(kit, token, logprobs, params.top_logprobs) if want_lp else None
                extras.append((report, bool(from_draft)))
            release(stream.add(token))
            if stream.stop_string is not None:
                out.reason = "stop_string"
                break
            if cancelled():
                out.reason = "cancelled"
                break
    except Cancelled:
        out.reason = "cancelled"
    finally:
        gen.close()
    if out.reason != "stop_string":
        release(stream.finish())


def _tool_call(call: dict) -> ToolCall:
    return ToolCall(id=call["id"], function=FunctionCall(
        name=call["name"], arguments=json.dumps(call["arguments"], ensure_ascii=False)))


def run(kit: ModelKit, req: Generate, emit: Callable, cancelled: Callable[[], bool]) -> Done:
    tic = time.perf_counter()
    params, opts = req.params, kit.options
    check_params(kit, req)
    plan = build_prompt(kit, req)
    out = Outcome()
    out.marks["prompt"] = time.perf_counter()
    ids, n_prompt = plan.ids, len(plan.ids)
    ctx = kit.info.context_length if opts.max_kv_size is None else None
    if ctx is not None and n_prompt >= ctx:
        raise WorkerError("context_overflow", f"the prompt has {n_prompt} tokens; the context holds {ctx}")
    budget = params.max_tokens if ctx is None else min(params.max_tokens, ctx - n_prompt)
    initial = initial_channel(kit.tokenizer, ids)
    constraint = _constraint(kit, req, initial)
    spec = speculation_for(kit, req, plan, budget)
    if params.seed is not None:
        mx.random.seed(params.seed)
    sampler = sampler_for(params)
    quant = dict(kv_bits=opts.kv_bits, kv_group_size=opts.kv_group_size,
                 quantized_kv_start=opts.quantized_kv_start)

    lease = kit.cache.take(plan.key, req.cache_key)
    out.marks["take"] = time.perf_counter()
    cached = lease.reused
    snapshots = list(lease.snapshots)
    if cached and not spec.on:  # where the previous turn ended: an edit of this turn's message resumes here
        _snapshot_into(snapshots, lease.cache, cached)
    on_prefill = _prefill_reporter(req, lease, snapshots, spec, n_prompt, emit, cancelled)
    mx.reset_peak_memory()
    d_lease, proposed = None, [0]
    if spec.on:
        d_lease = kit.draft.cache.take(plan.key, req.cache_key)
        gen = _speculative_source(kit, ids, lease, d_lease, params, budget, sampler, quant, on_prefill,
                                  cancelled, proposed)
        on_first = functools.partial(on_prefill, n_prompt - cached, n_prompt - cached)
    else:
        gen = _plain_source(kit, plan, lease, params, budget, sampler, quant, on_prefill, constraint, out.marks)
        on_first = lambda: None  # noqa: E731 (generate_step reported the end of prefill itself)
    decode_snaps = []
    if not spec.on and any(bounded(c) for c in lease.cache):
        gen = _with_snapshots(gen, lease.cache, decode_snaps)
    stream = Channels(kit.tokenizer.detokenizer, params.stop, _markers(kit, req), initial)
    try:
        with plan.state if plan.state is not None else nullcontext():
            _decode(kit, req, gen, stream, emit, cancelled, spec, on_first, out)
    except BaseException:
        if cache_len(lease.cache) == cached:  # failed before touching the cache: what was taken goes back
            kit.cache.put(plan.key, lease.cache, req.cache_key, snapshots)
        raise
    out.marks["decoded"] = time.perf_counter()
    kit.cache.put(plan.key + out.generated, lease.cache, req.cache_key, snapshots + decode_snaps)
    if d_lease is not None:
        kit.draft.cache.put(plan.key + out.generated, d_lease.cache, req.cache_key)
    if out.reason is None:
        out.reason = "cancelled" if cancelled() else (
            "max_tokens" if budget == params.max_tokens else "context_full")
    emit(_stats(req, n_prompt, cached, lease.miss_reason, out, tic, spec, proposed[0],
                stream.reasoning_tokens if stream.markers.think else None))
    if log.isEnabledFor(logging.DEBUG):  # MLX_WORKER_LOG=debug: where the time to the first token went
        marks = dict(out.marks, first=out.t_first, stored=time.perf_counter())
        log.debug("generate %s: %s ms (cached %d of %d)", req.id, ", ".join(
            f"{k} {(v - tic) * 1000:.1f}" for k, v in marks.items() if v is not None), cached, n_prompt)
    return _done(req, stream, out, lease)


def _prefill_reporter(req, lease, snapshots: list, spec: Speculation, n_prompt: int, emit, cancelled):
    """generate_step's prompt_progress_callback: a snapshot at the prompt's end, cancel, progress events."""
    cached, last = lease.reused, [0.0]

    def on_prefill(processed: int, total: int):
        if processed >= total - 1 and not spec.on:  # the prompt but its last token; then + the first token
            _snapshot_into(snapshots, lease.cache, cache_len(lease.cache))
        # the end of prefill is no cancel point: the first token is already being computed, and the decode
        # loop's check right after it keeps the cache consistent with the tokens (it is stored)
        if processed < total and cancelled():
            raise Cancelled()
        now = time.perf_counter()
        if processed in (0, total) or now - last[0] >= PROGRESS_INTERVAL_S:
            last[0] = now
            done = cached + processed
            emit(Progress(id=req.id, stage="prompt", fraction=round(done / n_prompt, 4),
                          total=n_prompt, cached=cached, processed=done))

    return on_prefill


def _done(req, stream: Channels, out: Outcome, lease) -> Done:
    if stream.calls and out.reason == "eos":
        out.reason = "tool_calls"
    return Done(id=req.id, request="generate", stop_reason=out.reason, stop_string=stream.stop_string,
                stop_token=out.stop_token, text=stream.text, cached_tokens=lease.reused,
                cache_miss_reason=lease.miss_reason,
                reasoning="".join(stream.reasoning) if stream.markers.think else None,
                tool_calls=[_tool_call(c) for c in stream.calls] or None)


def _stats(req, n_prompt, cached, miss_reason, out: Outcome, tic, spec: Speculation, proposed,
           reasoning_tokens) -> Stats:
    toc = time.perf_counter()
    n_gen, t_first = len(out.generated), out.t_first
    prompt_s = (t_first or toc) - tic
    decode_s = toc - t_first if t_first is not None else 0.0
    return Stats(
        id=req.id, prompt_tokens=n_prompt, cached_tokens=cached, cache_miss_reason=miss_reason,
        generated_tokens=n_gen,
        ttft_s=round(prompt_s, 6) if t_first is not None else 0.0,
        prompt_tps=round((n_prompt - cached) / prompt_s, 3) if t_first is not None and prompt_s > 0 else 0.0,
        generation_tps=round((n_gen - 1) / decode_s, 3) if n_gen > 1 and decode_s > 0 else 0.0,
        peak_memory_bytes=int(mx.get_peak_memory()), total_s=round(toc - tic, 6),
        speculative=spec.label, draft_tokens_accepted=out.from_draft if spec.on else None,
        draft_tokens_proposed=proposed if spec.on else None, reasoning_tokens=reasoning_tokens,
    )

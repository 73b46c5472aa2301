"""One generate request's state on the engine thread, shared by the solo path (generate.py) and the batch
path (batch.py, scheduler.py): setup (``start``), each sampled token (``Run.accept``), and the end
(``finish``: the cache stored back, stats, the terminal event). Everything request-specific lives here and
dies with the request.
"""

import collections
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import mlx.core as mx
import msgspec

from ..cache import cache_len
from ..cache.layout import trimmable_span
from ..cache.snapshots import take_snapshot
from .channels import Channels, Markers, initial_channel
from ..loading.model import ModelKit
from ..prompting.prompt import build_prompt
from ..protocol import Done, FunctionCall, Generate, Progress, Stats, Token, ToolCall, ToolCallEvent, WorkerError
from .sampling import AnswerOnly, JsonConstraint, ToolCallConstraint, logprob_report, sampler_for
from ..prompting.tools import call_grammar, tools_on

log = logging.getLogger("worker")

PROGRESS_INTERVAL_S = 0.1


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
    # (a span of 0 is a recurrent state, e.g. SSM / gated-delta / conv layers, which never rewinds)
    wraps = bool(spans) and len(plan.ids) + budget + req.params.num_draft_tokens >= min(spans)
    rewinds = "recurrent state" if spans and min(spans) == 0 else "sliding window"
    for cond, why in ((not req.params.speculative, "request"), (plan.embed is not None, "images or audio"),
                      (req.params.json_schema is not None, "json_schema"),
                      (req.prompt.tools and req.prompt.tool_choice not in ("auto", "none"), "tool_choice"),
                      (kit.options.max_kv_size is not None, "max_kv_size"), (wraps, rewinds)):
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


def snapshot_into(snapshots: list, cache: list, n) -> None:
    """Append a snapshot of ``cache`` holding ``n`` tokens, unless the newest one already lies there."""
    if n and not (snapshots and snapshots[-1].n >= n):
        snap = take_snapshot(cache, n)
        if snap is not None:
            snapshots.append(snap)


@dataclass
class Run:
    """A generate request between ``start`` and ``finish``."""

    kit: ModelKit
    req: Generate
    emit: Callable
    cancelled: Callable[[], bool]
    tic: float
    plan: object
    budget: int
    initial: str
    constraint: object
    spec: Speculation
    sampler: Callable
    quant: dict
    lease: object
    snapshots: list
    stream: Channels
    out: Outcome
    decode_snaps: list = field(default_factory=list)
    extras: collections.deque = field(default_factory=collections.deque)  # (logprob report, from_draft)
    batching: Optional[str] = None  # what stats.batching says
    peers: int = 1  # most sequences decoded together while this one decoded
    proposed: int = 0  # speculative: tokens the draft proposed
    on_first: Callable = lambda: None  # noqa: E731

    def __post_init__(self):
        self.eos, self.stop_ids = frozenset(self.kit.info.eos_token_ids), frozenset(self.req.params.stop_token_ids)

    @property
    def n_prompt(self) -> int:
        return len(self.plan.ids)

    @property
    def want_lp(self) -> bool:
        return self.req.params.top_logprobs > 0

    def accept(self, token: int, logprobs, from_draft: bool = False) -> bool:
        """One sampled token: stop conditions and token events. True when the request ends with it."""
        out, params = self.out, self.req.params
        if out.t_first is None:
            out.t_first = time.perf_counter()
            self.on_first()
        out.from_draft += bool(from_draft)
        out.generated.append(token)
        if token in self.eos or token in self.stop_ids:
            out.reason = "eos" if token in self.eos else "stop_token"
            out.stop_token = token
            return True
        if self.want_lp or self.spec.on:
            report = logprob_report(self.kit, token, logprobs, params.top_logprobs) if self.want_lp else None
            self.extras.append((report, bool(from_draft)))
        self.release(self.stream.add(token))
        if self.stream.stop_string is not None:
            out.reason = "stop_string"
            return True
        if self.cancelled():
            out.reason = "cancelled"
            return True
        return False

    def end_stream(self) -> None:
        if self.out.reason != "stop_string":
            self.release(self.stream.finish())

    def release(self, pieces) -> None:
        req, out, extras, spec = self.req, self.out, self.extras, self.spec
        thinking = self.stream.markers.think is not None
        for piece in pieces:
            ids = piece.ids
            got = [extras.popleft() for _ in ids] if self.want_lp or spec.on else []
            if piece.kind == "tool_call":  # the call's ids go with its first event (no logprobs)
                for call in piece.calls:
                    self.emit(ToolCallEvent(id=req.id, index=out.calls, call=_tool_call(call), tokens=ids))
                    out.calls, ids = out.calls + 1, []
                continue
            if not (piece.text or ids):
                continue
            ev = Token(id=req.id, text=piece.text, tokens=ids,
                       channel=("reasoning" if piece.kind == "reasoning" else "answer") if thinking else None)
            if got:
                ev.logprobs = [g[0] for g in got] if self.want_lp else None
                ev.from_draft = [g[1] for g in got] if spec.on else None
            self.emit(ev)

    def prefill_reporter(self):
        """generate_step's prompt_progress_callback: a snapshot at the prompt's end, cancel, progress."""
        cached, last, n_prompt = self.lease.reused, [0.0], self.n_prompt

        def on_prefill(processed: int, total: int):
            if processed >= total - 1 and not self.spec.on:  # the prompt but its last token; then + the first
                snapshot_into(self.snapshots, self.lease.cache, cache_len(self.lease.cache))
            # the end of prefill is no cancel point: the first token is already being computed, and the
            # decode loop's check right after it keeps the cache consistent with the tokens (it is stored)
            if processed < total and self.cancelled():
                raise Cancelled()
            now = time.perf_counter()
            if processed in (0, total) or now - last[0] >= PROGRESS_INTERVAL_S:
                last[0] = now
                done = cached + processed
                self.emit(Progress(id=self.req.id, stage="prompt", fraction=round(done / n_prompt, 4),
                                   total=n_prompt, cached=cached, processed=done))

        return on_prefill


def start(kit: ModelKit, req: Generate, emit: Callable, cancelled: Callable[[], bool]) -> Run:
    """Validate, build the prompt, take the best cache: everything before the first forward pass."""
    tic = time.perf_counter()
    params, opts = req.params, kit.options
    check_params(kit, req)
    plan = build_prompt(kit, req)
    out = Outcome()
    out.marks["prompt"] = time.perf_counter()
    n_prompt = len(plan.ids)
    ctx = kit.info.context_length if opts.max_kv_size is None else None
    if ctx is not None and n_prompt >= ctx:
        raise WorkerError("context_overflow", f"the prompt has {n_prompt} tokens; the context holds {ctx}")
    budget = params.max_tokens if ctx is None else min(params.max_tokens, ctx - n_prompt)
    initial = initial_channel(kit.tokenizer, plan.ids)
    constraint = _constraint(kit, req, initial)
    spec = speculation_for(kit, req, plan, budget)
    quant = dict(kv_bits=opts.kv_bits, kv_group_size=opts.kv_group_size, quantized_kv_start=opts.quantized_kv_start)
    lease = kit.cache.take(plan.key, req.cache_key)
    out.marks["take"] = time.perf_counter()
    snapshots = list(lease.snapshots)
    if lease.reused and not spec.on:  # where the previous turn ended: an edit of this turn's message resumes here
        snapshot_into(snapshots, lease.cache, lease.reused)
    stream = Channels(kit.tokenizer.detokenizer, params.stop, _markers(kit, req), initial)
    return Run(kit=kit, req=req, emit=emit, cancelled=cancelled, tic=tic, plan=plan, budget=budget,
               initial=initial, constraint=constraint, spec=spec, sampler=sampler_for(params), quant=quant,
               lease=lease, snapshots=snapshots, stream=stream, out=out)


def give_back(run: Run) -> None:
    """A request failed: the cache it took goes back if nothing touched it yet."""
    if cache_len(run.lease.cache) == run.lease.reused:
        run.kit.cache.put(run.plan.key, run.lease.cache, run.req.cache_key, run.snapshots)


def finish(run: Run, cache: list, peak_memory: Optional[int] = None) -> Done:
    """Store the request's cache, emit its stats, return its terminal event."""
    kit, req, out, params = run.kit, run.req, run.out, run.req.params
    out.marks["decoded"] = time.perf_counter()
    kit.cache.put(run.plan.key + out.generated, cache, req.cache_key, run.snapshots + run.decode_snaps)
    if out.reason is None:
        out.reason = "cancelled" if run.cancelled() else (
            "max_tokens" if run.budget == params.max_tokens else "context_full")
    run.emit(_stats(run, peak_memory))
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
                tool_calls=[_tool_call(c) for c in stream.calls] or None)


def _tool_call(call: dict) -> ToolCall:
    return ToolCall(id=call["id"], function=FunctionCall(
        name=call["name"], arguments=json.dumps(call["arguments"], ensure_ascii=False)))


def _stats(run: Run, peak_memory: Optional[int]) -> Stats:
    toc, out, spec, cached = time.perf_counter(), run.out, run.spec, run.lease.reused
    n_gen, t_first, n_prompt = len(out.generated), out.t_first, run.n_prompt
    prompt_s = (t_first or toc) - run.tic
    decode_s = toc - t_first if t_first is not None else 0.0
    return Stats(
        id=run.req.id, prompt_tokens=n_prompt, cached_tokens=cached, cache_miss_reason=run.lease.miss_reason,
        generated_tokens=n_gen,
        ttft_s=round(prompt_s, 6) if t_first is not None else 0.0,
        prompt_tps=round((n_prompt - cached) / prompt_s, 3) if t_first is not None and prompt_s > 0 else 0.0,
        generation_tps=round((n_gen - 1) / decode_s, 3) if n_gen > 1 and decode_s > 0 else 0.0,
        peak_memory_bytes=int(mx.get_peak_memory() if peak_memory is None else peak_memory),
        total_s=round(toc - run.tic, 6),
        speculative=spec.label, draft_tokens_accepted=out.from_draft if spec.on else None,
        draft_tokens_proposed=run.proposed if spec.on else None,
        reasoning_tokens=run.stream.reasoning_tokens if run.stream.markers.think else None,
        batching=run.batching, concurrent=run.peers if run.batching else None,
    )

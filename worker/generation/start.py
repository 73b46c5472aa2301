"""A generate request's start: its params checked, its prompt built, its budget, grammar, sampler and speculation
chosen, and the best prompt cache taken; everything before the first forward pass."""

import time

import msgspec

from ..loading.model import ModelKit
from ..prompting.prompt import build_prompt
from ..prompting.tools import tools_on
from ..protocol import Generate, WorkerError
from . import constraints
from .channels import Channels, Markers, initial_channel
from .run import Outcome, Run
from .sampling import sampler_for
from .snapshot_policy import snapshot_into
from .speculation import speculation_for


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


def markers_for(kit: ModelKit, req: Generate) -> Markers:
    """What the output is split on: the model's thinking markers, its tool-call markers when tools are on."""
    tok, fmt = kit.tokenizer, kit.tool_format if tools_on(req.prompt) else None
    think = (tok.think_start, tok.think_end) if getattr(tok, "has_thinking", False) else None
    if fmt is None:
        return Markers(think=think)
    tools = [msgspec.to_builtins(t) for t in req.prompt.tools]
    return Markers(think=think, tool=(fmt.start, fmt.end), parser=fmt.parse, tools=tools)


def start(kit: ModelKit, req: Generate, emit, cancelled, batched: bool = False) -> Run:
    """Validate, build the prompt, take the best cache: everything before the first forward pass."""
    tic = time.perf_counter()
    params, opts = req.params, kit.options
    out = Outcome()
    try:
        check_params(kit, req)
        plan = build_prompt(kit, req)
        out.marks["prompt"] = time.perf_counter()
        n_prompt = len(plan.ids)
        ctx = kit.info.context_length if opts.max_kv_size is None else None
        if ctx is not None and n_prompt >= ctx:
            raise WorkerError("context_overflow", f"the prompt has {n_prompt} tokens; the context holds {ctx}")
        budget = params.max_tokens if ctx is None else min(params.max_tokens, ctx - n_prompt)
        initial = initial_channel(kit.tokenizer, plan.ids)
        constraint = constraints.for_request(kit, req, initial)
        spec = speculation_for(kit, req, plan, budget, batched)
        if kit.kv is not None:  # refused before any compute when its KV cannot fit even alone (memory.py)
            kit.kv.check(n_prompt, budget, spec.on and kit.draft is not None)
        failure = None
    except WorkerError as exc:
        failure = exc
    if kit.agree_failure is not None:  # with ranks: an input one rank cannot read fails the request on all
        failure = kit.agree_failure(failure)
    if failure is not None:
        raise failure
    quant = dict(kv_bits=opts.kv_bits, kv_group_size=opts.kv_group_size, quantized_kv_start=opts.quantized_kv_start)
    lease = kit.cache.take(plan.key, req.cache_key)
    out.marks["take"] = time.perf_counter()
    snapshots = list(lease.snapshots)
    if lease.reused and not spec.solo:  # where the previous turn ended: an edit of this turn's message resumes here
        snapshot_into(snapshots, lease.cache, lease.reused)
    stream = Channels(kit.tokenizer.detokenizer, params.stop, markers_for(kit, req), initial)
    return Run(kit=kit, req=req, emit=emit, cancelled=cancelled, tic=tic, plan=plan, budget=budget,
               constraint=constraint, spec=spec, sampler=sampler_for(params), quant=quant,
               lease=lease, snapshots=snapshots, stream=stream, out=out)

"""Samplers, logits processors (penalties, bias) and logprob reports, from a request's params (grammars:
constraints.py)."""

import math
from typing import List, Optional

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors, make_sampler

from ..protocol import GenerateParams, TokenLogprob, TopLogprob


def sampler_for(params: GenerateParams):
    return make_sampler(params.temperature, params.top_p, params.min_p, top_k=params.top_k)


def keyed_sampler(params: GenerateParams, seed: int):
    """``sampler_for`` with its own random key sequence: the draws ``mx.random.seed(seed)`` would give a
    request alone, whatever other requests sample in between (batched requests interleave their draws)."""
    if params.temperature == 0:
        return sampler_for(params)
    methods = []
    if 0 < params.top_p < 1.0:
        methods.append(lambda x: apply_top_p(x, params.top_p))
    if params.min_p != 0.0:
        methods.append(lambda x: apply_min_p(x, params.min_p, 1))
    if params.top_k > 0:
        methods.append(lambda x: apply_top_k(x, params.top_k))
    key = [mx.random.key(seed)]

    def sampler(logprobs):
        for method in methods:  # make_sampler's order
            logprobs = method(logprobs)
        key[0], draw = mx.random.split(key[0])  # what mx.random's global key sequence does per draw
        return mx.random.categorical(logprobs * (1.0 / params.temperature), key=draw)

    return sampler


def processors_for(params: GenerateParams, prefix: List[int]) -> list:
    """mlx-lm's processors, seeing the cached part of the prompt too (``prefix``).

    generate_step only hands processors the tokens it was given, i.e. the uncached suffix; a
    repetition penalty must also count the tokens served from the prompt cache.
    """
    procs = make_logits_processors(
        logit_bias=params.logit_bias or None,
        repetition_penalty=params.repetition_penalty,
        repetition_context_size=params.repetition_context_size,
        presence_penalty=params.presence_penalty or None,
        presence_context_size=params.repetition_context_size,
        frequency_penalty=params.frequency_penalty or None,
        frequency_context_size=params.repetition_context_size,
    )
    penalties = (params.repetition_penalty, params.presence_penalty, params.frequency_penalty)
    if prefix and any(penalties):
        head = mx.array(prefix[-params.repetition_context_size:], dtype=mx.uint32)
        procs = [_with_prefix(p, head) for p in procs]
    return procs


def _with_prefix(proc, head):
    def wrapped(tokens, logits):
        full = head if tokens is None else mx.concatenate([head, tokens.astype(mx.uint32)])
        return proc(full, logits)

    return wrapped


def logprob_report(kit, token: int, logprobs: mx.array, k: int) -> TokenLogprob:
    lp = logprobs.astype(mx.float32)
    top: Optional[list] = []
    if k > 0:
        idx = mx.argpartition(-lp, kth=k - 1)[:k]
        vals = lp[idx]
        order = mx.argsort(-vals)
        ids, vals = idx[order].tolist(), vals[order].tolist()
        # tokens a json_schema masks out have probability 0 (logprob -inf, not a JSON number): left out
        top = [TopLogprob(id=i, text=kit.tokenizer.decode([i]), logprob=v)
               for i, v in zip(ids, vals) if math.isfinite(v)]
    return TokenLogprob(id=token, logprob=lp[token].item(), top=top)

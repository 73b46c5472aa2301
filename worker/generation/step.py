"""The sampling step, as mlx-lm's ``generate_step`` takes it: logits -> logits processors -> log-softmax -> sampler.
The batch's first token of each request and its decode steps go through these (the solo path through mlx-lm)."""

from typing import Callable, List

import mlx.core as mx


def process(logits: mx.array, processors: List[Callable], context) -> mx.array:
    """``logits`` [1, V] through the request's processors (penalties, bias, grammar), seeing ``context``."""
    for p in processors:
        logits = p(context, logits)
    return logits


def log_softmax(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def sample(logits: mx.array, processors: List[Callable], context, sampler: Callable):
    """(token [1], logprobs [1, V]) from one row of last-position logits."""
    logprobs = log_softmax(process(logits, processors, context))
    return sampler(logprobs), logprobs

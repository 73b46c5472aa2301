"""Chunked prefill, as mlx-lm's ``generate_step`` does it: all but the last prompt token go through the model in
chunks; the last token's forward pass samples the first token (the caller's step). The solo path without a draft
leaves this to ``generate_step`` itself; the speculative and the batch paths use these."""

from typing import Callable, List, Optional

import mlx.core as mx


class Cancelled(Exception):
    """Raised from inside prefill when the request was cancelled."""


def prefill_chunk(model, cache: list, tokens: List[int], embeddings=None, quantize: Optional[Callable] = None) -> None:
    """One chunk into ``cache``, evaluated. ``embeddings``: the chunk's input embeddings (images), or None."""
    kw = {"input_embeddings": embeddings[None]} if embeddings is not None else {}
    model(mx.array(tokens)[None], cache=cache, **kw)
    if quantize is not None:
        quantize(cache)
    mx.eval([c.state for c in cache])


def chunk_size(remaining: int, step: int) -> int:
    """Tokens in the next chunk when ``remaining`` prompt tokens are left: never the last one."""
    return min(step, remaining - 1)


def prefill(model, cache: list, tokens: List[int], step: int, quantize: Callable, on_chunk: Callable[[int], None]) -> None:
    """All but the last of ``tokens`` into ``cache``; ``on_chunk(processed)`` after each chunk (a cancel point)."""
    pos = 0
    while len(tokens) - pos > 1:
        n = chunk_size(len(tokens) - pos, step)
        prefill_chunk(model, cache, tokens[pos:pos + n], quantize=quantize)
        pos += n
        on_chunk(pos)
        mx.clear_cache()

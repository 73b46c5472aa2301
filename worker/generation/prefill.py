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


def prefill(model, cache: list, tokens: List[int], step: int, quantize: Callable, on_chunk: Callable[[int], None],
            embeddings=None, stop: Optional[int] = None) -> None:
    """All but the last of ``tokens`` into ``cache`` (or the first ``stop`` of them); ``on_chunk(processed)`` after
    each chunk (a cancel point). ``embeddings``: the tokens' input embeddings (images), or None."""
    pos, end = 0, len(tokens) - 1 if stop is None else stop
    while end - pos > 0:
        n = min(step, end - pos)
        emb = embeddings[pos:pos + n] if embeddings is not None else None
        prefill_chunk(model, cache, tokens[pos:pos + n], emb, quantize)
        pos += n
        on_chunk(pos)
        mx.clear_cache()


def stops(checkpoints, reused: int, n_prompt: int) -> List[int]:
    """The checkpoints a prefill from ``reused`` must stop at (for a snapshot): those inside the uncached part,
    before the last prompt token."""
    return [c for c in checkpoints if reused < c < n_prompt - 1]

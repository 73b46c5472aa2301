"""Speculative decoding inside the batch: each row's proposals (the draft model's, batched over the draft rows, or
prompt lookup's, lookup.py) are verified by one forward pass of every row, and each row keeps its own share.

A step feeds row i ``[y_i, p_i1 .. p_iK]`` (its pending token and its proposals, padded to the widest row's K),
samples every position with the row's own sampler and processors, and accepts the proposals up to the first that
differs from the sample there (as mlx-lm's ``speculative_generate_step``: greedy rows give exactly the tokens of
plain decoding); the sample after them is the row's next pending token. The rejected positions are dropped from
each row's cache (``RowCaches.rewind``). A draft row's draft cache holds its tokens up to, not including, its last
accepted one: each draft round feeds ``[last, y]`` then its own proposals, ``K`` tokens for every draft row.

A step speculates only where every layer can drop what it is fed (no recurrent state, a sliding window that does
not wrap within the step) and no row carries position state (Qwen's M-RoPE); otherwise it decodes plainly and
the draft rows stop drafting (their draft cache would fall behind). A row's first step after it joined proposes
nothing (its snapshot at prompt + 1 token is taken then).
"""

from typing import List, Optional

import mlx.core as mx
from mlx_lm.models import cache as mlx_cache

from .step import log_softmax, process


def _room(layer, n: int) -> bool:
    """Whether ``layer`` can take ``n`` more tokens and drop them again."""
    if isinstance(layer, mlx_cache.BatchRotatingKVCache):
        return layer._offset + n < layer.max_size
    if isinstance(layer, mlx_cache.RotatingKVCache):
        return layer.offset + n < layer.max_size
    trimmable = getattr(layer, "is_trimmable", None)
    return bool(trimmable and trimmable())


def _draft_proposals(batch, k: int) -> mx.array:
    """[D, k] greedy proposals of the draft rows (their draft caches take [last, y] and k-1 proposals)."""
    rows = {id(s): i for i, s in enumerate(batch.seqs)}
    pending = batch.y[mx.array([rows[id(s)] for s in batch.draft_seqs])]
    x = mx.stack([mx.array([s.last for s in batch.draft_seqs]), pending], axis=1)
    out = []
    for _ in range(k):
        logits = batch.draft_model(x, cache=batch.drafts.cache)[:, -1, :]
        x = mx.argmax(logits, axis=-1)[:, None]
        out.append(x)
    return mx.concatenate(out, axis=1)


def _lookup_proposals(s) -> List[int]:
    """A lookup row's proposals, from its reported tokens alone (the pending one is not read back, so a step
    without proposals keeps the batch's pipelining): the continuation's first token is the lookup's guess of
    the pending token, the rest are proposed after it (verification holds whatever the guess)."""
    if s.first or s.lookup is None:
        return []
    return s.lookup.propose()[1:]


def _sample_all(batch, logits: mx.array, inputs: mx.array):
    """Every position of every row through the row's processors and sampler: (samples [B, K+1], logprobs)."""
    rows = []
    width = inputs.shape[1]
    for i, s in enumerate(batch.seqs):
        row = logits[i]
        if s.processors:  # position j sees the row's context and its inputs up to j
            ctx = s.context.update_and_fetch(inputs[i])
            base = ctx.size - width
            row = mx.concatenate([process(row[j:j + 1], s.processors, ctx[:base + j + 1]) for j in range(width)])
        rows.append(log_softmax(row))
    logprobs = mx.stack(rows)
    if all(s.greedy for s in batch.seqs):
        samples = mx.argmax(logprobs, axis=-1)
    else:
        samples = mx.stack([mx.argmax(logprobs[i], axis=-1) if s.greedy else s.sampler(logprobs[i])
                            for i, s in enumerate(batch.seqs)])
    return samples, logprobs


def speculative_step(batch) -> Optional[List[tuple]]:
    """One verified step of every row (see the module's docstring), or None when this step cannot speculate or
    no row has a proposal (the caller then decodes plainly)."""
    seqs = batch.seqs
    kd = max((s.k for s in batch.draft_seqs), default=0)
    if any(s.rope is not None for s in seqs) or not all(_room(c, kd + 1) for c in batch.cache):
        batch.drop_drafts(list(batch.draft_seqs))
        return None
    props = [_lookup_proposals(s) for s in seqs]
    width = max([kd] + [len(p) for p in props])
    if width == 0:
        return None
    if not all(_room(c, width + 1) for c in batch.cache):
        batch.drop_drafts(list(batch.draft_seqs))
        return None
    fed = mx.array([p + [0] * (width - len(p)) for p in props])
    if kd:  # the draft rows' proposals in their rows, the others' kept
        d_rows = {id(s): j for j, s in enumerate(batch.draft_seqs)}
        pick = mx.array([d_rows.get(id(s), 0) for s in seqs])
        is_draft = mx.array([id(s) in d_rows for s in seqs])[:, None]
        fed = mx.where(is_draft, mx.pad(_draft_proposals(batch, kd)[pick], [(0, 0), (0, width - kd)]), fed)
    fed = mx.concatenate([batch.y[:, None], fed], axis=1)
    logits = batch.model(fed, cache=batch.cache)
    samples, logprobs = _sample_all(batch, logits, fed)
    mx.eval(samples, fed)
    fed = fed.tolist()
    return _accept(batch, [f[0] for f in fed], fed, samples.tolist(), logprobs, props, width, kd)


def _accept(batch, ys, fed, samples, logprobs, props, width: int, kd: int) -> List[tuple]:
    """Each row keeps its proposals up to the first its sampler disagrees with; the caches drop the rest."""
    out, nexts, lps, rewinds, d_rewinds = [], [], [], [], {}
    for i, s in enumerate(batch.seqs):
        valid = s.k if s.draft and not s.first else len(props[i])
        n = 0
        while n < valid and samples[i][n] == fed[i][n + 1]:
            n += 1
        lp = [logprobs[i, j] if s.wants_logprobs else None for j in range(n + 1)]
        out.append((s, [(ys[i], batch.lp[i], False)] + [(fed[i][j + 1], lp[j], True) for j in range(n)]))
        nexts.append(samples[i][n])
        lps.append(lp[n])
        rewinds.append(width - n)
        if s.processors:  # the context keeps what the cache keeps
            s.context._size -= width - n
        if s.draft:
            d_rewinds[id(s)] = kd - n
            s.last = fed[i][n]
        if valid:
            s.run.proposed += valid
            if s.lookup is not None:
                s.lookup.record(valid, n)
    batch.rows.rewind(rewinds)
    if d_rewinds:
        batch.drafts.rewind([d_rewinds[id(s)] for s in batch.draft_seqs])
    batch.y, batch.lp = mx.array(nexts), lps
    return out

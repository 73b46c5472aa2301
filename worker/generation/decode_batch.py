"""Sequences decoded together: one forward pass per step for every running generate (continuous batching).

mlx-lm's batch caches hold the sequences (``merge`` / ``extend`` / ``filter`` / ``extract``, left-padded);
this module owns the step. Unlike mlx-lm's ``GenerationBatch`` it keeps a lone sequence in its plain
per-sequence cache (no padding mask: one request decodes exactly as fast as ``generate_step``), samples
each request with its own sampler, processors and random key, and computes logprobs rows only for the
requests that report them. A sequence joins after its prefill (done alone, see batcher.py) with its
next input token, and leaves with its own cache, as a solo run would store it. On CUDA a step of several
sequences runs its attention and large quantized matmuls through worker/cuda/batch_kernels.py's kernels.
"""

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import mlx.core as mx
from mlx_lm.generate import generation_stream
from mlx_lm.models import cache as mlx_cache

from ..cache.batch_layers import merge_layers
from ..cache.snapshots import Snapshot, clone
from ..cuda.batch_kernels import batch_kernels
from .batch_speculation import speculative_step
from .run import Run
from .step import log_softmax, process


def blocker(kit) -> Optional[str]:
    """Why this model's requests cannot be batched (they run alone), or None."""
    for layer in kit.cache.fresh():
        if not hasattr(type(layer), "merge"):
            return f"cache layout ({type(layer).__name__})"
    return None


@dataclass
class Seq:
    """A sequence of the batch: its request and what its sampling needs."""

    run: Run
    job: object  # the scheduler's job it answers (opaque here)
    sampler: Callable
    processors: list
    context: Optional[mlx_cache.TokenBuffer]  # prompt + generated ids, for processors
    wants_logprobs: bool
    greedy: bool
    rope: Any = None  # per-request position state of the vision add-on (Qwen M-RoPE), or None
    first: bool = False  # its first token is not reported yet
    on_prefill: Optional[Callable] = None  # its prompt-progress reporter
    k: int = 0  # speculative: the most tokens proposed for it per step (0: none)
    draft: bool = False  # its proposals come from the draft model (its cache in DecodeBatch.drafts)
    lookup: Any = None  # or from prompt lookup (a lookup.Lookup)
    last: Optional[int] = None  # draft: the last accepted token, not yet in the draft's cache
    draft_cache: Optional[list] = None  # draft: its draft cache once it left the batch


def merge(caches: List[list]) -> list:
    return [merge_layers(list(layers)) for layers in zip(*caches)]


class RowCaches:
    """The caches of the batch's rows: one row keeps its own (plain) cache, several are merged into mlx-lm's
    batch caches (left-padded)."""

    def __init__(self):
        self.cache: Optional[list] = None
        self.n = 0

    def add(self, cache: list) -> None:
        if self.n == 0:
            self.cache = cache
        elif self.n == 1:
            self.cache = merge([self.cache, cache])
        else:
            for mine, theirs in zip(self.cache, merge([cache])):
                mine.extend(theirs)
        self.n += 1

    def remove(self, rows: List[int]) -> List[list]:
        """Take rows out (sorted); returns each one's own cache."""
        keep = [i for i in range(self.n) if i not in rows]
        out = [self.cache] if self.n == 1 else [[c.extract(i) for c in self.cache] for i in rows]
        if not keep:
            self.cache = None
        elif len(keep) == 1:
            self.cache = [c.extract(keep[0]) for c in self.cache]
        elif len(keep) < self.n:
            for c in self.cache:
                c.filter(keep)
        self.n = len(keep)
        return out

    def rewind(self, amounts: List[int]) -> None:
        """Drop the last ``amounts[i]`` tokens of row i (rejected proposals): a trim of what all rows drop,
        then the rest rolled out row by row as mlx-lm's batch caches roll right padding away."""
        low = min(amounts)
        for c in self.cache:
            if low:
                c.trim(low)
            extra = [a - low for a in amounts]
            if max(extra) > 0:
                c.prepare(right_padding=extra, lengths=[-e for e in extra])
                c.finalize()


class DecodeBatch:
    def __init__(self, model, addon=None, draft_model=None):
        self.model, self.addon, self.draft_model = model, addon, draft_model
        self.seqs: List[Seq] = []
        self.rows = RowCaches()
        self.drafts = RowCaches()  # the draft model's caches of the rows with a draft (``draft_seqs``)
        self.draft_seqs: List[Seq] = []
        self.y: Optional[mx.array] = None  # [B] the next input of each sequence (not yet reported)
        self.lp: list = []  # per sequence: the logprobs row that y was sampled from (when wanted)
        self.kernels = batch_kernels(model)  # CUDA: one step's context for its rows (see cuda_batch.py)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def cache(self) -> Optional[list]:
        return self.rows.cache

    def add(self, seq: Seq, cache: list, y: mx.array, lp, draft_cache: Optional[list] = None) -> None:
        """A prefilled sequence joins: ``cache`` holds its prompt, ``y`` [1] is its next input; a draft row's
        ``draft_cache`` holds its prompt but the last token (``seq.last``)."""
        self.rows.add(cache)
        self.y = y if self.y is None else mx.concatenate([self.y, y])
        self.seqs.append(seq)
        self.lp.append(lp if seq.wants_logprobs else None)
        if seq.draft:
            self.drafts.add(draft_cache)
            self.draft_seqs.append(seq)

    def remove(self, rows: List[int]) -> List[list]:
        """Take sequences out; returns each one's own cache (holding everything it was fed). A draft row's
        draft cache goes to its ``draft_cache``."""
        if not rows:
            return []
        rows = sorted(rows)
        gone = [self.seqs[i] for i in rows]
        self.drop_drafts([s for s in gone if s.draft])
        keep = [i for i in range(len(self.seqs)) if i not in rows]
        out = self.rows.remove(rows)
        if not keep:
            self.y = None
        elif len(keep) < len(self.seqs):
            self.y = self.y[mx.array(keep)]
        self.seqs = [self.seqs[i] for i in keep]
        self.lp = [self.lp[i] for i in keep]
        return out

    def drop_drafts(self, seqs: List[Seq]) -> None:
        """These rows stop drafting (they leave, or a step without speculation left their draft behind)."""
        rows = sorted(self.draft_seqs.index(s) for s in seqs)
        for i, c in zip(rows, self.drafts.remove(rows)):
            self.draft_seqs[i].draft_cache, self.draft_seqs[i].draft = c, False
        self.draft_seqs = [s for s in self.draft_seqs if s.draft]

    def snapshot(self, row: int, n: int, bounded: List[bool]) -> Snapshot:
        """A snapshot of one sequence's bounded layers holding ``n`` tokens (see cache/snapshots.py)."""
        if len(self.seqs) == 1:
            return Snapshot(n, tuple(clone(c) if b else None for c, b in zip(self.cache, bounded)))
        return Snapshot(n, tuple(c.extract(row) if b else None for c, b in zip(self.cache, bounded)))

    def step(self) -> List[tuple]:
        """One step of every sequence: returns (seq, [(token, logprobs row or None, from_draft), ...]) per
        sequence, the tokens it was fed and that are now in its cache. With proposals (speculation.py's draft
        rows, prompt lookup) the step verifies them (batch_speculation.py); else it issues the next forward pass
        and reads the inputs it was fed (the tokens the previous step sampled)."""
        if self.draft_seqs or any(s.lookup is not None for s in self.seqs):
            with mx.stream(generation_stream):
                out = speculative_step(self)
            if out is not None:
                return out
        with mx.stream(generation_stream):
            current, current_lp = self.y, self.lp
            rope = self.addon.batch_positions([s.rope for s in self.seqs]) if self.addon is not None else None
            kernels = self.kernels(len(self.seqs)) if self.kernels and len(self.seqs) > 1 else nullcontext()
            with rope or nullcontext(), kernels:
                logits = self.model(current[:, None], cache=self.cache)[:, -1, :]
            contexts = []
            if any(s.processors for s in self.seqs):
                rows = []
                for i, s in enumerate(self.seqs):
                    row = logits[i:i + 1]
                    if s.processors:
                        ctx = s.context.update_and_fetch(current[i:i + 1])
                        contexts.append(ctx)
                        row = process(row, s.processors, ctx)
                    rows.append(row)
                logits = mx.concatenate(rows, axis=0)
            logprobs = log_softmax(logits)
            if all(s.greedy for s in self.seqs):
                sampled = mx.argmax(logprobs, axis=-1)
            else:
                sampled = mx.concatenate([s.sampler(logprobs[i:i + 1]) for i, s in enumerate(self.seqs)])
            self.y = sampled
            self.lp = [logprobs[i] if s.wants_logprobs else None for i, s in enumerate(self.seqs)]
            mx.async_eval(self.y, [x for x in self.lp if x is not None], contexts)
        tokens = current.tolist()
        return [(s, [(t, lp, False)]) for s, t, lp in zip(self.seqs, tokens, current_lp)]

"""Speculative decoding with the loaded draft model (solo only, for now): whether a request may use it, and the
token source (the main and draft caches prefilled here, then mlx-lm's ``speculative_generate_step``)."""

import functools
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
from mlx_lm.generate import maybe_quantize_kv_cache, speculative_generate_step

from ..cache.layout import trimmable_span
from ..patches.speculative_cache_split import pad_main_cache
from ..protocol import Generate
from .prefill import Cancelled, prefill
from .sampling import processors_for


@dataclass(frozen=True)
class Speculation:
    """Whether the draft model decodes this request; ``label`` is what ``stats.speculative`` says."""

    on: bool = False
    label: Optional[str] = None  # None without a draft model, else "on" or "off: <why>"


def speculation_for(kit, req: Generate, plan, budget: int) -> Speculation:
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


def speculative_source(run, d_lease, on_prefill):
    """Prefill main and draft caches ourselves (with progress and cancel), then mlx-lm speculates."""
    kit, ids, lease, params = run.kit, run.plan.ids, run.lease, run.req.params
    draft, step = kit.draft, kit.options.prefill_step_size
    # quantize from the start: speculative_generate_step would swap cache objects we cannot see
    quantize = functools.partial(maybe_quantize_kv_cache, **{**run.quant, "quantized_kv_start": 0})
    suffix = ids[lease.reused:]
    on_prefill(0, len(suffix))

    def check(_):
        if run.cancelled():
            raise Cancelled()

    # the main model first: a cancel mid-prefill then keeps the expensive part for a re-send
    prefill(kit.model, lease.cache, suffix, step, quantize, lambda n: on_prefill(n, len(suffix)))
    prefill(draft.model, d_lease.cache, ids[d_lease.reused:], step, quantize, check)
    quantize(lease.cache)
    quantize(d_lease.cache)

    def draft_model(*args, **kwargs):  # each call during decoding proposes one token
        run.proposed += 1
        return draft.model(*args, **kwargs)

    # speculative_generate_step hands the processors only the last prompt token: add back the rest
    processors = processors_for(params, ids[:-1])
    yield from speculative_generate_step(
        mx.array(ids[-1:]), kit.model, draft_model, num_draft_tokens=params.num_draft_tokens,
        max_tokens=run.budget, sampler=run.sampler, logits_processors=processors or None,
        prompt_cache=pad_main_cache(kit.model, lease.cache) + d_lease.cache, **run.quant)

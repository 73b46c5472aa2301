"""Speculative decoding: whether a request may use the loaded draft model or prompt lookup (lookup.py), and the
solo token source with a draft (the main and draft caches prefilled here, then mlx-lm's ``speculative_generate_step``)."""

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
    """Whether the draft model decodes this request; ``label`` is what ``stats.speculative`` says. Prompt lookup
    (lookup.py, in the batch only) likewise: ``lookup`` and ``stats.prompt_lookup``'s ``lookup_label``."""

    on: bool = False
    label: Optional[str] = None  # None without a draft model, else "on" or "off: <why>"
    batched: bool = False  # decoded in the batch (batch_speculation.py), not by mlx-lm's speculative step
    lookup: bool = False
    lookup_auto: bool = False  # prompt_lookup null: stops proposing where it does not pay
    lookup_label: Optional[str] = None

    @property
    def proposing(self) -> bool:
        return self.on or self.lookup

    @property
    def solo(self) -> bool:
        """mlx-lm's speculative_generate_step decodes it (its own prefill, no snapshots)."""
        return self.on and not self.batched


def _refusal(kit, req: Generate, plan, budget: int, batched: bool, k: int) -> Optional[str]:
    """Why proposals cannot be verified for this request, or None."""
    spans = [s for s in (trimmable_span(kit.cache.fresh()),
                         trimmable_span(kit.draft.cache.fresh()) if kit.draft is not None else None) if s is not None]
    # rejected proposals are rewound: a sliding window must not wrap before the end (prompt + answer + proposals)
    # (a span of 0 is a recurrent state, e.g. SSM / gated-delta / conv layers, which never rewinds)
    # (in the batch a step that would wrap it decodes plainly instead: batch_speculation.py)
    recurrent = bool(spans) and min(spans) == 0
    wraps = recurrent or (bool(spans) and not batched and len(plan.ids) + budget + k >= min(spans))
    rewinds = "recurrent state" if recurrent else "sliding window"
    images = plan.embed is not None and (not batched or plan.state is not None)
    for cond, why in ((images, "images or audio"), (req.params.json_schema is not None, "json_schema"),
                      (req.prompt.tools and req.prompt.tool_choice not in ("auto", "none"), "tool_choice"),
                      (kit.options.max_kv_size is not None, "max_kv_size"), (wraps, rewinds)):
        if cond:
            return why
    return None


def speculation_for(kit, req: Generate, plan, budget: int, batched: bool = False) -> Speculation:
    params = req.params
    draft = None
    if kit.draft is not None:
        why = "request" if not params.speculative else _refusal(kit, req, plan, budget, batched,
                                                                 params.num_draft_tokens)
        draft = Speculation(why is None, "on" if why is None else f"off: {why}", batched)
        if draft.on:
            return draft
    # auto: in the batch, greedy requests only (a sampled one keeps the draws it makes alone: verifying samples
    # several positions per draw); alone, mlx-lm's generate_step stays the reference path (engine.route)
    auto = batched and kit.info.max_concurrent > 1 and params.temperature == 0
    wanted = params.prompt_lookup if params.prompt_lookup is not None else auto
    if not wanted:
        return draft or Speculation()
    why = "not batched" if not batched else _refusal(kit, req, plan, budget, batched, params.prompt_lookup_tokens)
    return Speculation(on=False, label=draft.label if draft else None, batched=batched, lookup=why is None,
                       lookup_auto=params.prompt_lookup is None,
                       lookup_label="on" if why is None else f"off: {why}")


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

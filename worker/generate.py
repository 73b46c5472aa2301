"""One generate request: prompt -> token ids -> mlx-lm generate_step -> token events, stats, done.

Runs on the engine thread only. Emits events through ``emit``; never formats JSON.
"""

import time
from typing import Callable

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from .model import ModelKit
from .prompt import build_prompt
from .protocol import Done, Generate, Progress, Stats, Token, WorkerError
from .textstream import TextStream

PROGRESS_INTERVAL_S = 0.1


class Cancelled(Exception):
    """Raised from inside prefill when the request was cancelled."""


def run(kit: ModelKit, req: Generate, emit: Callable, cancelled: Callable[[], bool]) -> Done:
    tic = time.perf_counter()
    params = req.params
    plan = build_prompt(kit, req)
    ids = plan.ids
    n_prompt = len(ids)
    ctx = kit.info.context_length if kit.options.max_kv_size is None else None
    if ctx is not None and n_prompt >= ctx:
        raise WorkerError(
            "context_overflow", f"the prompt has {n_prompt} tokens; the context holds {ctx}"
        )
    budget = params.max_tokens if ctx is None else min(params.max_tokens, ctx - n_prompt)
    if params.seed is not None:
        mx.random.seed(params.seed)
    sampler = make_sampler(params.temperature, params.top_p, params.min_p, top_k=params.top_k)
    lease = kit.cache.take(plan.key, req.cache_key)
    cached = lease.reused
    stream = TextStream(kit.tokenizer.detokenizer, params.stop)
    eos = set(kit.info.eos_token_ids)
    last_progress = [0.0]

    def on_prefill(processed: int, total: int):
        if cancelled():
            raise Cancelled()
        now = time.perf_counter()
        if processed in (0, total) or now - last_progress[0] >= PROGRESS_INTERVAL_S:
            last_progress[0] = now
            done = cached + processed
            emit(Progress(id=req.id, stage="prompt", fraction=round(done / n_prompt, 4),
                          total=n_prompt, cached=cached, processed=done))

    mx.reset_peak_memory()
    gen = generate_step(
        mx.array(ids[cached:]), kit.model, max_tokens=budget, sampler=sampler,
        prompt_cache=lease.cache,
        input_embeddings=plan.embeddings[cached:] if plan.embeddings is not None else None,
        prefill_step_size=kit.options.prefill_step_size, prompt_progress_callback=on_prefill,
    )
    n_gen, reason, t_first = 0, None, None
    generated = []
    try:
        for token, _ in gen:
            if t_first is None:
                t_first = time.perf_counter()
            n_gen += 1
            generated.append(token)
            if token in eos:
                reason = "eos"
                break
            text, tok_ids = stream.add(token)
            if text or tok_ids:
                emit(Token(id=req.id, text=text, tokens=tok_ids))
            if stream.stop_string is not None:
                reason = "stop_string"
                break
            if cancelled():
                reason = "cancelled"
                break
    except Cancelled:
        reason = "cancelled"
    finally:
        gen.close()
    kit.cache.put(plan.key + generated, lease.cache, req.cache_key)
    if reason is None:
        reason = "max_tokens" if budget == params.max_tokens else "context_full"
        if cancelled():
            reason = "cancelled"
    if reason != "stop_string":
        text, tok_ids = stream.finish()
        if text or tok_ids:
            emit(Token(id=req.id, text=text, tokens=tok_ids))
    toc = time.perf_counter()
    prompt_s = (t_first or toc) - tic
    decode_s = toc - t_first if t_first is not None else 0.0
    emit(Stats(
        id=req.id, prompt_tokens=n_prompt, cached_tokens=cached,
        cache_miss_reason=lease.miss_reason, generated_tokens=n_gen,
        ttft_s=round(prompt_s, 6) if t_first is not None else 0.0,
        prompt_tps=round((n_prompt - cached) / prompt_s, 3) if t_first is not None and prompt_s > 0 else 0.0,
        generation_tps=round((n_gen - 1) / decode_s, 3) if n_gen > 1 and decode_s > 0 else 0.0,
        peak_memory_bytes=int(mx.get_peak_memory()), total_s=round(toc - tic, 6),
    ))
    return Done(id=req.id, request="generate", stop_reason=reason,
                stop_string=stream.stop_string, text=stream.text, cached_tokens=cached,
                cache_miss_reason=lease.miss_reason)

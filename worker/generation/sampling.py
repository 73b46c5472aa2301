"""Sampler, logits processors (penalties, bias, JSON-schema constraint) and logprob reports."""

import json
import math
from typing import List, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors, make_sampler

from ..protocol import GenerateParams, TokenLogprob, TopLogprob, WorkerError


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


def processors_for(kit, params: GenerateParams, prefix: List[int]) -> list:
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


class GrammarConstraint:
    """A logits processor that only allows tokens keeping the output valid for an llguidance grammar.

    llguidance does the grammar work; its MLX helper is Metal-only, so the mask is applied here.
    When the output is complete only EOS remains allowed, so generation ends instead of spinning.
    ``field`` names the request field the grammar came from, for error messages.
    """

    def __init__(self, kit, grammar: str, field: str):
        from llguidance import LLMatcher
        from llguidance.numpy import allocate_token_bitmask

        lltok = llg_tokenizer(kit, field)
        err = LLMatcher.validate_grammar(grammar, lltok)
        if err and not err.startswith("WARNING"):
            raise WorkerError("invalid_params", f"{field} is not usable: {err}")
        self.matcher = LLMatcher(lltok, grammar, log_level=0)
        if self.matcher.is_error():
            raise WorkerError("invalid_params", f"{field}: {self.matcher.get_error()}")
        self.n_vocab = lltok.vocab_size
        self.bitmask = allocate_token_bitmask(1, self.n_vocab)
        self.calls = 0

    def __call__(self, tokens, logits):
        if self.calls:  # the last token is the one sampled after our previous call
            self.matcher.consume_token(int(tokens[-1].item()))
        self.calls += 1
        return self.mask(logits)

    def mask(self, logits, also=()):
        """``logits`` with every token the grammar forbids next at -inf (``also``: ids allowed anyway)."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        bits = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")[: self.n_vocab]
        width = logits.shape[-1]
        allowed = np.zeros(width, dtype=bool)
        allowed[: min(width, bits.size)] = bits[:width].astype(bool)
        allowed[[i for i in also if i < width]] = True
        return mx.where(mx.array(allowed), logits, mx.array(-np.inf, dtype=logits.dtype))


def JsonConstraint(kit, schema) -> GrammarConstraint:
    """Output constrained to JSON valid for ``schema`` (``True``: any JSON)."""
    from llguidance import LLMatcher

    if schema is True:  # JSON Schema's `true` accepts every value: any JSON
        schema = {}
    try:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})
    except ValueError as exc:
        raise WorkerError("invalid_params", f"params.json_schema is not usable: {exc}")
    return GrammarConstraint(kit, grammar, "params.json_schema")


def ToolCallConstraint(kit, lark: str) -> GrammarConstraint:
    from llguidance import LLMatcher

    return GrammarConstraint(kit, LLMatcher.grammar_from_lark(lark), "prompt.tool_choice")


class AnswerOnly:
    """A grammar that applies to the answer only: while the model reasons (between its single-token
    thinking markers) the logits pass unchanged; the grammar starts with the first answer token. In the
    answer's first position the start marker is allowed too, so the model may still open its reasoning."""

    def __init__(self, constraint: GrammarConstraint, start_id: int, end_id: int, initial: str):
        self.c, self.start_id, self.end_id = constraint, start_id, end_id
        self.reasoning = initial == "reasoning"
        self.first = not self.reasoning  # no answer token generated yet
        self.calls = 0

    def __call__(self, tokens, logits):
        if self.calls:  # the last token is the one sampled after our previous call
            t = int(tokens[-1].item())
            if self.reasoning:
                self.reasoning = t != self.end_id
            elif self.first and t == self.start_id:
                self.reasoning = True
            else:
                self.first = False
                self.c.matcher.consume_token(t)
        self.calls += 1
        if self.reasoning:
            return logits
        return self.c.mask(logits, also=(self.start_id,) if self.first else ())


def llg_tokenizer(kit, field: str = "params.json_schema"):
    lltok = getattr(kit, "_llg_tokenizer", None)
    if lltok is None:
        import llguidance.hf

        # the end a grammar forces: the tokenizer's own EOS (the turn end the chat template writes, e.g.
        # <|im_end|>) when it is one of the model's EOS ids, else the lowest of them
        own, ids = getattr(kit.tokenizer, "eos_token_id", None), sorted(kit.info.eos_token_ids)
        try:
            lltok = llguidance.hf.from_tokenizer(kit.tokenizer._tokenizer, n_vocab=kit.info.vocab_size,
                                                 eos_token=own if own in ids else ids[0])
        except Exception as exc:
            raise WorkerError("invalid_params", f"{field} needs a fast tokenizer: {exc}")
        kit._llg_tokenizer = lltok
    return lltok


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

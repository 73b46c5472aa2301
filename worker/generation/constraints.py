"""Grammars on the output: a JSON schema (``params.json_schema``) or a constrained tool call
(``prompt.tool_choice``), applied as logits processors with llguidance."""

import json

import mlx.core as mx
import numpy as np

from ..prompting.tools import call_grammar, tools_on
from ..protocol import Generate, WorkerError


def for_request(kit, req: Generate, initial: str):
    """The request's grammar (json_schema, or a constrained tool call), for the answer only on a model
    with single-token thinking markers."""
    grammar = call_grammar(kit, req.prompt, kit.tool_format) if tools_on(req.prompt) else None
    schema = req.params.json_schema
    if grammar is not None and schema is not None:
        raise WorkerError("invalid_params", "params.json_schema and a constrained prompt.tool_choice cannot be "
                          "combined")
    if schema is None and grammar is None:
        return None
    c = JsonConstraint(kit, schema) if schema is not None else ToolCallConstraint(kit, grammar)
    tok = kit.tokenizer
    if getattr(tok, "has_thinking", False) and len(tok.think_start_tokens) == 1 == len(tok.think_end_tokens):
        return AnswerOnly(c, tok.think_start_tokens[0], tok.think_end_tokens[0], initial)
    return c


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

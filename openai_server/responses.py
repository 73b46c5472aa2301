"""The worker's events -> OpenAI's response objects: a whole ``chat.completion`` / ``text_completion``, or the
``chunk`` objects of a stream. Reasoning (``token.channel == "reasoning"``) goes to ``reasoning_content`` only,
tool calls (``tool_call`` events) to ``tool_calls``; everything else is the answer's ``content``."""
from __future__ import annotations

import time

# the worker's stop_reason -> OpenAI's finish_reason
FINISH = {"eos": "stop", "stop_string": "stop", "stop_token": "stop", "max_tokens": "length",
          "context_full": "length", "tool_calls": "tool_calls", "cancelled": "stop"}


def usage(stats: dict | None) -> dict:
    stats = stats or {}
    prompt, completion = stats.get("prompt_tokens", 0), stats.get("generated_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": stats.get("cached_tokens", 0)},
            "completion_tokens_details": {"reasoning_tokens": stats.get("reasoning_tokens") or 0}}


def _token_text(entry: dict, event: dict) -> str:
    """A token's text: the event's own text when it released this one token (so the tokens add up to the
    answer), else the token's text alone, from its entry among the alternatives."""
    if len(event["tokens"]) == 1:
        return event["text"]
    return next((alt["text"] for alt in entry.get("top", ()) if alt["id"] == entry["id"]), "")


def chat_logprobs(event: dict, n: int) -> list:
    """A token event's logprobs as OpenAI's ``logprobs.content`` entries (``n`` alternatives each)."""
    out = []
    for entry in event.get("logprobs") or ():
        text = _token_text(entry, event)
        out.append({"token": text, "logprob": entry["logprob"], "bytes": list(text.encode()),
                    "top_logprobs": [{"token": a["text"], "logprob": a["logprob"], "bytes": list(a["text"].encode())}
                                     for a in entry.get("top", ())[:n]]})
    return out


def completion_logprobs(event: dict, n: int, offset: int) -> dict:
    """The legacy completions ``logprobs`` object of one token event, text offsets from ``offset``."""
    lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for entry in event.get("logprobs") or ():
        text = _token_text(entry, event)
        lp["tokens"].append(text)
        lp["token_logprobs"].append(entry["logprob"])
        lp["top_logprobs"].append({a["text"]: a["logprob"] for a in entry.get("top", ())[:n]})
        lp["text_offset"].append(offset)
        offset += len(text)
    return lp


class Turn:
    """Follows one generate's events and builds what OpenAI's API answers for them."""

    def __init__(self, rid: str, model: str, chat: bool, logprobs: int | None):
        self.rid, self.model, self.chat, self.logprobs = rid, model, chat, logprobs
        self.created = int(time.time())
        self.stats = self.done = None
        self.calls, self.lp_content = [], []
        self.lp_legacy = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.text_len = 0

    def _base(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, delta: dict | None = None, finish=None, logprobs=None, text=None) -> dict:
        """One stream chunk: a chat delta, or completion text."""
        if self.chat:
            choice = {"index": 0, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        return {**self._base("text_completion"), "choices": [choice]}

    def first_chunk(self) -> dict | None:
        return self.chunk({"role": "assistant", "content": ""}) if self.chat else None

    def add(self, ev: dict) -> list:
        """Take one worker event; return the stream chunks it makes (none for progress, stats, done)."""
        kind = ev["type"]
        if kind == "token":
            return self._token(ev)
        if kind == "tool_call":
            call = ev["call"]
            self.calls.append(call)
            delta = {"tool_calls": [{"index": ev["index"], "id": call["id"], "type": "function",
                                     "function": {"name": call["function"]["name"],
                                                  "arguments": call["function"]["arguments"]}}]}
            return [self.chunk(delta)] if self.chat else []
        if kind == "stats":
            self.stats = ev
        elif kind == "done":
            self.done = ev
        return []

    def _token(self, ev: dict) -> list:
        text, n = ev["text"], self.logprobs
        if self.chat:
            lps = chat_logprobs(ev, n) if n is not None else []
            self.lp_content += lps
            if not text and not lps:
                return []
            key = "reasoning_content" if ev.get("channel") == "reasoning" else "content"
            return [self.chunk({key: text}, logprobs={"content": lps} if lps else None)]
        lp = completion_logprobs(ev, n, self.text_len) if n is not None else None
        self.text_len += len(text)
        if lp:
            for k, v in lp.items():
                self.lp_legacy[k] += v
        return [self.chunk(text=text, logprobs=lp)] if text or lp else []

    @property
    def finish_reason(self) -> str:
        return FINISH.get((self.done or {}).get("stop_reason"), "stop")

    def last_chunk(self) -> dict:
        return self.chunk({}, finish=self.finish_reason) if self.chat else self.chunk(finish=self.finish_reason)

    def usage_chunk(self) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(kind), "choices": [], "usage": usage(self.stats)}

    def response(self) -> dict:
        """The whole answer, from the terminal ``done`` (its text is the concatenated answer tokens)."""
        done = self.done or {}
        if not self.chat:
            choice = {"index": 0, "text": done.get("text") or "", "finish_reason": self.finish_reason,
                      "logprobs": self.lp_legacy if self.logprobs is not None else None}
            return {**self._base("text_completion"), "choices": [choice], "usage": usage(self.stats)}
        calls = done.get("tool_calls") or []
        message = {"role": "assistant", "content": done.get("text") or (None if calls else "")}
        if done.get("reasoning"):
            message["reasoning_content"] = done["reasoning"]
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "finish_reason": self.finish_reason,
                  "logprobs": {"content": self.lp_content} if self.logprobs is not None else None}
        return {**self._base("chat.completion"), "choices": [choice], "usage": usage(self.stats)}

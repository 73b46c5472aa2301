"""Generated text split by channel: reasoning, answer and tool calls, with stop strings on the answer.

mlx-lm knows each model's markers (``TokenizerWrapper``: ``think_start`` / ``think_end``, and for a
tool-calling template ``tool_call_start`` / ``tool_call_end`` and the parser of its format) and matches
them on decoded text with its ``TextStateMachine`` (robust to how the marker is tokenized). This module
feeds the streaming detokenizer's text through that machine and releases:

- reasoning text as it comes (markers stripped),
- answer text only when it is final: never half of a UTF-8 character, never the start of something
  that may still become a stop string; stop strings apply to the answer only, so a stop string inside
  the reasoning does not end the generation,
- each tool call once its end marker (or the end of the generation) is reached, parsed by mlx-lm's
  parser; a call that does not parse is released as answer text, markers included, so nothing is lost.

Token ids are released with the first piece of any channel they contributed to (a tool call carries the
ids of its tokens), so every generated id appears exactly once across the pieces.
"""

import uuid
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

from mlx_lm.generate import TextStateMachine



@dataclass(frozen=True)
class Markers:
    """What a generation is split on: the model's thinking markers, and a tool format when tools are on."""

    think: Optional[tuple] = None  # (start, end) strings
    tool: Optional[tuple] = None  # (start, end) strings; end "" when a call runs to the end (Mistral)
    parser: Optional[Callable] = None  # mlx-lm's parse_tool_call(text, tools)
    tools: Optional[list] = None  # the request's tool definitions, for the parser

    def machine(self) -> TextStateMachine:
        transitions = {}
        if self.think:
            transitions["normal"] = [(self.think[0], "reasoning")]
            transitions["reasoning"] = [(self.think[1], "normal")]
        if self.tool:  # as mlx-lm's make_text_state_machine: a call may also start inside the reasoning
            for state in ("normal", "reasoning") if self.think else ("normal",):
                transitions.setdefault(state, []).append((self.tool[0], "tool"))
            transitions["tool"] = [(self.tool[1], "normal")] if self.tool[1] else []
        return TextStateMachine(transitions or None)


@dataclass
class Piece:
    kind: str  # "reasoning" | "answer" | "tool_call"
    text: str
    ids: List[int]
    calls: list = field(default_factory=list)  # tool_call: [{"id", "name", "arguments"}]


class Channels:
    def __init__(self, detokenizer, stop: Sequence[str] = (), markers: Markers = Markers(),
                 initial: str = "normal"):
        self.detok = detokenizer
        self.detok.reset()
        self.stop = [s for s in stop if s]
        self.markers = markers
        self.state = markers.machine().make_state(initial if markers.think else "normal")
        self.channel = self.state[0]
        self.pending: List[int] = []  # ids not yet released with a piece
        self.held = ""  # answer text that may still become a stop string
        self.tool_text = ""
        self.stop_string: Optional[str] = None
        self.answer: List[str] = []
        self.reasoning: List[str] = []
        self.calls: list = []
        self.reasoning_tokens = 0

    @property
    def text(self) -> str:
        return "".join(self.answer)

    def add(self, token: int) -> List[Piece]:
        """Feed one token; return the pieces it completes (possibly none). Sets stop_string on a match."""
        self.detok.add_token(token)
        self.pending.append(token)
        return self._feed(self.detok.last_segment, final=False)

    def finish(self) -> List[Piece]:
        """Flush everything at the end of a generation (not after a stop-string match)."""
        if self.stop_string is not None:
            return []
        self.detok.finalize()
        pieces = self._feed(self.detok.last_segment, final=False)
        self.state, rest, name = TextStateMachine.flush(self.state)
        pieces += self._segment(name, rest, final=True)
        if self.channel == "tool" and self.stop_string is None:
            pieces += self._end_call(closed=False)
        pieces += self._release(True)
        if self.pending:  # ids that produced no text (an EOS, a marker at the very end)
            pieces.append(Piece(self.channel if self.channel == "reasoning" else "answer", "", self._ids()))
        return pieces

    def _feed(self, text: str, final: bool) -> List[Piece]:
        if self.stop_string is not None:
            return []
        self.state, segments = TextStateMachine.split(self.state, text)
        pieces = []
        for name, part in segments:
            pieces += self._segment(name, part, final)
            if self.stop_string is not None:
                break
        return pieces

    def _segment(self, name: Optional[str], part: str, final: bool) -> List[Piece]:
        pieces = []
        if self.channel == "tool" and name != "tool":
            pieces += self._end_call(closed=True)
        if name is not None:
            self.channel = name
        if name == "tool":
            self.tool_text += part
        elif name == "reasoning":
            pieces += self._reason(part)
        elif name == "normal":
            self.held += part
            pieces += self._release(final)
        return pieces

    def _reason(self, part: str) -> List[Piece]:
        if not part:
            return []
        self.reasoning.append(part)
        ids = self._ids()
        self.reasoning_tokens += len(ids)
        return [Piece("reasoning", part, ids)]

    def _end_call(self, closed: bool) -> List[Piece]:
        """The tool call's text is complete (``closed``: by its end marker): parse it, or release it as
        answer text, as it was generated, when it does not parse."""
        text, self.tool_text = self.tool_text, ""
        m = self.markers
        try:
            parsed = m.parser(text, m.tools)
            calls = parsed if isinstance(parsed, list) else [parsed]
            calls = [_call(c) for c in calls]
        except Exception:  # mlx-lm's parsers raise ValueError / JSONDecodeError / KeyError on bad text
            self.held += m.tool[0] + text + (m.tool[1] if closed else "")
            return self._release(False)
        self.calls.extend(calls)
        return [Piece("tool_call", text, self._ids(), calls)]

    def _release(self, final: bool) -> List[Piece]:
        if self.stop_string is not None:
            return []
        buf = self.held
        cut, match = _first_stop(buf, self.stop)
        if match is not None:
            self.stop_string = match
            out, self.held = buf[:cut], ""
        elif final:
            out, self.held = buf, ""
        else:
            keep = _partial_stop_len(buf, self.stop)
            if buf[: len(buf) - keep].endswith("\ufffd"):
                keep = len(buf)  # an incomplete UTF-8 sequence: wait for the next token
            out, self.held = buf[: len(buf) - keep], buf[len(buf) - keep:]
        if not out:
            if match is not None:
                self.pending = []  # these tokens only produced the stop string
            return []
        self.answer.append(out)
        return [Piece("answer", out, self._ids())]

    def _ids(self) -> List[int]:
        ids, self.pending = self.pending, []
        return ids


def _call(parsed) -> dict:
    """mlx-lm's parsed call -> {"id", "name", "arguments"}; a parser's own id is kept."""
    if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str):
        raise ValueError(f"not a tool call: {parsed!r}")
    call_id = parsed.get("id") if isinstance(parsed.get("id"), str) else f"call_{uuid.uuid4().hex[:24]}"
    return {"id": call_id, "name": parsed["name"], "arguments": parsed.get("arguments", {})}


def initial_channel(tokenizer, ids: List[int]) -> str:
    """"reasoning" when the prompt ends inside an open thinking block (a template that opens it), as
    mlx-lm's server decides it (single-token markers are searched at C speed: prompts get long)."""
    if not getattr(tokenizer, "has_thinking", False):
        return "normal"
    starts, ends = tokenizer.think_start_tokens, tokenizer.think_end_tokens
    if len(starts) == 1 == len(ends):
        return "reasoning" if _rindex(ids, starts[0]) > _rindex(ids, ends[0]) else "normal"
    start, end = tokenizer.rfind_think_start(ids), tokenizer.rfind_think_end(ids)
    return "reasoning" if start > end else "normal"


def _rindex(ids: List[int], token: int) -> int:
    try:
        return len(ids) - 1 - ids[::-1].index(token)
    except ValueError:
        return -1


def _first_stop(text: str, stops: Sequence[str]):
    best, match = len(text) + 1, None
    for s in stops:
        i = text.find(s)
        if i != -1 and i < best:
            best, match = i, s
    return best, match


def _partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n

"""Token ids to safe text fragments: streaming detokenization with stop strings held back.

Text is only released when it is final: never half of a UTF-8 character, never the start of
something that may still become a stop string.
"""

from typing import List, Optional, Sequence, Tuple


class TextStream:
    def __init__(self, detokenizer, stop: Sequence[str] = ()):
        self.detok = detokenizer
        self.detok.reset()
        self.stop = [s for s in stop if s]
        self.held = ""  # decoded but not yet released
        self.held_ids: List[int] = []
        self.emitted: List[str] = []
        self.stop_string: Optional[str] = None

    def add(self, token: int) -> Tuple[str, List[int]]:
        """Feed one token; return (text to release, ids it came from). Sets stop_string on a match."""
        self.detok.add_token(token)
        self.held += self.detok.last_segment
        self.held_ids.append(token)
        return self._release(final=False)

    def finish(self) -> Tuple[str, List[int]]:
        """Flush everything at the end of a generation (not after a stop-string match)."""
        self.detok.finalize()
        self.held += self.detok.last_segment
        return self._release(final=True)

    @property
    def text(self) -> str:
        return "".join(self.emitted)

    def _release(self, final: bool) -> Tuple[str, List[int]]:
        if self.stop_string is not None:
            return "", []
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
            out, self.held = buf[: len(buf) - keep], buf[len(buf) - keep :]
        if out or final:
            # ids are released with the first text they contributed to (at the end: even with none)
            ids, self.held_ids = self.held_ids, []
        else:
            ids = []
            if match is not None:
                self.held_ids = []  # these tokens only produced the stop string
        if out:
            self.emitted.append(out)
        return out, ids


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

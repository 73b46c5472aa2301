"""Prompt lookup: draft-free speculation. The tokens proposed for a request are those that followed the latest
earlier occurrence of its last few tokens (an n-gram of its prompt and output), as llama.cpp's lookup decoding and
transformers' ``prompt_lookup_num_tokens`` do; the model verifies them like a draft model's (batch_speculation.py).

Auto mode (``params.prompt_lookup: null``) proposes only while it pays: when the proposals of the request's
recent attempts (at least ``AUTO_TRIAL`` tokens) are less than ``AUTO_MIN_RATE`` accepted, it pauses for
``AUTO_PAUSE`` tokens (twice as long after each poor run in a row), then tries again; it also matches only
3-token n-grams (an answer often opens with new text, then quotes its prompt: a
permanent stop measured 1.04x on a code edit where the back-off gives the full gain; bench/README.md
*Prompt lookup*).
"""

from typing import Dict, List, Optional, Tuple

NGRAM_MAX = 3  # the longest suffix looked up first
NGRAM_MIN = 2  # single tokens match too often to pay
AUTO_NGRAM_MIN = 3  # auto mode: two-token matches are mostly wrong in prose ("of the", ", and")
AUTO_TRIAL = 24  # auto mode: proposed tokens the recent acceptance is judged on
AUTO_MIN_RATE = 0.3  # auto mode: the accepted share of proposed tokens below which proposing pauses
AUTO_PAUSE = 16  # auto mode: tokens without proposals after a poor run, doubled after each poor run in a row
AUTO_PAUSE_MAX = 256
AUTO_WIDTH = 3  # auto mode: tokens proposed at first, doubled (up to k) while all are accepted


class Lookup:
    """An index of a request's token history: each n-gram (NGRAM_MIN..NGRAM_MAX) -> where its latest
    occurrence's continuation begins. ``extend`` as tokens come, ``propose`` before a step: at most ``k``
    tokens of that continuation."""

    def __init__(self, tokens: List[int], k: int, auto: bool):
        self.k, self.auto = k, auto
        self.tokens: List[int] = []
        self.index: Dict[Tuple[int, ...], int] = {}
        self.proposed = self.accepted = 0  # the recent attempts' (auto mode: since the last pause)
        self.resume_at = 0  # auto mode: the history length from which it proposes again
        self.poor_runs = 0  # auto mode: poor runs in a row
        self.width = min(k, AUTO_WIDTH) if auto else k  # tokens proposed next (auto mode: grows while all are accepted)
        self.extend(tokens)

    def extend(self, tokens: List[int]) -> None:
        h = self.tokens
        for t in tokens:
            i = len(h)  # the position t lands at: every n-gram ending just before it continues with it
            for n in range(NGRAM_MIN, NGRAM_MAX + 1):
                if i >= n:
                    self.index[tuple(h[i - n:i])] = i
            h.append(t)

    def trim(self, n: int) -> None:
        """Forget the last ``n`` tokens (rare: tokens fed but never reported); entries pointing past the end
        stay harmless (a proposal is cut at the history's end)."""
        if n > 0:
            del self.tokens[-n:]

    @property
    def paying(self) -> bool:
        return not self.auto or len(self.tokens) >= self.resume_at

    def propose(self, extra: Optional[List[int]] = None) -> List[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the history's last n-gram
        (``extra``: tokens known to follow the history but not added yet)."""
        if not self.paying:
            return []
        h = self.tokens + (extra or [])
        for n in range(NGRAM_MAX, (AUTO_NGRAM_MIN if self.auto else NGRAM_MIN) - 1, -1):
            if len(h) <= n:
                continue
            at = self.index.get(tuple(h[-n:]))
            if at is not None:
                return h[at:at + self.width]
        return []

    def record(self, proposed: int, accepted: int) -> None:
        """One verify attempt's outcome; auto mode pauses after a poor run of them."""
        self.proposed += proposed
        self.accepted += accepted
        if self.auto:  # a verify pass of many tokens costs more where it is compute-bound (a CPU)
            self.width = min(self.k, 2 * self.width if accepted == proposed else max(AUTO_WIDTH, accepted + 2))
        if self.auto and self.proposed >= AUTO_TRIAL:
            poor = self.accepted < AUTO_MIN_RATE * self.proposed
            self.poor_runs = self.poor_runs + 1 if poor else 0
            if poor:
                self.resume_at = len(self.tokens) + min(AUTO_PAUSE << (self.poor_runs - 1), AUTO_PAUSE_MAX)
            self.proposed = self.accepted = 0

"""Tokenizing a prompt that extends an earlier one without tokenizing the shared part again.

Chat apps send the whole conversation every turn, so each follow-up's text starts with the previous
prompt's; tokenizing 16k tokens takes tens of milliseconds on a CPU, more than a GPU needs for the new
turn itself. A Hugging Face fast tokenizer first splits the text at its added tokens (``<|im_start|>``,
``<start_of_turn>``, ...) and tokenizes the pieces between them independently, so the ids up to the start
of an added token do not depend on what follows it. A new text that shares a prefix with a remembered
one keeps the remembered ids up to the last such token inside the shared prefix and tokenizes only the
rest. Added tokens whose matching depends on their neighbours (``lstrip``, ``single_word``,
``normalized``) are not used as cut points. A self-check at load compares the result with a whole
tokenization on rendered conversations; a tokenizer that fails it, or is not a fast tokenizer, is
always tokenized whole (but for the outputs below).

It also remembers what the model generated after each prompt (``remember_output``): a later text that
continues a prompt and then the text of its output (a follow-up turn whose template re-renders the answer)
gets the prompt's ids and the model's own output ids for that text, and only the rest is tokenized. Those
ids are what the prompt cache holds, so the whole earlier turn is reused even where tokenizing the same text
gives other ids (a model may emit ``"}`` + ``}`` where the tokenizer writes ``"`` + ``}}``); the prompt then
differs from a fresh tokenization exactly there (PROTOCOL.md, "The prompt cache").
"""

import logging
from dataclasses import dataclass
from typing import Callable, List, Optional

from ..cache.prefix import common_prefix

log = logging.getLogger("worker")

MEMO_TEXTS = 8


@dataclass(frozen=True)
class _Seen:
    text: str
    special: bool  # add_special_tokens
    ids: tuple
    cuts: tuple  # (char start, char end, token index) of each added token usable as a cut


@dataclass(frozen=True)
class _Said:
    """A prompt (as ``_Seen``) and the ids the model generated after it."""

    prompt: _Seen
    generated: tuple
    detokenize: Optional[Callable[[list], str]] = None  # the text the worker gave for output ids (see below)


class PrefixTokenizer:
    """``encode(text, add_special_tokens)`` equal to the tokenizer's own, reusing remembered prefixes."""

    def __init__(self, hf_tokenizer, probes: Optional[List[str]] = None):
        self.hf = hf_tokenizer
        self.backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        self.seen: List[_Seen] = []
        self.said: List[_Said] = []
        self.reused_chars = 0  # for tests and logs: how much the last encode did not tokenize again
        self.cut_ids = set()
        if self.backend is not None:
            for tid, tok in self.backend.get_added_tokens_decoder().items():
                if not (tok.lstrip or tok.single_word or tok.normalized):
                    self.cut_ids.add(int(tid))
        self.enabled = bool(self.cut_ids) and self._self_check(probes or [])
        if self.backend is not None and not self.enabled:
            log.info("prompts are tokenized whole: the tokenizer failed the prefix self-check")

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        self.reused_chars = 0
        best, cut = self._best_seen(text, add_special_tokens) if self.enabled else (None, None)
        said = self._continued_output(text, add_special_tokens, cut[0] if cut else 0)
        if said is not None:
            start, ids, cuts = said
        elif not self.enabled:
            return [int(t) for t in self.hf.encode(text, add_special_tokens=add_special_tokens)]
        elif best is None:
            start, ids, cuts = 0, (), ()
        else:
            start, _, at = cut
            ids, cuts = best.ids[:at], tuple(c for c in best.cuts if c[0] < start)
        special = add_special_tokens and start == 0
        if self.backend is not None:
            enc = self.backend.encode(text[start:], add_special_tokens=special)
            ids, cuts = ids + tuple(enc.ids), cuts + self._cuts(enc, start, len(ids))
        else:  # a slow tokenizer (no memo, no cuts): only a continued output is reused
            ids = ids + tuple(int(t) for t in self.hf.encode(text[start:], add_special_tokens=special))
        self.reused_chars = start
        if self.enabled:
            self._remember(_Seen(text, add_special_tokens, ids, cuts))
        return list(ids)

    def _best_seen(self, text: str, special: bool) -> tuple:
        """(the remembered text, its cut) that lets ``text`` keep the most ids, or (None, None)."""
        best, cut = None, None
        for seen in self.seen:
            if seen.special != special:
                continue
            n = common_prefix(seen.text, text)
            usable = [c for c in seen.cuts if c[1] <= n and c[0] > 0]
            if usable and (cut is None or usable[-1][0] > cut[0]):
                best, cut = seen, usable[-1]
        return best, cut

    def remember_output(self, text: str, add_special_tokens: bool, ids: List[int], generated: List[int],
                        detokenize: Optional[Callable[[list], str]] = None) -> None:
        """The model generated ``generated`` after the prompt ``text`` (tokenized here as ``ids``).
        ``detokenize``: the text the worker streamed for output ids (``detokenizer(wrapper)``), which is what a
        host re-sends; without it, the tokenizer's own decode."""
        if not generated:
            return
        seen = next((s for s in self.seen if s.text == text and s.special == add_special_tokens
                     and list(s.ids) == list(ids)), None)
        prompt = seen or _Seen(text, add_special_tokens, tuple(ids), ())
        self.said = [s for s in self.said if s.prompt.text != text][-(MEMO_TEXTS - 1):] + [
            _Said(prompt, tuple(int(t) for t in generated), detokenize)]

    def _continued_output(self, text: str, special: bool, beyond: int):
        """(start char, ids, cuts) reusing a remembered prompt and the longest part of its output that ``text``
        continues with, when that reaches past ``beyond`` chars (what the plain memo reuses) and takes at least
        one output id; else None."""
        found = None
        for said in self.said:
            p = said.prompt
            if p.special != special or not text.startswith(p.text):
                continue
            k, chars = self._output_prefix(said, text[len(p.text):])
            reach = len(p.text) + chars
            if k and reach > beyond:
                beyond = reach
                ids = p.ids + said.generated[:k]
                found = (reach, ids, p.cuts + ((reach, reach, len(ids)),))
        return found

    def _output_prefix(self, said: _Said, rest: str) -> tuple:
        """(k, chars): the most output ids whose text ``rest`` starts with, and the length of that text."""
        gen = said.generated
        anchor = list(said.prompt.ids[-1:])  # decoded after a real token, so no leading space is dropped
        head = self._decode(anchor)

        def text_of(k: int):
            if said.detokenize is not None:
                piece = said.detokenize(list(gen[:k]))
            else:
                full = self._decode(anchor + list(gen[:k]))
                piece = full[len(head):] if full.startswith(head) else None
            return piece if piece is not None and not piece.endswith("\ufffd") else None

        whole = text_of(len(gen))
        if whole is not None and rest.startswith(whole):
            return len(gen), len(whole)
        lo, hi = 0, len(gen) - 1  # text_of(lo) is a prefix of rest (lo = 0: ""); search the largest
        while lo < hi:
            mid = (lo + hi + 1) // 2
            piece = text_of(mid)
            if piece is not None and rest.startswith(piece):
                lo = mid
            else:
                hi = mid - 1
        return lo, len(text_of(lo) or "")

    def _decode(self, ids: List[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _cuts(self, enc, char0: int, tok0: int) -> tuple:
        return tuple((char0 + s, char0 + e, tok0 + i) for i, (tid, (s, e)) in enumerate(zip(enc.ids, enc.offsets))
                     if tid in self.cut_ids and e > s)

    def _remember(self, seen: _Seen) -> None:
        self.seen = [s for s in self.seen if s.text != seen.text or s.special != seen.special]
        self.seen = (self.seen + [seen])[-MEMO_TEXTS:]

    def _self_check(self, probes: List[str]) -> bool:
        """Each probe (a text extending the one before, e.g. longer and longer conversations) and a few
        edits of it, tokenized through the memo, equal a whole tokenization by the tokenizer itself."""
        self.enabled = True
        try:
            texts = []
            for p in probes:
                texts += [p, p + " Hello", p + "\n\n", p[: len(p) // 2]]
            for text in texts:
                for special in (False, True):
                    want = [int(t) for t in self.hf.encode(text, add_special_tokens=special)]
                    if self.encode(text, special) != want:
                        return False
            return True
        except Exception:  # noqa: BLE001 (an odd tokenizer: tokenize whole)
            log.debug("prefix tokenizer self-check failed", exc_info=True)
            return False
        finally:
            self.seen, self.said = [], []


def probe_texts(tokenizer) -> List[str]:
    """Texts of growing length for the self-check: conversations rendered by the model's chat template,
    and plain text around the tokenizer's special tokens (for models without a template, and for what
    the template does not show)."""
    turns = [("user", "Hi! What's 2+2?"), ("assistant", " It is 4.\n"), ("user", "And in words, naïve café? 日本")]
    out = []
    for k in range(1, len(turns) + 1):
        msgs = [{"role": r, "content": c} for r, c in turns[:k]]
        try:
            out.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=k % 2 == 1))
        except Exception:  # noqa: BLE001 (no template, or one that wants other roles: fewer probes)
            break
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t][:3] or [""]
    a, b, c = (specials * 3)[:3]
    text = f"Hello{a} world, naïve 日本\n{b}  x"
    out += [text, text + f"{c} more  text", text + f"{c} more  text{a}\n end"]
    return out


def detokenizer(wrapper) -> Callable[[list], str]:
    """Output ids -> the text the worker streams for them: mlx-lm's streaming detokenizer of ``wrapper`` (a
    ``TokenizerWrapper``), fresh as each request's; special tokens written, one leading space dropped as it drops
    it. A host re-sends this text, so an output is matched against it."""

    def detokenize(ids: list) -> str:
        d = wrapper.detokenizer
        for t in ids:
            d.add_token(t)
        d.finalize()
        return d.text

    return detokenize

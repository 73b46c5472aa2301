"""PROTOCOL.md's rule for the ids of a prompt that continues an earlier turn ("The prompt cache": the model's own
ids are reused), written with the tokenizer alone, for tests to predict what the worker's prompt holds. The
worker has no upstream reference here (mlx-lm tokenizes every prompt whole), so this is the spec as code: slow
and plain, and it imports nothing of worker/.

After a turn whose prompt text ``prev_text`` was tokenized as ``prev_ids`` and which generated ``generated``:
- a text that starts with ``prev_text`` and goes on with the text of at least one generated token takes
  ``prev_ids``, the longest such run of generated ids, then the rest tokenized;
- else it keeps ``prev_ids`` up to the last added token (``<start_of_turn>``, ``<|im_start|>``...) that lies
  wholly inside the text both share, and tokenizes from that token on;
- else it is tokenized whole.
"""


def _decode(tok, ids):
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _after(tok, anchor, ids):
    """The text ``ids`` add after ``anchor`` (decoded after it, so a leading space stays), or None mid-character."""
    head, full = _decode(tok, anchor), _decode(tok, list(anchor) + list(ids))
    if not full.startswith(head) or full.endswith("\ufffd"):
        return None
    return full[len(head):]


def cut_ids(tok) -> set:
    """The added tokens a tokenizer splits on whatever their neighbours (no lstrip, rstrip-free matching)."""
    backend = tok.backend_tokenizer
    return {int(i) for i, t in backend.get_added_tokens_decoder().items()
            if not (t.lstrip or t.single_word or t.normalized)}


def continued_ids(tok, prev_text: str, prev_ids: list, generated: list, text: str) -> list:
    """``text``'s ids by the rule above (``tok``: a Hugging Face fast tokenizer)."""
    encode = lambda s: [int(t) for t in tok.encode(s, add_special_tokens=False)]  # noqa: E731
    if text.startswith(prev_text):
        rest = text[len(prev_text):]
        for k in range(len(generated), 0, -1):
            piece = _after(tok, prev_ids[-1:], generated[:k])
            if piece is not None and rest.startswith(piece):
                return list(prev_ids) + list(generated[:k]) + encode(rest[len(piece):])
    shared = 0
    while shared < min(len(text), len(prev_text)) and text[shared] == prev_text[shared]:
        shared += 1
    cuts = cut_ids(tok)
    for at in range(len(prev_ids) - 1, 0, -1):
        if prev_ids[at] in cuts:
            start = len(_decode(tok, prev_ids[:at]))
            if 0 < start and start + len(_decode(tok, prev_ids[at:at + 1])) <= shared:
                return list(prev_ids[:at]) + encode(text[start:])
    return encode(text)

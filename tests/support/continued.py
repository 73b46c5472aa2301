"""PROTOCOL.md's rule for the ids of a prompt that continues an earlier turn ("The prompt cache": the model's own
ids are reused), written with the tokenizer alone, for tests to predict what the worker's prompt holds. The
worker has no upstream reference here (mlx-lm tokenizes every prompt whole), so this is the spec as code: slow
and plain, and it imports nothing of worker/.

After a turn whose prompt text ``prev_text`` was tokenized as ``prev_ids`` and which generated ``generated``:
- a text that starts with ``prev_text`` and goes on with the text the host was streamed for at least one generated
  token (mlx-lm's streaming detokenizer: special tokens written, a leading space dropped) takes
  ``prev_ids``, the longest such run of generated ids, then the rest tokenized;
- else it keeps ``prev_ids`` up to the last added token (``<start_of_turn>``, ``<|im_start|>``...) that lies
  wholly inside the text both share, and tokenizes from that token on;
- else it is tokenized whole.
"""


def _decode(tok, ids):
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def streamed(path):
    """Output ids -> the text a host is streamed for them: mlx-lm's own streaming detokenizer for the model at
    ``path`` (special tokens written, one leading space dropped as mlx-lm drops it)."""
    from mlx_lm.tokenizer_utils import load

    wrapper = load(path)

    def detokenize(ids):
        d = wrapper.detokenizer
        for t in ids:
            d.add_token(int(t))
        d.finalize()
        return d.text

    return detokenize


def cut_ids(tok) -> set:
    """The added tokens a tokenizer splits on whatever their neighbours (no lstrip, rstrip-free matching)."""
    backend = tok.backend_tokenizer
    return {int(i) for i, t in backend.get_added_tokens_decoder().items()
            if not (t.lstrip or t.single_word or t.normalized)}


def _cut_spans(tok, text: str, ids: list) -> list:
    """(char start, char end, index) of each of ``ids``' cut tokens, found in order in ``text`` (an added token is
    written as itself in the text)."""
    cuts, out, pos = cut_ids(tok), [], 0
    for i, t in enumerate(ids):
        if t in cuts:
            s = tok.convert_ids_to_tokens(int(t))
            at = text.find(s, pos)
            if at < 0:
                break
            out.append((at, at + len(s), i))
            pos = at + len(s)
    return out


def continued_ids(tok, prev_text: str, prev_ids: list, generated: list, text: str, detokenize) -> list:
    """``text``'s ids by the rule above. ``tok``: a Hugging Face fast tokenizer; ``detokenize``: output ids -> the
    text the host was streamed (``streamed(path)``)."""
    encode = lambda s: [int(t) for t in tok.encode(s, add_special_tokens=False)]  # noqa: E731
    if text.startswith(prev_text):
        rest = text[len(prev_text):]
        for k in range(len(generated), 0, -1):
            piece = detokenize(generated[:k])
            if not piece.endswith("\ufffd") and rest.startswith(piece):
                return list(prev_ids) + list(generated[:k]) + encode(rest[len(piece):])
    shared = 0
    while shared < min(len(text), len(prev_text)) and text[shared] == prev_text[shared]:
        shared += 1
    usable = [(start, i) for start, end, i in _cut_spans(tok, prev_text, prev_ids) if 0 < start and end <= shared]
    if usable:
        start, at = usable[-1]
        return list(prev_ids[:at]) + encode(text[start:])
    return encode(text)

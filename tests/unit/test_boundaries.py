"""worker/prompting/boundaries.py: where the next turn may leave a prompt (the end of its system messages, the
start of its thinking tail), as token positions; the Hermes tool fixture's tokenizer (ChatML, <think> markers)."""

import pytest

from tests.support.tool_fixtures import tool_fixture_dir
from worker.prompting.boundaries import system_end, token_checkpoints

SYSTEM = {"role": "system", "content": "You are terse. Answer in one word, always."}


@pytest.fixture(scope="module")
def tok(fixtures_root):
    from mlx_lm.tokenizer_utils import load

    return load(tool_fixture_dir("hermes", fixtures_root))


def _text(tok, messages, **kw):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)


def test_the_system_messages_end_where_two_conversations_part(tok):
    a = [SYSTEM, {"role": "user", "content": "Hi there"}]
    b = [SYSTEM, {"role": "user", "content": "What now?"}]
    ta, tb = _text(tok, a), _text(tok, b)
    ca, cb = system_end(tok, a, {}, ta), system_end(tok, b, {}, tb)
    assert ca == cb and ta[:ca] == tb[:cb] and SYSTEM["content"] in ta[:ca]
    assert ta[ca:].startswith("Hi there"), ta[ca:ca + 20]  # what the two share: up to the user's words
    ids = tok.encode(ta, add_special_tokens=False)
    (pos,) = token_checkpoints(tok, ta, ids, False, (ca,))
    assert ids[:pos] == tok.encode(ta[:ca], add_special_tokens=False)
    assert tok.decode(ids[pos:]).startswith("Hi there")


def test_no_system_messages_no_boundary(tok):
    msgs = [{"role": "user", "content": "Hi"}]
    assert system_end(tok, msgs, {}, _text(tok, msgs)) is None
    assert system_end(tok, [SYSTEM], {}, _text(tok, [SYSTEM])) is None  # nothing follows them


def test_the_thinking_tail_is_a_checkpoint(tok):
    """A generation prompt that opens the reasoning (``think_open``): the template drops it from the turn it
    re-renders, so the next turn leaves this prompt at ``<think>``."""
    msgs = [{"role": "user", "content": "Think first."}]
    text = _text(tok, msgs, think_open=True)
    ids = tok.encode(text, add_special_tokens=False)
    think = tok.convert_tokens_to_ids("<think>")
    assert think in ids[-4:]
    assert token_checkpoints(tok, text, ids, False, ()) == (len(ids) - 1 - ids[::-1].index(think),)
    plain = _text(tok, msgs)
    assert token_checkpoints(tok, plain, tok.encode(plain, add_special_tokens=False), False, ()) == ()


def test_a_boundary_that_tokenizes_across_is_dropped(tok):
    """A character position inside what one token covers has no token position: no checkpoint."""
    text = "hello world"
    ids = tok.encode(text, add_special_tokens=False)
    inside = next(c for c in range(1, len(text)) if tok.encode(text[:c], add_special_tokens=False)
                  != ids[:len(tok.encode(text[:c], add_special_tokens=False))])
    assert token_checkpoints(tok, text, ids, False, (inside,)) == ()

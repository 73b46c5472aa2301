"""A hybrid model (LFM2-shaped: short-convolution layers, whose state cannot be cut back, between
full-attention layers) through the real worker: greedy parity with mlx-lm, follow-ups that reuse the previous
turn, and a regenerate and an edit that resume from snapshots of the convolution state.

Reuse is asserted exactly (PROTOCOL.md, The prompt cache): a prompt that extends an entry reuses all of it; one
that diverges resumes from the entry's longest snapshot within the common prefix. A request snapshots where its
cached part ends, at its prompt's last token, after its first generated token and every 4 generated tokens
(the newest two)."""

import mlx.core as mx
import pytest

from tests.support import reference
from tests.support.continued import continued_ids, streamed
from tests.support.client import Worker, generated_tokens
from tests.support.fixtures import fixture_dir
from tests.support.prompts import assert_varied, random_ids


@pytest.fixture(scope="module")
def lfm2(fixtures_root):
    return fixture_dir("lfm2", fixtures_root)


@pytest.fixture(scope="module")
def w(lfm2):
    worker = Worker()
    worker.load(lfm2)
    yield worker
    worker.close()


def _gen(w, rid, ids, n=8, path=None):
    """Greedy tokens and stats; with ``path``, each token's logprob is checked against mlx-lm's (one forward
    pass over prompt + answer): a resumed cache that lost a token may keep the argmax, not the logprobs."""
    params = {"max_tokens": n, "top_logprobs": 1} if path else {"max_tokens": n}
    events = w.request({"type": "generate", "id": rid, "prompt": {"tokens": ids}, "params": params})
    assert events[-1]["type"] == "done", events[-1]
    out = generated_tokens(events)
    if path:
        model, _ = reference.load_model(path, "float32")
        logits = model(mx.array(ids + out)[None])[0, len(ids) - 1:].astype(mx.float32)
        want = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        reports = [lp for e in events if e["type"] == "token" for lp in e["logprobs"]]
        assert [r["id"] for r in reports] == out
        for i, r in enumerate(reports):
            assert abs(r["logprob"] - want[i, r["id"]].item()) < 1e-4, (rid, i, r, want[i, r["id"]].item())
    return out, next(e for e in events if e["type"] == "stats")


def _common(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_hybrid_conversation_regenerate_and_edit(w, lfm2):
    w.request({"type": "cache_clear", "id": "cc"})
    ids, previous, reused = random_ids(40, 1), None, []
    for turn in range(8):
        out, st = _gen(w, f"t{turn}", ids)
        if previous is not None:  # the whole previous turn, its answer included
            assert st["cached_tokens"] == previous, (turn, st, previous)
        want = reference.generate(lfm2, ids, 8, dtype="float32")
        assert_varied(want, what=f"mlx-lm's turn {turn}")
        assert out == want, turn
        previous, prompt = len(ids) + len(out), ids
        reused.append(st["cached_tokens"])
        ids = ids + out + random_ids(30, 10 + turn)
    again, st = _gen(w, "regen", prompt, path=lfm2)  # the convolution state cannot be cut back: a snapshot serves it
    assert st["cached_tokens"] == len(prompt) - 1, st
    assert again == out
    edited = prompt[:-10] + random_ids(10, 99)  # the last turn's new message edited
    assert edited[-10] != prompt[-10]
    ed, st = _gen(w, "edit", edited, path=lfm2)
    # the snapshot where the last turn's cached part ended: the turn before, its answer included
    assert st["cached_tokens"] == reused[-1] == len(prompt) - 30, (st, reused)
    want = reference.generate(lfm2, edited, 8, dtype="float32")
    assert_varied(want, what="mlx-lm's answer to the edited prompt")
    assert ed == want


def test_hybrid_chat_messages_follow_up(w, lfm2):
    w.request({"type": "cache_clear", "id": "cc-m"})
    msgs = [{"role": "user", "content": "Tell me about the river and the mountain, please."}]
    first = w.request({"type": "generate", "id": "m1", "prompt": {"messages": msgs}, "params": {"max_tokens": 8}})
    assert first[-1]["type"] == "done", first[-1]
    ids1 = reference.chat_ids(lfm2, msgs)
    assert next(e for e in first if e["type"] == "stats")["prompt_tokens"] == len(ids1)
    gen1 = generated_tokens(first) + ([first[-1]["stop_token"]] if first[-1].get("stop_token") is not None else [])
    follow = msgs + [{"role": "assistant", "content": first[-1]["text"]},
                     {"role": "user", "content": "And the city?"}]
    second = w.request({"type": "generate", "id": "m2", "prompt": {"messages": follow},
                        "params": {"max_tokens": 8}})
    st = next(e for e in second if e["type"] == "stats")
    tok = reference.load_model(lfm2)[1]
    text1, text2 = (tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in (msgs, follow))
    # the follow-up holds the model's own ids for the answer it continues (PROTOCOL.md, The prompt cache)
    ids = continued_ids(tok._tokenizer, text1, ids1, gen1, text2, streamed(lfm2))
    assert st["prompt_tokens"] == len(ids)
    common, p = _common(ids1 + gen1, ids), len(ids1)
    assert p - 1 <= common <= len(ids1 + gen1), (common, p, len(gen1))
    if common == len(ids1 + gen1):  # it continues the whole turn: the entry is extended, nothing cut back
        assert st["cached_tokens"] == common, (st, common)
    else:  # the template re-rendered the answer's end: m1's longest snapshot within the common prefix (its
        # prompt's last token, then its first generated token, then every 4 generated tokens)
        decoded = [p + k for k in range(4, len(gen1) + 1, 4)][-2:]
        snaps = [n for n in [p - 1, p + 1] + decoded if n < p + len(gen1)]
        assert st["cached_tokens"] == max(n for n in snaps if n <= common), (st, common, p)
    want = reference.generate(lfm2, ids, 8, dtype="float32")
    assert_varied(want, what="mlx-lm's answer to the follow-up")
    assert generated_tokens(second) == want

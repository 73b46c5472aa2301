"""The second real model, Gemma 3 270M base (built offline from PyPI by model_prep.gemma3_270m), through the
worker process: greedy parity with mlx-lm itself, and the prompt cache past its 512-token sliding window
(the windowed layers wrap, so reuse rests on the snapshots of worker/cache/snapshots.py)."""

import functools
import json
import random

import pytest

from tests.support import reference as ref
from tests.support.client import Worker, generated_tokens
from tests.support.prompts import assert_varied

pytestmark = pytest.mark.real_model

WINDOW = 512
WORDS = ("the river town market bridge winter morning light stone garden old road north harbor boat "
         "quiet evening lamp window letter friend story music field rain summer wall school bread "
         "kitchen table mountain forest path bird song clock tower station train journey map").split()


def passage(seed: int, sentences: int) -> str:
    """Plain, deterministic English-like prose (about 11 tokens a sentence)."""
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randrange(6, 12))]
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


@pytest.fixture(scope="module")
def gemma_dir():
    from model_prep.gemma3_270m import ensure_gemma_model

    return ensure_gemma_model()


@pytest.fixture(scope="module")
def gemma(gemma_dir):
    w = Worker()
    info = w.load(gemma_dir)
    assert info["compute_dtype"] == "float32" and info["stored_dtype"] == "bfloat16", info
    yield w
    w.close()


@pytest.fixture(scope="module")
def mlx_lm_ref(gemma):
    """tests/support/reference.py's mlx-lm runs, in a child process with the worker's own BLAS: thousands of
    prompt tokens need the fast BLAS the worker re-executed itself with, which this test process lacks (MLX's
    reference BLAS prefills ~10 tok/s). Without one (no OpenBLAS, or no /proc) they run here."""
    child = ref.InChild(gemma.proc.pid)
    yield child
    child.close()


@pytest.fixture(scope="module")
def cold(mlx_lm_ref, gemma_dir):
    """Greedy tokens of a cold mlx-lm run (fresh cache, float32), EOS left out."""
    return lambda ids, n: mlx_lm_ref.generate(gemma_dir, ids, n, dtype="float32")


@functools.lru_cache(maxsize=1)
def _tokenizer(gemma_dir):
    """mlx-lm's tokenizer, as ``mlx_lm.load`` makes it (without loading the weights here)."""
    from mlx_lm.utils import load_tokenizer

    eos = json.loads((gemma_dir / "config.json").read_text())["eos_token_id"]
    return load_tokenizer(gemma_dir, eos_token_ids=eos)


def _chat_ids(gemma_dir, messages):
    return list(_tokenizer(gemma_dir).apply_chat_template(messages, add_generation_prompt=True))


def _common(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _entry(ids, stats, done, tokens, inherited=()):
    """The cache entry a request leaves (PROTOCOL.md, The prompt cache): its prompt and every sampled token
    (an EOS too), with snapshots where its cached part ended, at its prompt's last token, after its first
    generated token and every 4 generated tokens (the newest two), plus those of the entry it resumed that lie
    within its cached part; only those before the entry's end are kept."""
    sampled = tokens + ([done["stop_token"]] if done.get("stop_token") is not None else [])
    cached, p, end = stats["cached_tokens"], len(ids), len(ids) + len(sampled)
    decoded = [p + k for k in range(4, len(sampled) + 1, 4)][-2:]
    own = ([cached] if cached else []) + [p - 1, p + 1] + decoded
    return ids + sampled, sorted({n for n in [*(n for n in inherited if n <= cached), *own] if n < end})


def _served(entry, ids):
    """What an entry serves a prompt: all of it when the prompt extends it; else, while the window has not
    wrapped, the common prefix; past it, the longest snapshot within the common prefix (all but the prompt's
    last token at most, in every case)."""
    tokens, snapshots = entry
    reuse = min(_common(tokens, ids), len(ids) - 1)
    if reuse == len(tokens) or len(tokens) < WINDOW:
        return reuse
    return max((n for n in snapshots if n <= reuse), default=0)


def _generate(w, rid, prompt, max_tokens):
    events = w.request({"type": "generate", "id": rid, "prompt": prompt,
                        "params": {"max_tokens": max_tokens}}, timeout=300)
    assert events[-1]["type"] == "done", events[-1]
    stats = next(e for e in events if e["type"] == "stats")
    return generated_tokens(events), stats, events[-1]


def test_greedy_parity_with_mlx_lm(gemma, gemma_dir, mlx_lm_ref):
    gemma.request({"type": "cache_clear", "id": "cc-parity"})
    text = "The Eiffel Tower is located in the city of"
    tokens, stats, done = _generate(gemma, "text", {"text": text}, 16)
    expected, expected_text = mlx_lm_ref.stream_generate(gemma_dir, text, 16, dtype="float32")
    assert stats["prompt_tokens"] == len(_tokenizer(gemma_dir).encode(text))  # BOS included
    assert tokens == expected and done["text"] == expected_text
    assert "Paris" in done["text"]

    chat = [{"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "What is the tallest mountain in the world?"}]
    ids = _chat_ids(gemma_dir, chat)
    # Gemma's template: <bos>, the system prompt folded into the first user turn, the model turn opened.
    assert _tokenizer(gemma_dir).decode(ids) == (
        "<bos><start_of_turn>user\nYou answer in one short sentence.\n\n"
        "What is the tallest mountain in the world?<end_of_turn>\n<start_of_turn>model\n")
    tokens, stats, done = _generate(gemma, "chat", {"messages": chat}, 16)
    expected, expected_text = mlx_lm_ref.stream_generate(gemma_dir, ids, 16, dtype="float32")
    assert stats["prompt_tokens"] == len(ids)
    assert tokens == expected and done["text"] == expected_text


def test_long_conversation_reuses_each_turn(gemma, gemma_dir, cold):
    """Three turns of ~700 new tokens each (more than the window), ~2,150 tokens at the end (over four windows):
    each follow-up is served from the cache but for its new message (the second through snapshots the first
    follow-up inherited), and answers as a cold mlx-lm run of the whole prompt does."""
    w = gemma
    w.request({"type": "cache_clear", "id": "cc-long"})
    messages = [{"role": "user", "content": passage(0, 72)}]
    entry, seen = None, []
    for turn in range(3):
        tokens, stats, done = _generate(w, f"long{turn}", {"messages": messages}, 8)
        ids = _chat_ids(gemma_dir, messages)
        seen.append((stats["prompt_tokens"], stats["cached_tokens"], stats.get("cache_miss_reason")))
        assert stats["prompt_tokens"] == len(ids)
        if entry is not None:  # exactly what the previous turn's entry serves this prompt
            assert stats["cached_tokens"] == _served(entry, ids), (turn, _common(entry[0], ids), entry[1], seen)
            assert stats["cached_tokens"] >= len(entry[0]) - 8, (turn, seen)  # its prompt, at least
        want = cold(ids, 8)
        assert_varied(want, what=f"the cold answer of turn {turn}")
        assert tokens == want, (turn, seen)
        entry = _entry(ids, stats, done, tokens, entry[1] if entry else ())
        messages += [{"role": "assistant", "content": done["text"]},
                     {"role": "user", "content": passage(turn + 1, 72)}]
    print("turns (prompt_tokens, cached_tokens, cache_miss_reason):", seen)
    assert seen[-1][0] > 4 * WINDOW, seen


def test_regenerate_and_edit_past_the_window(gemma, gemma_dir, cold):
    """A first turn longer than the window: its regenerate reuses all of the prompt but the last token,
    and an edited follow-up keeps at least the first turn's prompt."""
    w = gemma
    w.request({"type": "cache_clear", "id": "cc-edit"})
    first = [{"role": "user", "content": passage(7, 70)}]
    answer, st1, done = _generate(w, "first", {"messages": first}, 8)
    assert st1["prompt_tokens"] > WINDOW + 100, st1
    ids1 = _chat_ids(gemma_dir, first)
    again, st2, done2 = _generate(w, "regen", {"messages": first}, 8)
    assert st2["cached_tokens"] == st1["prompt_tokens"] - 1, (st1, st2)
    assert again == answer
    regen = _entry(ids1, st2, done2, again, _entry(ids1, st1, done, answer)[1])

    history = first + [{"role": "assistant", "content": done["text"]}]
    follow = history + [{"role": "user", "content": "Tell me more about the old stone bridge."}]
    ids3 = _chat_ids(gemma_dir, follow)
    tokens3, st3, done3 = _generate(w, "follow", {"messages": follow}, 8)
    assert st3["cached_tokens"] == _served(regen, ids3), (st3, _common(regen[0], ids3), regen[1])
    assert st3["cached_tokens"] >= st1["prompt_tokens"] - 1, (st1, st3)
    edited = history + [{"role": "user", "content": "Tell me more about the harbor boats."}]
    ids4 = _chat_ids(gemma_dir, edited)
    out, st4, _ = _generate(w, "edited", {"messages": edited}, 8)
    print("first, regenerate, follow-up, edited (prompt_tokens, cached_tokens, cache_miss_reason):",
          [(s["prompt_tokens"], s["cached_tokens"], s.get("cache_miss_reason")) for s in (st1, st2, st3, st4)])
    # from the follow-up's entry: where its cached part ended, what the turn it replaces reused
    turn = _entry(ids3, st3, done3, tokens3, regen[1])
    assert st4["cached_tokens"] == _served(turn, ids4) == st3["cached_tokens"], (st3, st4, _common(turn[0], ids4))
    want = cold(ids4, 8)
    assert_varied(want, what="the cold answer to the edited prompt")
    assert out == want

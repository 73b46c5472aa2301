"""Gemma 3 with a small sliding window (64 tokens) and conversations 20x longer, text and vision, through
the real worker: every follow-up reuses the whole previous turn (or, where the template re-renders the answer,
the longest snapshot within what it shares), a regenerate reuses the whole prompt, an edited last message
reuses what the turn it replaces reused, an answer re-rendered without its last tokens resumes from a snapshot
taken while decoding, and the greedy tokens equal a cold run.

Reuse is asserted exactly, computed from the token ids with PROTOCOL.md's rule (The prompt cache): a prompt
that extends an entry reuses all of it (prompt and every generated token); past the window one that diverges
resumes from the entry's longest snapshot within the common prefix, all but the prompt's last token at most. A
request snapshots where its cached part ends, at its prompt's last token, after its first generated token and
every 4 generated tokens (the newest two)."""

import functools
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.support import reference  # noqa: E402
from tests.support.client import generated_tokens  # noqa: E402
from tests.support.continued import continued_ids, streamed  # noqa: E402
from tests.support.prompts import assert_varied, random_ids  # noqa: E402
from tests.support.vlm_fixtures import build_vlm_fixture  # noqa: E402

WINDOW = 64


def _done(events):
    assert events[-1]["type"] == "done", events[-1]
    return generated_tokens(events), next(e for e in events if e["type"] == "stats")


def _common(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _snapshots(cached, prompt, generated):
    """Where a request of ``prompt`` tokens, ``cached`` of them reused, that sampled ``generated`` tokens
    (EOS included) left snapshots its entry keeps (those before the entry's end)."""
    decoded = [prompt + k for k in range(4, generated + 1, 4)][-2:]
    points = ([cached] if cached else []) + [prompt - 1, prompt + 1] + decoded
    return [n for n in points if n < prompt + generated]


def _served(entry, snapshots, ids):
    """What a wrapped (untrimmable) entry serves ``ids``: all of it when ``ids`` extends it, else its longest
    snapshot within the common prefix, all but the prompt's last token at most."""
    common = _common(entry, ids)
    if common == len(entry):
        return common
    return max((n for n in snapshots if n <= min(common, len(ids) - 1)), default=0)


@pytest.fixture(scope="module")
def text_dir(gemma3_w64_dir):
    return gemma3_w64_dir  # (conftest.py: the window is WINDOW)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return build_vlm_fixture("gemma3", tmp_path_factory.mktemp("gemma3-vlm-w64") / "model",
                             text_overrides={"sliding_window": WINDOW, "max_position_embeddings": 8192})


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "a.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_text_conversation_20x_the_window(w, text_dir):
    if True:
        w.load(text_dir)

        def gen(rid, ids, n=8):
            return _done(w.request({"type": "generate", "id": rid, "prompt": {"tokens": ids},
                                    "params": {"max_tokens": n}}))

        ids, previous, reused = random_ids(60, 1), None, []
        for turn in range(20):  # ~1,400 tokens: 20x the window
            out, st = gen(f"c{turn}", ids)
            if previous is not None:  # the whole previous turn, its answer included
                assert st["cached_tokens"] == previous, (turn, st, previous)
            previous, prompt = len(ids) + len(out), ids
            reused.append(st["cached_tokens"])
            ids = ids + out + random_ids(60, 100 + turn)
        assert len(prompt) >= 20 * WINDOW
        want = reference.generate(text_dir, prompt, 8, dtype="float32")
        assert_varied(want, what="mlx-lm's last answer")
        assert out == want

        again, st = gen("regen", prompt)  # regenerate: the whole prompt but its last token
        assert st["cached_tokens"] == len(prompt) - 1, st
        assert again == out
        edited = prompt[:-30] + random_ids(30, 7)  # the last user message edited
        assert edited[-30] != prompt[-30]
        ed, st = gen("edit", edited)
        # the snapshot where the last turn's cached part ended: the end of the previous turn's answer
        assert st["cached_tokens"] == reused[-1] == len(prompt) - 60, (st, reused[-1])
        want = reference.generate(text_dir, edited, 8, dtype="float32")
        assert_varied(want, what="mlx-lm's answer to the edited prompt")
        assert ed == want

        # the answer re-rendered without its last 2 tokens (a trimmed newline, a stop string cut off):
        # resumed from a snapshot taken while decoding, not from the end of the prompt
        long_answer, st = gen("long", prompt, n=20)
        assert len(long_answer) == 20 and st["cached_tokens"] == len(prompt) - 1, st
        follow = prompt + long_answer[:-2] + random_ids(20, 8)
        out, st = gen("trimmed", follow)
        entry = prompt + long_answer
        assert _common(entry, follow) < len(entry)
        snaps = _snapshots(len(prompt) - 1, len(prompt), 20)
        assert snaps[-1] == len(prompt) + 16, snaps  # the newest before the end: 2 tokens before the cut
        assert st["cached_tokens"] == _served(entry, snaps, follow) == len(prompt) + 16, st
        want = reference.generate(text_dir, follow, 8, dtype="float32")
        assert_varied(want, what="mlx-lm's answer to the trimmed follow-up")
        assert out == want


def _user(text, image=None):
    if image is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image", "path": image}, {"type": "text", "text": text}]}


def _words(n, seed):
    rng = random.Random(seed)
    return " ".join(rng.choice(["red", "blue", "cat", "tree", "sky", "house", "water", "stone"]) for _ in range(n))


@functools.lru_cache(maxsize=1)
def _vlm(path):
    from mlx_vlm import load

    return load(str(path))


def _vision_ids(path, messages):
    """The prompt ids of mlx-vlm's processor for a conversation: the fixture's template (it writes no BOS),
    the image's placeholder expanded."""
    from mlx_vlm.utils import load_image, prepare_inputs

    model, proc = _vlm(path)
    images, conv = [], []
    for m in messages:
        if isinstance(m["content"], str):
            conv.append(m)
            continue
        content = []
        for part in m["content"]:
            if part["type"] == "image":
                images.append(load_image(part["path"]))
                content.append({"type": "image"})
            else:
                content.append(part)
        conv.append({"role": m["role"], "content": content})
    text = proc.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    inp = prepare_inputs(proc, images=images, prompts=text, image_token_index=model.config.image_token_index,
                         add_special_tokens=False)
    ids = inp["input_ids"].reshape(-1).tolist()
    # the text those ids are of: Gemma 3's processor writes each image as its full image sequence
    expanded = text.replace(proc.boi_token, proc.full_image_sequence)
    assert proc.tokenizer.encode(expanded, add_special_tokens=False) == ids
    return ids, expanded


TURNS = 13  # a conversation 20x the window (the worker's own ids are fewer than a fresh tokenization's)


def test_vision_conversation_20x_the_window(w, vlm_dir, image):
    """Sent as messages, the way chat apps send them; the fixture's random answers do not survive the
    template's re-rendering, so each follow-up resumes from a snapshot of the previous turn."""
    w.load(vlm_dir)

    tok = _vlm(vlm_dir)[1].tokenizer
    detokenize = streamed(vlm_dir)
    said = {}  # the last turn's prompt text, its ids and what it sampled: the follow-up reuses them (continued.py)
    own = [0]  # turns whose ids hold the model's own where a fresh tokenization differs

    def chat(rid, messages, after=None):
        events = w.request({"type": "generate", "id": rid, "prompt": {"messages": messages},
                            "params": {"max_tokens": 8}})
        out, st = _done(events)
        fresh, text = _vision_ids(vlm_dir, messages)
        last = said.get(after)
        ids = continued_ids(tok, *last, text, detokenize) if last else fresh
        own[0] += ids != fresh
        assert st["prompt_tokens"] == len(ids), (rid, st, len(ids))
        stop = [events[-1]["stop_token"]] if events[-1].get("stop_token") is not None else []
        said[rid] = (text, ids, out + stop)
        return out, st, "".join(e["text"] for e in events if e["type"] == "token"), ids, out + stop

    msgs, prev, prompts, reused = [_user(_words(40, 0), image)], None, [], []
    for turn in range(TURNS):
        out, st, text, ids, sampled = chat(f"v{turn}", msgs, after=f"v{turn - 1}")
        if prev is not None:  # from the longest snapshot of the previous turn within what it shares
            entry, snaps = prev
            assert st["cached_tokens"] == _served(entry, snaps, ids), (turn, st, _common(entry, ids), snaps)
            assert st["cached_tokens"] >= len(entry) - len(sampled_prev) - 1, (turn, st)
        prev = ids + sampled, _snapshots(st["cached_tokens"], len(ids), len(sampled))
        sampled_prev = sampled
        prompts.append(len(ids))
        reused.append(st["cached_tokens"])
        msgs = msgs + [{"role": "assistant", "content": text}, _user(_words(20, 10 + turn))]
    assert prompts[-1] >= 20 * WINDOW, prompts
    assert own[0] >= 3, own  # the model's own ids were reused where re-tokenizing differs
    last = msgs[:-2]
    regen, st, _, ids, _ = chat("vregen", last, after=f"v{TURNS - 2}")  # the same conversation once more
    assert st["cached_tokens"] == prompts[-1] - 1, st
    assert regen == out
    edited = last[:-1] + [_user(_words(20, 99))]
    ed, st, _, ids, _ = chat("vedit", edited, after=f"v{TURNS - 2}")
    # the snapshot where the last turn's cached part ended: the previous turn, up to where its answer parted
    assert reused[-1] <= _common(prev[0], ids) < prompts[-1] - 1, (reused, _common(prev[0], ids))
    assert st["cached_tokens"] == reused[-1], (st, reused)
    assert w.request({"type": "cache_clear", "id": "cc"})[-1]["type"] == "done"
    # a cold run of the same ids (the cache is exact for what it reused): the worker remembers the ids it gave
    # the conversation (not the cache), so the same messages get them again
    cold, st, _, cold_ids, _ = chat("vcold", edited, after=f"v{TURNS - 2}")
    assert cold_ids == ids and st["cached_tokens"] == 0 and cold == ed


@pytest.mark.parametrize("concurrent", [1, 2], ids=["alone", "batched"])
def test_a_shared_system_prompt_past_the_window_is_reused(w, vlm_dir, concurrent):
    """A second conversation with the same system prompt (longer than the window) resumes where the system
    messages end: the first conversation's prefill snapshotted its bounded layers there (mlx-lm's server
    checkpoints the same place). Without that snapshot the wrapped entry serves nothing."""
    w.load(vlm_dir, max_concurrent=concurrent)
    tok = _vlm(vlm_dir)[1].tokenizer
    system = {"role": "system", "content": _words(120, 5)}

    def ask(rid, question):
        msgs = [system, _user(question)]
        events = w.request({"type": "generate", "id": rid, "prompt": {"messages": msgs}, "params": {"max_tokens": 4}})
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return _done(events) + (tok.encode(text, add_special_tokens=False),)

    _, st, first = ask("sys-a", _words(30, 6))
    assert st.get("batching") == ("on" if concurrent > 1 else None), st
    assert st["cached_tokens"] == 0 and len(first) > 2 * WINDOW
    head = tok.apply_chat_template([system, {"role": "user", "content": ""}], tokenize=False)
    text = tok.apply_chat_template([system, _user(_words(30, 7))], tokenize=False, add_generation_prompt=True)
    n = 0
    while text[n] == head[n]:
        n += 1
    boundary = len(tok.encode(text[:n], add_special_tokens=False))
    out, st, second = ask("sys-b", _words(30, 7))
    assert second[:boundary] == first[:boundary] and second[boundary] != first[boundary]
    assert boundary > 2 * WINDOW and st["cached_tokens"] == boundary, (st, boundary)
    want = reference.generate(vlm_dir, second, 4, dtype="float32")
    assert out == want


@pytest.fixture(scope="module")
def vlm_w200_dir(tmp_path_factory):
    """A 200-token window: a one-image first turn (~180 tokens) fits it, so its entry can be cut back; the
    second turn wraps it."""
    return build_vlm_fixture("gemma3", tmp_path_factory.mktemp("gemma3-vlm-w200") / "model",
                             text_overrides={"sliding_window": 200, "max_position_embeddings": 8192})


def test_another_image_in_a_cached_conversation_diverges_at_the_image(w, vlm_w200_dir, tmp_path):
    """Issue #29 item 2: image A turn 1, image B turn 1, A turn 1 again, A turn 2, then A's turn 2 with image C
    in A's place. Every entry shares the prompt up to the image; the newest (A turn 2) has wrapped its window
    and holds no snapshot there, the older ones can be cut back: C resumes from one of them, at the image's
    first token (mlx-vlm's processor ids), not from nothing (`untrimmable`)."""
    import numpy as np
    from PIL import Image

    images = {}
    for name, seed in (("A", 11), ("B", 12), ("C", 13)):
        images[name] = str(tmp_path / f"{name}.png")
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(images[name])
    w.load(vlm_w200_dir)
    first = _words(40, 0)

    def chat(rid, messages):
        events = w.request({"type": "generate", "id": rid, "prompt": {"messages": messages},
                            "params": {"max_tokens": 8}})
        return _done(events)[1], "".join(e["text"] for e in events if e["type"] == "token")

    st, _ = chat("a1", [_user(first, images["A"])])
    assert st["prompt_tokens"] + st["generated_tokens"] < 200, st  # fits the window: can be cut back
    chat("b1", [_user(first, images["B"])])
    _, answer = chat("a1-again", [_user(first, images["A"])])

    def turn2(image):
        return [_user(first, images[image]), {"role": "assistant", "content": answer}, _user(_words(20, 1))]

    st, _ = chat("a2", turn2("A"))
    assert st["cached_tokens"] > 0 and st["prompt_tokens"] > 200, st  # its entry wraps the window
    ids = _vision_ids(vlm_w200_dir, turn2("C"))[0]
    at = ids.index(_vlm(vlm_w200_dir)[0].config.image_token_index)  # the image's first token
    st, _ = chat("c2", turn2("C"))  # (its answer's ids may be the model's own: continued.py; the image comes first)
    assert st["cache_miss_reason"] == f"prefix_diverged_at {at}" and st["cached_tokens"] == at > 0, (st, at)

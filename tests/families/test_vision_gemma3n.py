"""Gemma 3n images through the real worker (patched to the tiny tower), against mlx-vlm's generate.

The reference is mlx-vlm's stream_generate with its text-embedding scale fixed (see
tests/support/vlm_fixtures_gemma3n.patch_mlx_vlm, as worker/patches/gemma3n_text_scale.py scales the
worker's); tests/unit/test_patches.py pins why.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.support import reference  # noqa: E402
from tests.support.client import Worker, generated_tokens  # noqa: E402
from tests.process.test_vision import QUESTION, chat, images, root, stats, user  # noqa: E402,F401
from tests.support.continued import continued_ids, streamed  # noqa: E402
from tests.support.vision_checks import Reference, check_kv_bits_follow_up, distinct  # noqa: E402
from tests.support.vlm_fixtures_gemma3n import (  # noqa: E402
    gemma3n_fixture_dir, vlm_generate, worker_cmd,
)

MAX = 8


@pytest.fixture(scope="module")
def worker():
    w = Worker(cmd=worker_cmd())
    yield w
    w.close()


@pytest.fixture(scope="module")
def path(root):
    return gemma3n_fixture_dir(root)


def ref_msgs(n_images, question=QUESTION):
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": question}]}]


def image_positions(path, paths):
    from mlx_vlm.utils import load_image, prepare_inputs

    from tests.support.vlm_fixtures_gemma3n import _LOADED

    vlm_generate(path, ref_msgs(0), max_tokens=1)  # loads it
    model, proc = _LOADED[str(path)]
    prompt = proc.tokenizer.apply_chat_template(ref_msgs(len(paths)), tokenize=False, add_generation_prompt=True)
    inp = prepare_inputs(proc, images=[load_image(p) for p in paths], prompts=prompt, add_special_tokens=False)
    return [i for i, t in enumerate(inp["input_ids"].reshape(-1).tolist()) if t == model.config.image_token_id]


def test_gemma3n_parity_and_cache(worker, path, images):
    info = worker.load(path)
    assert info["vision"] is True and info["audio"] is True

    one = generated_tokens(chat(worker, "g3n-1", [user([images["a"]])], MAX))
    assert one == vlm_generate(path, ref_msgs(1), [images["a"]], max_tokens=MAX)
    assert len(set(one)) >= 3, one
    two = generated_tokens(chat(worker, "g3n-2", [user([images["a"], images["b"]])], MAX))
    assert two == vlm_generate(path, ref_msgs(2), [images["a"], images["b"]], max_tokens=MAX)
    assert len(set(two)) >= 3 and two != one
    other = generated_tokens(chat(worker, "g3n-c", [user([images["c"]])], MAX))
    assert other != one

    text_msgs = [{"role": "user", "content": QUESTION}]
    text = generated_tokens(chat(worker, "g3n-t", text_msgs, MAX))
    assert text == reference.generate(path, reference.chat_ids(path, text_msgs), MAX)
    assert text == vlm_generate(path, text_msgs, max_tokens=MAX)
    assert len(set(text)) >= 3

    first = chat(worker, "g3n-f1", [user([images["a"]])], MAX)
    answer = "".join(e["text"] for e in first if e["type"] == "token")
    follow = [user([images["a"]]), {"role": "assistant", "content": answer},
              {"role": "user", "content": "Tell me more."}]
    warm = chat(worker, "g3n-f2", follow, MAX)
    assert stats(warm)["cached_tokens"] > image_positions(path, [images["a"]])[-1]
    ref_follow = [ref_msgs(1)[0], {"role": "assistant", "content": answer},
                  {"role": "user", "content": "Tell me more."}]
    # the follow-up holds the model's own ids for the answer it continues (PROTOCOL.md, The prompt cache):
    # mlx-vlm (patched) given those ids
    ref = Reference(path, info["prefill_step_size"], load=_patched_vlm)
    ids1 = ref.ids(ref_msgs(1), [images["a"]])
    text1 = ref.text
    ref.ids(ref_follow, [images["a"]])
    said = generated_tokens(first) + ([first[-1]["stop_token"]] if first[-1].get("stop_token") is not None else [])
    ids2 = continued_ids(ref.proc.tokenizer, text1, ids1, said, ref.text, streamed(path))
    assert stats(warm)["prompt_tokens"] == len(ids2)
    assert generated_tokens(warm) == distinct(ref.generate(ref_follow, [images["a"]], MAX, ids=ids2)[0])
    assert worker.request({"type": "cache_clear", "id": "g3n-cc"})[-1]["type"] == "done"
    cold = chat(worker, "g3n-f3", follow, MAX)
    assert stats(cold)["cached_tokens"] == 0
    assert generated_tokens(cold) == generated_tokens(warm)

    changed = [user([images["c"]])] + follow[1:]
    ch = chat(worker, "g3n-f4", changed, MAX)
    assert stats(ch)["cached_tokens"] <= image_positions(path, [images["c"]])[0]
    worker.request({"type": "cache_clear", "id": "g3n-cc2"})
    assert generated_tokens(chat(worker, "g3n-f5", changed, MAX)) == generated_tokens(ch)


def _patched_vlm(path):
    """mlx-vlm with its Gemma 3n text embeddings scaled (``patch_mlx_vlm``), loaded once."""
    vlm_generate(path, ref_msgs(0), max_tokens=1)  # loads it
    from tests.support.vlm_fixtures_gemma3n import _LOADED

    return _LOADED[str(path)]


def test_gemma3n_kv_bits_follow_up(worker, path, images):
    """kv_bits against the (patched) mlx-vlm quantizing its cache as the worker does: the first turn, a warm
    follow-up continuing the quantized cache, the same follow-up cold, and the entry's bytes in `status`
    (tests/vision_checks.check_kv_bits_follow_up). Gemma 3n's per-layer inputs come from the ids, its
    embeddings from the merged images: the reference feeds both, as mlx-vlm's generate_step does."""
    check_kv_bits_follow_up(worker, path, images, "g3n", MAX, load=_patched_vlm)


def test_gemma3n_batch_matches_alone(path, root, images):
    """Concurrent image, audio and text requests in one batch give the tokens each gives alone."""
    from tests.support.vlm_fixtures_gemma3n import wav_bytes

    clip = root / "batch.wav"
    clip.write_bytes(wav_bytes(1.0, 523.0, seed=4))
    w = Worker(cmd=worker_cmd())
    try:
        w.load(path, max_concurrent=4)
        reqs = {"b-img-a": [user([images["a"]])], "b-img-b": [user([images["b"]])],
                "b-audio": [{"role": "user", "content": [{"type": "audio", "path": str(clip)},
                                                         {"type": "text", "text": QUESTION}]}],
                "b-text": [{"role": "user", "content": QUESTION}]}
        alone = {rid: generated_tokens(chat(w, rid + "-alone", m, MAX)) for rid, m in reqs.items()}
        w.request({"type": "cache_clear", "id": "cc"})
        for rid, m in reqs.items():
            w.send({"type": "generate", "id": rid, "prompt": {"messages": m}, "params": {"max_tokens": MAX}})
        got = {rid: w.collect(rid) for rid in reqs}
        assert {rid: generated_tokens(evs) for rid, evs in got.items()} == alone
        assert max(stats(evs).get("concurrent", 1) for evs in got.values()) >= 2
    finally:
        w.close()


def test_gemma3n_speculative_text_turn(path, images):
    """The model as its own draft: a text turn speculates and gives the plain tokens; an image turn runs
    without the draft and says why."""
    w = Worker(cmd=worker_cmd())
    try:
        w.load(path, draft_model_path=str(path))
        text_msgs = [{"role": "user", "content": QUESTION}]
        spec = chat(w, "s1", text_msgs, MAX)
        assert stats(spec)["speculative"] == "on" and stats(spec)["draft_tokens_accepted"] > 0
        assert generated_tokens(spec) == reference.generate(path, reference.chat_ids(path, text_msgs), MAX)
        img = chat(w, "s2", [user([images["a"]])], MAX)
        assert stats(img)["speculative"].startswith("off")
        assert generated_tokens(img) == vlm_generate(path, ref_msgs(1), [images["a"]], max_tokens=MAX)
    finally:
        w.close()

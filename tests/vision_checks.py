"""Checks every vision family's tests run through the real worker, against mlx-vlm's own generate
(tests/test_vision.py's, for checkpoints built elsewhere): parity and the prompt cache, the ids of images
processed alone, kv_bits on a follow-up, a speculative text turn, and a batch."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.client import Worker, generated_tokens  # noqa: E402
from tests.test_batching import _compare, _ids, _stats, run_all  # noqa: E402
from tests.test_vision import (QUESTION, _first_image_token, _last_image_token, _vlm, chat, stats,  # noqa: E402
                               user, vlm_generate)


def distinct(tokens, at_least=4):
    """A random tiny model can collapse into one repeated token: compared outputs must not."""
    assert len(set(tokens)) >= at_least, tokens
    return tokens


def follow_up(worker, tag, image):
    first = chat(worker, f"{tag}-f1", [user([image])])
    answer = "".join(e["text"] for e in first if e["type"] == "token")
    return [user([image]), {"role": "assistant", "content": answer}, {"role": "user", "content": "Tell me more."}]


def check_parity_and_cache(worker, path, images, tag, text_reference):
    """tests/test_vision.py's test_family_parity_and_cache for a checkpoint built elsewhere;
    ``text_reference(messages)``: mlx-lm's greedy tokens for a text-only chat."""
    info = worker.load(path)
    assert info["vision"] is True and not info.get("warnings")
    one = distinct(generated_tokens(chat(worker, f"{tag}-1", [user([images["a"]])])))
    assert one == vlm_generate(path, [images["a"]])
    two = distinct(generated_tokens(chat(worker, f"{tag}-2", [user([images["a"], images["b"]])])))
    assert two == vlm_generate(path, [images["a"], images["b"]])
    other = generated_tokens(chat(worker, f"{tag}-c", [user([images["c"]])]))
    assert other != one and other == vlm_generate(path, [images["c"]])
    text_msgs = [{"role": "user", "content": QUESTION}]
    text = distinct(generated_tokens(chat(worker, f"{tag}-t", text_msgs)))
    assert text == vlm_generate(path, [])
    assert text == text_reference(text_msgs)

    follow = follow_up(worker, tag, images["a"])
    warm = chat(worker, f"{tag}-f2", follow)
    assert stats(warm)["cached_tokens"] > _last_image_token(path, [images["a"]])
    assert worker.request({"type": "cache_clear", "id": f"{tag}-cc"})[-1]["type"] == "done"
    cold = chat(worker, f"{tag}-f3", follow)
    assert stats(cold)["cached_tokens"] == 0
    assert distinct(generated_tokens(cold)) == generated_tokens(warm)

    changed = [user([images["c"]])] + follow[1:]
    ch = chat(worker, f"{tag}-f4", changed)
    assert stats(ch)["cached_tokens"] <= _first_image_token(path, [images["c"]])
    worker.request({"type": "cache_clear", "id": f"{tag}-cc2"})
    assert generated_tokens(chat(worker, f"{tag}-f5", changed)) == generated_tokens(ch)


def check_ids_match_processor(path, images):
    """In-process: two images, each processed alone, give the ids (tile markers and all) and the
    embeddings of mlx-vlm's processor and model over the whole prompt."""
    import mlx.core as mx
    import msgspec
    from mlx_vlm.utils import load_image, prepare_inputs

    from worker.model import load
    from worker.prompt import build_prompt
    from worker.protocol import Generate, LoadOptions

    kit = load(str(path), LoadOptions(), lambda f: None)
    addon = kit.addon
    req = msgspec.convert({"type": "generate", "id": "g", "prompt": {"messages": [user([images["a"], images["b"]])]}},
                          Generate)
    plan = build_prompt(kit, req)
    text = kit.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]}],
        tokenize=False, add_generation_prompt=True)
    ref = prepare_inputs(addon.processor, images=[load_image(images["a"]), load_image(images["b"])], prompts=text,
                         image_token_index=addon.image_token_id, add_special_tokens=False)
    assert plan.ids == ref["input_ids"].reshape(-1).tolist()
    extra = {k: ref[k] for k in ("spatial_shapes", "pixel_attention_mask") if k in ref}
    merged = _vlm(str(path))[0].get_input_embeddings(ref["input_ids"], ref["pixel_values"], **extra)
    assert mx.abs(merged.inputs_embeds[0] - plan.embed(0)).max().item() == 0.0


def check_kv_bits_follow_up(path, images, tag):
    """kv_bits: a follow-up on the same image reuses the (quantized) cache and equals a cold run."""
    w = Worker()
    try:
        w.load(path, kv_bits=8, kv_group_size=32)
        follow = follow_up(w, tag, images["a"])
        warm = chat(w, f"{tag}-q2", follow)
        assert stats(warm)["cached_tokens"] > _last_image_token(path, [images["a"]])
        w.request({"type": "cache_clear", "id": f"{tag}-qcc"})
        assert distinct(generated_tokens(chat(w, f"{tag}-q3", follow))) == generated_tokens(warm)
    finally:
        w.close()


def speculative_text_turn(path, images, tag):
    """The model as its own draft: a text turn (and an image turn, which never speculates); returns
    the text turn's stats["speculative"] after checking both give the tokens they give without it."""
    w = Worker()
    try:
        w.request({"type": "load", "id": "l", "model_path": str(path), "options": {"draft_model_path": str(path)}})
        msgs = [{"role": "user", "content": QUESTION}]
        spec = chat(w, f"{tag}-s1", msgs)
        assert generated_tokens(spec) == vlm_generate(path, [])
        image = chat(w, f"{tag}-s2", [user([images["a"]])])
        assert stats(image)["speculative"] == "off: images or audio"
        assert generated_tokens(image) == vlm_generate(path, [images["a"]])
        return stats(spec)["speculative"]
    finally:
        w.close()


def check_batch(path, images):
    """Image requests (1 and 2 images) decoded beside text requests give the tokens they give alone."""
    msg = [{"role": "user", "content": [{"type": "image", "path": images["a"]}, {"type": "text", "text": QUESTION}]}]
    two = [{"role": "user", "content": [{"type": "image", "path": images["b"]}, {"type": "image", "path": images["c"]},
                                        {"type": "text", "text": "Compare them."}]}]
    reqs = [{"id": "image", "prompt": {"messages": msg}, "params": {"max_tokens": 12}},
            {"id": "two", "prompt": {"messages": two}, "params": {"max_tokens": 10}},
            {"id": "text", "prompt": {"messages": [{"role": "user", "content": "Tell me a story."}]},
             "params": {"max_tokens": 16}},
            {"id": "tokens", "prompt": {"tokens": _ids(30, 6)}, "params": {"max_tokens": 20}}]
    alone, _ = run_all(path, reqs, 1)
    together, _ = run_all(path, reqs, 8)
    _compare(alone, together, cancelled=None)
    assert distinct(generated_tokens(together["two"])) == vlm_generate(path, [images["b"], images["c"]],
                                                                        "Compare them.", 10)
    assert min(_stats(together[r["id"]])["concurrent"] for r in reqs) >= 2

"""The Gemma 4 vision add-on through the real worker process, against mlx-vlm's own generate.

Two fixture layouts (tests/support/vlm_fixtures_gemma4.py): "e2b" (per-layer inputs, KV-shared layers) and "moe"
(26B-A4B-like: experts, K=V full layers, image tokens attending both ways), each with a 512-token window
and with a 32-token one (image prompts then wrap the rotating layers). Also: kv_bits on a follow-up,
speculative decoding on a text turn, and a batch of concurrent image and text requests giving the
tokens they give alone.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.support import reference  # noqa: E402
from tests.support.client import Worker, generated_tokens  # noqa: E402
from tests.support.prompts import random_ids  # noqa: E402
from tests.process.test_batching import _compare, _stats, run_all  # noqa: E402
from tests.process.test_vision import (QUESTION, _first_image_token, _last_image_token, chat,  # noqa: E402
                               images, root, stats, user, vlm_generate, worker)  # noqa: F401 (fixtures)
from tests.support.vision_checks import KV, Reference, check_kv_bits_follow_up  # noqa: E402
from tests.support.vlm_fixtures_gemma4 import gemma4_fixture_dir  # noqa: E402

MAX = 12


def _nontrivial(tokens):
    assert len(set(tokens)) >= 4, tokens  # a collapsed random model would compare nothing
    return tokens


def _follow_up(worker, tag, images, first_image="a", max_tokens=MAX):
    first = chat(worker, f"{tag}-f1", [user([images[first_image]])], max_tokens)
    answer = "".join(e["text"] for e in first if e["type"] == "token")
    return [user([images[first_image]]), {"role": "assistant", "content": answer},
            {"role": "user", "content": "Tell me more."}]


def _cold(worker, tag, messages, max_tokens=MAX):
    assert worker.request({"type": "cache_clear", "id": f"{tag}-cc"})[-1]["type"] == "done"
    cold = chat(worker, tag, messages, max_tokens)
    assert stats(cold)["cached_tokens"] == 0
    return generated_tokens(cold)


LAYOUTS = [("e2b", 512), ("e2b", 32), ("moe", 512), ("moe", 32)]


@pytest.mark.parametrize("variant,window", LAYOUTS)
def test_parity_and_cache(worker, root, images, variant, window):
    path = gemma4_fixture_dir(root, window=window, variant=variant)
    info = worker.load(path)
    assert info["vision"] is True
    tag = f"g4{variant}w{window}"

    one = _nontrivial(generated_tokens(chat(worker, f"{tag}-1", [user([images["a"]])], MAX)))
    assert one == vlm_generate(path, [images["a"]], max_tokens=MAX)
    two = _nontrivial(generated_tokens(chat(worker, f"{tag}-2", [user([images["a"], images["b"]])], MAX)))
    assert two == vlm_generate(path, [images["a"], images["b"]], max_tokens=MAX)
    other = generated_tokens(chat(worker, f"{tag}-c", [user([images["c"]])], MAX))
    assert other != one  # the image reaches the model
    text_msgs = [{"role": "user", "content": QUESTION}]
    text = _nontrivial(generated_tokens(chat(worker, f"{tag}-t", text_msgs, MAX)))
    assert text == vlm_generate(path, [], max_tokens=MAX)
    assert text == reference.generate(path, reference.chat_ids(path, text_msgs), MAX)

    # a follow-up on the same image: served from the cache past the image, identical to a cold run
    follow = _follow_up(worker, tag, images)
    warm = chat(worker, f"{tag}-f2", follow, MAX)
    assert stats(warm)["cached_tokens"] > _last_image_token(path, [images["a"]])
    assert _cold(worker, f"{tag}-f3", follow) == _nontrivial(generated_tokens(warm))

    # a changed image (same size) is a miss at the image, not a stale hit
    changed = [user([images["c"]])] + follow[1:]
    ch = chat(worker, f"{tag}-f4", changed, MAX)
    assert stats(ch)["cached_tokens"] <= _first_image_token(path, [images["c"]])
    assert _cold(worker, f"{tag}-f5", changed) == generated_tokens(ch)


@pytest.mark.parametrize("variant", ["e2b", "moe"])
def test_kv_bits_follow_up(worker, root, images, variant):
    """kv_bits quantizes the full-attention layers (the sliding ones stay exact; the KV-shared ones read
    them quantized), against mlx-vlm quantizing its cache as the worker does: the first turn, a warm
    follow-up continuing the quantized cache, the same follow-up cold, and the entry's bytes in `status`
    (tests/vision_checks.check_kv_bits_follow_up)."""
    check_kv_bits_follow_up(worker, gemma4_fixture_dir(root, variant=variant), images, f"g4{variant}", MAX)


def test_mlx_vlm_gemma4_gaps_the_reference_fills(root):
    """Two mlx-vlm 0.7.10 Gemma 4 gaps that tests/vision_checks.Reference fills; when this fails, upstream
    has changed: drop the matching fix there. (1) Its KV-shared layers run the float attention kernel on
    their source layer's quantized K/V and fail. (2) A prompt suffix fed on a cache gets the per-layer inputs
    of the wrong positions (sliced at the cache offset), so a resumed prompt differs from the same prompt cold."""
    path = gemma4_fixture_dir(root)
    msgs = [{"role": "user", "content": QUESTION}]
    quant = Reference(path, 256, **KV)
    quant.fill_shared_kv = False
    with pytest.raises(TypeError, match="scaled_dot_product_attention"):
        quant.generate(msgs, [], 2)
    plain = Reference(path, 256)
    first = plain.generate(msgs, [], MAX)[0]
    follow = msgs + [{"role": "assistant", "content": plain.proc.tokenizer.decode(first)},
                     {"role": "user", "content": "More?"}]
    n = len(plain.ids(msgs, []))
    assert plain.ids(follow, [])[:n] == plain.ids(msgs, [])  # the follow-up continues the first prompt
    cold = plain.generate(follow, [], MAX)[0]
    plain.per_layer_from_ids = False  # mlx-vlm as it is
    assert plain.generate(follow, [], MAX, plain.cache_at(msgs, [], first, n), n)[0] != cold
    plain.per_layer_from_ids = True  # as the reference feeds it
    assert plain.generate(follow, [], MAX, plain.cache_at(msgs, [], first, n), n)[0] == cold


def test_speculative_text_turn(root, images):
    """The model as its own draft: a text turn speculates and gives the plain tokens; an image turn does
    not speculate ("off: images or audio") and still equals mlx-vlm."""
    path = gemma4_fixture_dir(root)
    w = Worker()
    try:
        w.load(path, draft_model_path=str(path))
        text_msgs = [{"role": "user", "content": QUESTION}]
        spec = chat(w, "s1", text_msgs, 24)
        assert stats(spec)["speculative"] == "on", stats(spec)
        ids = reference.chat_ids(path, text_msgs)
        assert generated_tokens(spec) == reference.generate(path, ids, 24)
        assert stats(spec)["draft_tokens_accepted"] > 0
        img = chat(w, "s2", [user([images["a"]])], MAX)
        assert stats(img)["speculative"] == "off: images or audio"
        assert generated_tokens(img) == vlm_generate(path, [images["a"]], max_tokens=MAX)
    finally:
        w.close()


@pytest.mark.parametrize("variant,window", LAYOUTS[1:])
def test_batch_of_images_and_text(root, images, variant, window):
    """Two image questions decoded beside text requests (one cancelled midway) give their solo tokens."""
    path = gemma4_fixture_dir(root, window=window, variant=variant)
    reqs = [
        {"id": "img-a", "prompt": {"messages": [user([images["a"]])]}, "params": {"max_tokens": MAX}},
        {"id": "img-bc", "prompt": {"messages": [user([images["b"], images["c"]])]},
         "params": {"max_tokens": 16}},
        {"id": "text", "prompt": {"messages": [{"role": "user", "content": "Tell me a story."}]},
         "params": {"max_tokens": 16}},
        {"id": "tokens", "prompt": {"tokens": random_ids(40, 6)}, "params": {"max_tokens": 20}},
        {"id": "cancelled", "prompt": {"tokens": random_ids(25, 7)}, "params": {"max_tokens": 400}},
    ]
    alone, _ = run_all(path, reqs, 1)
    together, _ = run_all(path, reqs, 8, cancel="cancelled")
    _compare(alone, together)
    assert _stats(together["img-a"])["concurrent"] >= 2
    assert generated_tokens(alone["img-a"]) == vlm_generate(path, [images["a"]], max_tokens=MAX)


def test_bidirectional_state(root, images):
    """In-process: on the "moe" layout a prompt with images gets the bidirectional state, and inside it
    the logits equal mlx-vlm's (given its token types), whole or prefilled in chunks cut anywhere;
    outside it they are causal (and differ). The "e2b" layout and text prompts get no state."""
    import mlx.core as mx
    import msgspec
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_vlm.utils import load_image, prepare_inputs

    from tests.process.test_vision import _vlm
    from worker.loading.model import load
    from worker.prompting.prompt import build_prompt
    from worker.protocol import Generate, LoadOptions

    def plan_for(kit, msgs):
        return build_prompt(kit, msgspec.convert({"type": "generate", "id": "g", "prompt": {"messages": msgs}},
                                                 Generate))

    pair = [images["a"], images["b"]]
    e2b = load(str(gemma4_fixture_dir(root)), LoadOptions(), lambda f: None)
    assert plan_for(e2b, [user(pair)]).state is None
    path = gemma4_fixture_dir(root, variant="moe")
    kit = load(str(path), LoadOptions(), lambda f: None)
    assert plan_for(kit, [{"role": "user", "content": QUESTION}]).state is None
    plan = plan_for(kit, [user(pair)])
    assert plan.state is not None
    x, e = mx.array(plan.ids)[None], plan.embed(0)[None]

    model, proc = _vlm(str(path))
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]
    text = proc.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                              add_generation_prompt=True)
    inp = prepare_inputs(proc, images=[load_image(p) for p in pair], prompts=text,
                         image_token_index=model.config.image_token_id, add_special_tokens=False)
    assert inp["input_ids"].reshape(-1).tolist() == plan.ids
    emb = model.get_input_embeddings(inp["input_ids"], inp["pixel_values"])
    ref = model.language_model(inp["input_ids"], inputs_embeds=emb.inputs_embeds,
                               mm_token_type_ids=inp["mm_token_type_ids"]).logits
    with plan.state:
        both = kit.model(x, input_embeddings=e)
    causal = kit.model(x, input_embeddings=e)
    assert mx.abs(both - ref).max().item() == 0.0
    assert mx.abs(causal - ref).max().item() > 1e-3
    pos = [i for i, t in enumerate(plan.ids) if t == kit.addon.image_token_id]
    gap = next(i for i in range(pos[0], pos[-1]) if plan.ids[i] != kit.addon.image_token_id)
    # prefilled as the worker does (chunks, then the last token alone), cut before, inside, between and
    # after the images: a cut image waits for the next chunk, so the cache ends as in one pass
    for cut in (pos[0] - 1, pos[0] + 3, gap, pos[-1] - 2, pos[-1] + 1):
        cache = make_prompt_cache(kit.model)
        with plan.state:
            kit.model(x[:, :cut], cache=cache, input_embeddings=e[:, :cut])
            kit.model(x[:, cut:-1], cache=cache, input_embeddings=e[:, cut:-1])
            last = kit.model(x[:, -1:], cache=cache, input_embeddings=e[:, -1:])
        assert cache[0].offset == len(plan.ids)
        assert mx.abs(last[:, -1] - ref[:, -1]).max().item() == 0.0, cut


@pytest.mark.parametrize("variant", ["e2b", "moe"])
def test_small_prefill_steps(root, images, variant):
    """Prefill chunks of 5 tokens cut the images (solo and batched): the tokens stay mlx-vlm's."""
    path = gemma4_fixture_dir(root, window=32, variant=variant)
    w = Worker()
    try:
        w.load(path, prefill_step_size=5)
        for paths in ([images["a"]], [images["a"], images["b"]]):
            got = generated_tokens(chat(w, f"s{len(paths)}", [user(paths)], MAX))
            assert got == vlm_generate(path, paths, max_tokens=MAX)
    finally:
        w.close()
    reqs = [{"id": "two", "prompt": {"messages": [user([images["a"], images["b"]])]}, "params": {"max_tokens": MAX}},
            {"id": "one", "prompt": {"messages": [user([images["c"]])]}, "params": {"max_tokens": 16}},
            {"id": "text", "prompt": {"tokens": random_ids(40, 8)}, "params": {"max_tokens": 20}}]
    together, _ = run_all(path, reqs, 8, prefill_step_size=5)
    assert generated_tokens(together["two"]) == vlm_generate(path, [images["a"], images["b"]], max_tokens=MAX)
    assert generated_tokens(together["one"]) == vlm_generate(path, [images["c"]], max_tokens=16)


def test_memoized_images_and_suffix_embeddings(root, images, monkeypatch):
    """In-process: the prompt's embeddings (images of 16 and 12 soft tokens) equal mlx-vlm's
    ``get_input_embeddings`` over the processor's output for the whole prompt; a follow-up on memoized
    images decodes, processes and encodes nothing, and any suffix gives the same rows."""
    import mlx.core as mx
    import msgspec
    from mlx_vlm.utils import load_image, prepare_inputs

    from tests.process.test_vision import _vlm
    from worker.addons import images as imgs
    from worker.loading.model import load
    from worker.prompting.prompt import build_prompt
    from worker.protocol import Generate, LoadOptions

    path = gemma4_fixture_dir(root)
    kit = load(str(path), LoadOptions(), lambda f: None)
    pair = [images["gif"], images["a"]]
    req = msgspec.convert({"type": "generate", "id": "g", "prompt": {"messages": [user(pair)]}}, Generate)
    first = build_prompt(kit, req)
    full = first.embed(0)
    model, proc = _vlm(str(path))
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]
    text = proc.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                              add_generation_prompt=True)
    inp = prepare_inputs(proc, images=[load_image(p) for p in pair], prompts=text,
                         image_token_index=model.config.image_token_id, add_special_tokens=False)
    assert first.ids == inp["input_ids"].reshape(-1).tolist()
    ref = model.get_input_embeddings(inp["input_ids"], inp["pixel_values"])
    assert mx.abs(ref.inputs_embeds[0] - full).max().item() == 0.0

    calls = []
    monkeypatch.setattr(imgs, "decode", lambda *a, **k: calls.append("decode"))
    monkeypatch.setattr(kit.addon, "encode", lambda *a, **k: calls.append("encode"))
    again = build_prompt(kit, req)
    assert calls == [] and again.ids == first.ids and again.key == first.key
    pos = [i for i, t in enumerate(first.ids) if t == kit.addon.image_token_id]
    assert len(pos) == 16 + 12
    for cut in (1, pos[0], pos[5], pos[16], pos[-1] + 1, len(first.ids) - 1):
        assert mx.abs(again.embed(cut) - full[cut:]).max().item() == 0.0, cut

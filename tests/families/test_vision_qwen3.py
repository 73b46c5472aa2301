"""Qwen3-VL, Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE vision add-ons through the real worker, against mlx-vlm's own
generate (interleaved M-RoPE positions; deepstack features for the Qwen3-VL families)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.support import reference  # noqa: E402
from tests.support.client import Worker, generated_tokens  # noqa: E402
from tests.process.test_batching import _compare, run_all  # noqa: E402
from tests.process.test_vision import (MAX, QUESTION, _first_image_token, _last_image_token, chat,  # noqa: E402
                               images, root, stats, user, vlm_generate, worker)  # noqa: F401 (fixtures)
from tests.support.vision_checks import check_kv_bits_follow_up  # noqa: E402
from tests.support.vlm_fixtures_qwen3 import FAMILIES, qwen3_fixture_dir, to_hf_layout  # noqa: E402


def _distinct(tokens):
    assert len(set(tokens)) >= 3, tokens  # a collapsed random model would prove nothing
    return tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_family_parity_and_cache(worker, root, images, family):
    path = qwen3_fixture_dir(family, root)
    info = worker.load(path)
    assert info["vision"] is True and not info.get("warnings")

    one = generated_tokens(chat(worker, f"{family}-1", [user([images["a"]])]))
    assert _distinct(one) == vlm_generate(path, [images["a"]])
    two = generated_tokens(chat(worker, f"{family}-2", [user([images["a"], images["b"]])]))
    assert _distinct(two) == vlm_generate(path, [images["a"], images["b"]])
    other = generated_tokens(chat(worker, f"{family}-c", [user([images["c"]])]))
    assert other != one
    text_msgs = [{"role": "user", "content": QUESTION}]
    text = generated_tokens(chat(worker, f"{family}-t", text_msgs))
    assert _distinct(text) == reference.generate(path, reference.chat_ids(path, text_msgs), MAX)
    assert text == vlm_generate(path, [])

    first = chat(worker, f"{family}-f1", [user([images["a"]])])
    answer = "".join(e["text"] for e in first if e["type"] == "token")
    follow = [user([images["a"]]), {"role": "assistant", "content": answer},
              {"role": "user", "content": "Tell me more."}]
    warm = chat(worker, f"{family}-f2", follow)
    assert stats(warm)["cached_tokens"] > _last_image_token(path, [images["a"]])
    assert worker.request({"type": "cache_clear", "id": f"{family}-cc"})[-1]["type"] == "done"
    cold = chat(worker, f"{family}-f3", follow)
    assert stats(cold)["cached_tokens"] == 0
    assert _distinct(generated_tokens(cold)) == generated_tokens(warm)

    changed = [user([images["c"]])] + follow[1:]
    ch = chat(worker, f"{family}-f4", changed)
    assert stats(ch)["cached_tokens"] <= _first_image_token(path, [images["c"]])
    worker.request({"type": "cache_clear", "id": f"{family}-cc2"})
    assert generated_tokens(chat(worker, f"{family}-f5", changed)) == generated_tokens(ch)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_is_exact(root, images, family):
    """Chunks of 5 tokens cut through the images: positions and deepstack rows follow the chunk."""
    path = qwen3_fixture_dir(family, root)
    w = Worker()
    try:
        w.load(path, prefill_step_size=5)
        got = generated_tokens(chat(w, "chunked", [user([images["a"], images["b"]])]))
    finally:
        w.close()
    assert got == vlm_generate(path, [images["a"], images["b"]])


def _kit_and_plan(root, images, family, paths, path=None):
    import msgspec

    from worker.loading.model import load
    from worker.prompting.prompt import build_prompt
    from worker.protocol import Generate, LoadOptions

    kit = load(str(path or qwen3_fixture_dir(family, root)), LoadOptions(), lambda f: None)
    req = msgspec.convert({"type": "generate", "id": "g", "prompt": {"messages": [user(paths)]}}, Generate)
    return kit, build_prompt(kit, req)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_mlx_vlm(root, images, family):
    """In-process, two images: the last-token logits equal mlx-vlm's own forward (exactly for the
    Qwen3-VL families; Qwen3.5's gated-delta layers differ in rounding); without the deepstack rows
    they do not."""
    import mlx.core as mx
    from mlx_vlm.utils import load_image, prepare_inputs

    from tests.process.test_vision import _vlm

    paths = [images["a"], images["b"]]
    kit, plan = _kit_and_plan(root, images, family, paths)
    x, e = mx.array(plan.ids)[None], plan.embed(0)[None]
    with plan.state:
        ours = kit.model(x, input_embeddings=e)[0, -1]
    model, proc = _vlm(str(qwen3_fixture_dir(family, root)))
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]
    prompt = proc.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                add_generation_prompt=True)
    inp = prepare_inputs(proc, images=[load_image(p) for p in paths], prompts=prompt,
                         image_token_index=kit.addon.image_token_id, add_special_tokens=False)
    assert inp["input_ids"].reshape(-1).tolist() == plan.ids
    model.language_model._position_ids = model.language_model._rope_deltas = None
    ref = model(inp["input_ids"], inp["pixel_values"], mask=inp["attention_mask"],
                image_grid_thw=inp["image_grid_thw"]).logits[0, -1]
    hybrid = family.startswith("qwen3_5")  # mlx-lm's and mlx-vlm's gated-delta layers round differently
    assert mx.abs(ours - ref).max().item() <= (2e-3 if hybrid else 0.0)  # (text-only they differ by ~3e-3)
    if not hybrid:
        feats, plan.state.feats = plan.state.feats, []
        with plan.state:
            positions_only = kit.model(x, input_embeddings=e)[0, -1]
        plan.state.feats = feats
        assert mx.abs(positions_only - ref).max().item() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_cut_inside_an_image(root, images, family):
    """In-process: a prompt run in two forwards cut inside an image (as a cache holding part of an
    image resumes) gives the logits of one forward over the whole prompt; outside ``with plan.state``
    the model is mlx-lm's own."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    kit, plan = _kit_and_plan(root, images, family, [images["a"]])
    pos = [i for i, t in enumerate(plan.ids) if t == kit.addon.image_token_id]
    x = mx.array(plan.ids)[None]
    plain = kit.model(x, input_embeddings=plan.embed(0)[None])
    with plan.state:
        whole = kit.model(x, input_embeddings=plan.embed(0)[None], cache=make_prompt_cache(kit.model))[:, -1]
        for cut in (pos[0] + 1, pos[len(pos) // 2]):
            cache = make_prompt_cache(kit.model)
            kit.model(x[:, :cut], input_embeddings=plan.embed(0)[None, :cut], cache=cache)
            rest = kit.model(x[:, cut:], input_embeddings=plan.embed(cut)[None], cache=cache)[:, -1]
            assert mx.abs(rest - whole).max().item() < 1e-4, cut
    assert mx.abs(kit.model(x, input_embeddings=plan.embed(0)[None]) - plain).max().item() == 0.0
    assert mx.abs(plain[:, -1] - whole).max().item() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_bits_follow_up(worker, root, images, family):
    """kv_bits against mlx-vlm quantizing its cache as the worker does, with its M-RoPE positions and deepstack
    rows: the first turn, a warm follow-up continuing the quantized cache (Qwen3.5's gated-delta state resumes
    from a snapshot), the same follow-up cold, and the entry's bytes (tests/support/vision_checks.py)."""
    check_kv_bits_follow_up(worker, qwen3_fixture_dir(family, root), images, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_text_turn(root, images, family):
    path = qwen3_fixture_dir(family, root)
    w = Worker()
    try:
        w.load(path, draft_model_path=str(path))
        msgs = [{"role": "user", "content": "Tell me a story."}]
        evs = chat(w, "s", msgs)
        # mlx-lm cannot rewind Qwen3.5's gated-delta state: its drafts are refused (run without the draft)
        want = "off: recurrent state" if family.startswith("qwen3_5") else "on"
        assert stats(evs)["speculative"] == want, stats(evs)
        assert generated_tokens(evs) == reference.generate(path, reference.chat_ids(path, msgs), MAX)
        img = chat(w, "si", [user([images["a"]])])
        assert stats(img)["speculative"] == "off: images or audio"
        assert generated_tokens(img) == vlm_generate(path, [images["a"]])
    finally:
        w.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_image_requests_in_the_batch(root, images, family):
    """Two image requests (their own positions and deepstack rows) and text requests decoded together
    give the tokens they give alone."""
    path = qwen3_fixture_dir(family, root)
    reqs = [
        {"id": "img-a", "prompt": {"messages": [user([images["a"]])]}, "params": {"max_tokens": 12}},
        {"id": "img-bc", "prompt": {"messages": [user([images["b"], images["c"]])]}, "params": {"max_tokens": 10}},
        {"id": "text", "prompt": {"messages": [{"role": "user", "content": "Tell me a story."}]},
         "params": {"max_tokens": 14}},
        {"id": "tokens", "prompt": {"tokens": [5, 9, 33, 71, 102, 7, 250]}, "params": {"max_tokens": 16}},
    ]
    alone, _ = run_all(path, reqs, 1)
    together, _ = run_all(path, reqs, 4)
    _compare(alone, together, cancelled=None)
    assert max(stats(together[r["id"]])["concurrent"] for r in reqs) >= 2
    assert generated_tokens(alone["img-a"]) == vlm_generate(path, [images["a"]], max_tokens=12)


@pytest.mark.parametrize("family", FAMILIES)
def test_hugging_face_layout_loads_the_same(root, images, family, tmp_path):
    """In-process: the checkpoint with Hugging Face tensor names and layouts (model.visual.*,
    model.language_model.*, PyTorch conv layouts, fused experts, Qwen3.5's shifted norms) gives the same
    logits: mlx-lm's sanitize loads the text part, mlx-vlm's the vision tower."""
    import mlx.core as mx

    hf = to_hf_layout(family, qwen3_fixture_dir(family, root), tmp_path / "hf")
    out = []
    for path in (None, hf):
        kit, plan = _kit_and_plan(root, images, family, [images["a"], images["b"]], path)
        with plan.state:
            out.append(kit.model(mx.array(plan.ids)[None], input_embeddings=plan.embed(0)[None])[0, -1])
    assert mx.abs(out[0] - out[1]).max().item() == 0.0

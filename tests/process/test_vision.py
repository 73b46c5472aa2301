"""Vision add-ons through the real worker process, against mlx-vlm's own generate as the reference.

These fixtures' tokenizers add no BOS of their own (the chat template writes it), where mlx-vlm's generate
tokenizes the prompt as transformers' processor does. With a tokenizer that adds BOS too (the real Gemma 3,
Pixtral and Mistral 3 ones) mlx-vlm's generate doubles it: tests/process/test_vision_exactness.py compares with
transformers' processor ids run through mlx-vlm's model instead.
"""

import base64
import functools
import os
import struct
import zlib

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.support import reference  # noqa: E402
from tests.support.client import Worker, generated_tokens  # noqa: E402
from tests.support.prompts import assert_varied  # noqa: E402
from tests.support.vlm_fixtures import FAMILIES, vlm_fixture_dir  # noqa: E402

MAX = 8
QUESTION = "What is this?"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("vlm")


@pytest.fixture(scope="module")
def images(root):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(7)
    out = {}
    for name, (h, w) in {"a": (48, 64), "b": (64, 48), "c": (48, 64)}.items():
        path = root / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        out[name] = str(path)
    gif = root / "d.gif"
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(gif)
    out["gif"] = str(gif)
    return out


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


@functools.lru_cache(maxsize=2)
def _vlm(path):
    from mlx_vlm import load

    return load(path)


def vlm_generate(path, n_images_or_paths, question=QUESTION, max_tokens=MAX):
    """mlx-vlm's stream_generate (it stops at EOS and yields it: cut there)."""
    from mlx_vlm.generate import stream_generate

    model, proc = _vlm(str(path))
    paths = list(n_images_or_paths)
    content = [{"type": "image"} for _ in paths] + [{"type": "text", "text": question}]
    prompt = proc.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                add_generation_prompt=True)
    out = []
    for r in stream_generate(model, proc, prompt, image=paths or None, max_tokens=max_tokens,
                             temperature=0.0):
        out.append(r.token)
    eos = set(model.config.eos_token_id if isinstance(model.config.eos_token_id, list)
              else [model.config.eos_token_id])
    out = out[:max_tokens]
    for i, t in enumerate(out):
        if t in eos:
            return out[:i]
    return out


def assert_varied_tokens(tokens, what):
    assert_varied(tokens, 3, what=f"{what} reference")
    return tokens


def chat(worker, rid, messages, max_tokens=MAX, **extra):
    evs = worker.request({"type": "generate", "id": rid, "prompt": {"messages": messages},
                          "params": {"max_tokens": max_tokens}, **extra})
    return evs


def user(paths, question=QUESTION):
    return {"role": "user", "content": [{"type": "image", "path": p} for p in paths]
            + [{"type": "text", "text": question}]}


def stats(evs):
    assert evs[-1]["type"] == "done", evs[-1]
    return next(e for e in evs if e["type"] == "stats")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_parity_and_cache(worker, root, images, family):
    path = vlm_fixture_dir(family, root)
    info = worker.load(path)
    assert info["vision"] is True

    # 1 and 2 images: the same greedy tokens as mlx-vlm's generate
    one = generated_tokens(chat(worker, f"{family}-1", [user([images["a"]])]))
    assert one == assert_varied_tokens(vlm_generate(path, [images["a"]]), f"{family} one image")
    two = generated_tokens(chat(worker, f"{family}-2", [user([images["a"], images["b"]])]))
    assert two == assert_varied_tokens(vlm_generate(path, [images["a"], images["b"]]), f"{family} two images")
    # the image reaches the model
    other = generated_tokens(chat(worker, f"{family}-c", [user([images["c"]])]))
    assert other != one
    # text-only through the VLM equals mlx-lm
    text_msgs = [{"role": "user", "content": QUESTION}]
    text = generated_tokens(chat(worker, f"{family}-t", text_msgs))
    ids = reference.chat_ids(path, text_msgs)
    assert text == assert_varied_tokens(reference.generate(path, ids, MAX), f"{family} text")

    # follow-up on the same image: served from the cache past the image, identical to a cold run
    first = chat(worker, f"{family}-f1", [user([images["a"]])])
    answer = "".join(e["text"] for e in first if e["type"] == "token")
    follow = [user([images["a"]]), {"role": "assistant", "content": answer},
              {"role": "user", "content": "Tell me more."}]
    warm = chat(worker, f"{family}-f2", follow)
    n_img = _last_image_token(path, [images["a"]])
    assert stats(warm)["cached_tokens"] > n_img
    assert worker.request({"type": "cache_clear", "id": f"{family}-cc"})[-1]["type"] == "done"
    cold = chat(worker, f"{family}-f3", follow)
    assert stats(cold)["cached_tokens"] == 0
    assert generated_tokens(cold) == generated_tokens(warm)

    # a changed image (same size) is a miss at the image, not a stale hit
    changed = [user([images["c"]])] + follow[1:]
    ch = chat(worker, f"{family}-f4", changed)
    assert stats(ch)["cached_tokens"] <= _first_image_token(path, [images["c"]])
    worker.request({"type": "cache_clear", "id": f"{family}-cc2"})
    assert generated_tokens(chat(worker, f"{family}-f5", changed)) == generated_tokens(ch)


def _image_positions(path, paths):
    from mlx_vlm.utils import load_image, prepare_inputs

    model, proc = _vlm(str(path))
    content = [{"type": "image"} for _ in paths] + [{"type": "text", "text": QUESTION}]
    prompt = proc.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                add_generation_prompt=True)
    tok_id = getattr(model.config, "image_token_index", None) or model.config.image_token_id
    inp = prepare_inputs(proc, images=[load_image(p) for p in paths], prompts=prompt,
                         image_token_index=tok_id, add_special_tokens=False)
    return [i for i, t in enumerate(inp["input_ids"].reshape(-1).tolist()) if t == tok_id]


def _first_image_token(path, paths):
    return _image_positions(path, paths)[0]


def _last_image_token(path, paths):
    return _image_positions(path, paths)[-1]


def _png_bomb(w=20000, h=20000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_image_sources_and_bad_images(worker, root, images):
    path = vlm_fixture_dir("qwen2_vl", root)
    worker.load(path)
    good = generated_tokens(chat(worker, "src-path", [user([images["a"]])]))
    raw = open(images["a"], "rb").read()
    b64 = base64.b64encode(raw).decode()
    for rid, part in [("src-data", {"type": "image", "data": b64}),
                      ("src-dataurl", {"type": "image", "data": "data:image/png;base64," + b64}),
                      ("src-url", {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}}),
                      ("src-file", {"type": "image_url", "image_url": "file://" + images["a"]})]:
        msgs = [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}]
        assert generated_tokens(chat(worker, rid, msgs)) == good, rid
    gif = chat(worker, "src-gif", [user([images["gif"]])])
    assert gif[-1]["type"] == "done"

    txt = root / "notes.txt"
    txt.write_text("hello, not an image\n")
    from PIL import Image

    bmp = root / "x.bmp"
    Image.new("RGB", (16, 16)).save(bmp)
    bad = {
        "corrupt-b64": {"type": "image", "data": "!!!not base64!!!"},
        "text-file": {"type": "image", "path": str(txt)},
        "bomb": {"type": "image", "data": base64.b64encode(_png_bomb()).decode()},
        "bmp": {"type": "image", "path": str(bmp)},
        "missing": {"type": "image", "path": str(root / "nope.png")},
        "relative": {"type": "image", "path": "a.png"},
        "http": {"type": "image_url", "image_url": "http://example.com/a.png"},
        "truncated": {"type": "image", "data": base64.b64encode(raw[: len(raw) // 2]).decode()},
        "path-and-data": {"type": "image", "path": images["a"], "data": b64},  # exactly one (PROTOCOL.md)
        "neither": {"type": "image"},
    }
    for rid, part in bad.items():
        evs = chat(worker, rid, [{"role": "user", "content": [part, {"type": "text", "text": "x"}]}])
        assert evs[-1]["type"] == "error" and evs[-1]["code"] == "invalid_image", (rid, evs[-1])
    # still serving, and the same answer as before
    assert generated_tokens(chat(worker, "after-bad", [user([images["a"]])])) == good


def test_text_prompt_with_images_and_mismatch(worker, root, images):
    path = vlm_fixture_dir("gemma3", root)
    worker.load(path)
    _, proc = _vlm(str(path))
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    text = proc.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                              add_generation_prompt=True)
    evs = worker.request({"type": "generate", "id": "tp", "params": {"max_tokens": MAX},
                          "prompt": {"text": text, "add_special_tokens": False,
                                     "images": [{"type": "image", "path": images["a"]}]}})
    assert generated_tokens(evs) == vlm_generate(path, [images["a"]])
    evs = worker.request({"type": "generate", "id": "tp2", "params": {"max_tokens": 2},
                          "prompt": {"text": "no placeholder", "images": [{"type": "image",
                                                                           "path": images["a"]}]}})
    assert evs[-1]["type"] == "error" and evs[-1]["code"] == "invalid_params"


def test_text_model_refuses_images(worker, root, images):
    from tests.support.fixtures import fixture_dir

    worker.load(fixture_dir("llama", root))
    evs = chat(worker, "no-vision", [user([images["a"]])])
    assert evs[-1]["type"] == "error" and evs[-1]["code"] == "invalid_params"


def test_mrope_state_is_per_request(root, images):
    """In-process: the M-RoPE hook changes the logits only inside ``with plan.state``."""
    import mlx.core as mx
    import msgspec

    from worker.loading.model import load
    from worker.prompting.prompt import build_prompt
    from worker.protocol import Generate, LoadOptions

    kit = load(str(vlm_fixture_dir("qwen2_vl", root)), LoadOptions(), lambda f: None)
    req = msgspec.convert({"type": "generate", "id": "g", "prompt": {"messages": [user([images["a"]])]}},
                          Generate)
    plan = build_prompt(kit, req)
    x, e = mx.array(plan.ids)[None], plan.embed(0)[None]
    plain = kit.model(x, input_embeddings=e)
    with plan.state:
        mrope = kit.model(x, input_embeddings=e)
    after = kit.model(x, input_embeddings=e)
    assert mx.abs(plain - after).max().item() == 0.0  # nothing leaks out of the request
    assert mx.abs(plain - mrope).max().item() > 1e-3  # positions really differ
    st = plan.state
    n = len(plan.ids)
    tail = st.positions(n - 1, 3)  # last prompt token + two decode steps
    assert tail.shape == (3, 1, 3)
    assert tail[:, 0, 1].tolist() == [n + st.delta] * 3


@pytest.mark.parametrize("family", FAMILIES)
def test_memoized_image_costs_nothing_on_the_follow_up(root, images, family, monkeypatch):
    """In-process: a follow-up on a memoized image decodes, processes and encodes nothing; its ids and
    key equal the first turn's; embeddings of any suffix (cut before, inside or after an image) equal
    the same rows of the whole prompt's, and equal mlx-vlm's own merge over the full processor output."""
    import mlx.core as mx
    import msgspec
    from mlx_vlm.utils import prepare_inputs

    from worker.addons import images as imgs
    from worker.loading.model import load
    from worker.prompting.prompt import build_prompt
    from worker.protocol import Generate, LoadOptions

    kit = load(str(vlm_fixture_dir(family, root)), LoadOptions(), lambda f: None)
    addon = kit.addon
    msgs = [user([images["a"], images["b"]])]
    req = msgspec.convert({"type": "generate", "id": "g", "prompt": {"messages": msgs}}, Generate)
    first = build_prompt(kit, req)
    full = first.embed(0)

    # the reference: mlx-vlm's processor over the whole prompt, and its merge
    text = kit.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]}],
        tokenize=False, add_generation_prompt=True)
    pil = [imgs.decode(open(p, "rb").read()).image for p in (images["a"], images["b"])]
    ref_in = prepare_inputs(addon.processor, images=pil, prompts=text, image_token_index=addon.image_token_id,
                            add_special_tokens=False)
    assert first.ids == ref_in["input_ids"].reshape(-1).tolist()
    ref = addon.mod.Model.get_input_embeddings(
        addon.parts, ref_in["input_ids"], ref_in["pixel_values"], mask=ref_in.get("attention_mask"),
        **({"image_grid_thw": ref_in["image_grid_thw"]} if "image_grid_thw" in ref_in else {}),
        **({"image_sizes": ref_in["image_sizes"]} if "image_sizes" in ref_in else {}))
    assert mx.abs(ref.inputs_embeds[0] - full).max().item() < 1e-5

    calls = []
    monkeypatch.setattr(imgs, "decode", lambda *a, **k: calls.append("decode"))
    monkeypatch.setattr(addon, "encode", lambda *a, **k: calls.append("encode"))
    monkeypatch.setattr(addon, "_process", lambda *a, **k: calls.append("process"))
    again = build_prompt(kit, req)
    assert calls == [] and again.ids == first.ids and again.key == first.key
    pos = [i for i, t in enumerate(first.ids) if t == addon.image_token_id]
    for cut in (1, pos[0], pos[0] + 1, pos[len(pos) // 2], pos[-1], pos[-1] + 1, len(first.ids) - 1):
        part = again.embed(cut)
        assert part.shape[0] == len(first.ids) - cut
        assert mx.abs(part - full[cut:]).max().item() == 0.0, cut

"""Every load-option combination on every fixture shape, with the request features that touch the cache:
no `internal` error, ever (a host can cause any of these), and a refusal is a clear invalid_params."""

import itertools
import random

import pytest

from tests.client import Worker

KV_BITS = (None, 8)
MAX_KV = (None, 64)
DRAFT = (False, True)


def _ids(n, seed):
    return [random.Random(seed).randrange(20, 400) for _ in range(n)]


REQUESTS = [
    ("short", {"tokens": _ids(20, 1)}, {"max_tokens": 6}),
    ("long", {"tokens": _ids(600, 2)}, {"max_tokens": 6, "top_logprobs": 2}),  # past gemma's 512 window
    ("penalties", {"tokens": _ids(80, 3)}, {"max_tokens": 6, "repetition_penalty": 1.3, "stop": ["zz"]}),
    ("json", {"tokens": _ids(30, 4)}, {"max_tokens": 6, "json_schema": {"type": "object"}}),
    ("sampled", {"tokens": _ids(70, 5)}, {"max_tokens": 6, "temperature": 0.8, "seed": 3}),
]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "lfm2"])
def test_no_internal_error_from_any_option_combination(fixtures_root, family):
    from tests.fixtures import fixture_dir

    path = fixture_dir(family, fixtures_root)
    w = Worker()
    try:
        for kv_bits, max_kv, draft in itertools.product(KV_BITS, MAX_KV, DRAFT):
            opts = {k: v for k, v in (("kv_bits", kv_bits), ("max_kv_size", max_kv)) if v is not None}
            if kv_bits:
                opts["kv_group_size"] = 32  # the fixtures' head size
            if draft:
                opts["draft_model_path"] = str(path)
            end = w.request({"type": "load", "id": "l", "model_path": str(path), "options": opts})[-1]
            label = (family, opts)
            if end["type"] == "error":
                assert end["code"] == "invalid_params", (label, end)
                assert kv_bits is not None and max_kv is not None, (label, end)  # the one refused pair
                continue
            for name, prompt, params in REQUESTS:
                for turn in range(2):  # the second turn goes through the prompt cache
                    events = w.request({"type": "generate", "id": f"{name}{turn}", "prompt": prompt,
                                        "params": params})
                    assert events[-1]["type"] == "done", (label, name, turn, events[-1])
                prompt = {"tokens": prompt["tokens"] + _ids(10, 9)}
    finally:
        w.close()


def test_no_internal_error_on_the_gemma3_vision_fixture(tmp_path):
    import numpy as np
    from PIL import Image

    from tests.vlm_fixtures import build_vlm_fixture

    # head size 32, so kv_group_size 32 fits
    path = build_vlm_fixture("gemma3", tmp_path / "vlm", text_overrides={"head_dim": 32, "query_pre_attn_scalar": 32})
    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(img)
    words = " ".join(["stone", "river", "light"] * 60)  # past the fixture's 512-token window
    chats = [[{"role": "user", "content": [{"type": "image", "path": str(img)}, {"type": "text", "text": t}]}]
             for t in ("What is it?", words)] + [[{"role": "user", "content": words}]]
    w = Worker()
    try:
        for kv_bits, max_kv, draft in itertools.product(KV_BITS, MAX_KV, DRAFT):
            opts = {k: v for k, v in (("kv_bits", kv_bits), ("max_kv_size", max_kv)) if v is not None}
            if kv_bits:
                opts["kv_group_size"] = 32
            if draft:
                opts["draft_model_path"] = str(path)  # its text model drafts the text-only turns
            end = w.request({"type": "load", "id": "l", "model_path": str(path), "options": opts})[-1]
            if end["type"] == "error":
                assert end["code"] == "invalid_params" and kv_bits and max_kv, (opts, end)
                continue
            for i, msgs in enumerate(chats):
                first = w.request({"type": "generate", "id": f"c{i}", "prompt": {"messages": msgs},
                                   "params": {"max_tokens": 6}})
                assert first[-1]["type"] == "done", (opts, i, first[-1])
                follow = msgs + [{"role": "assistant", "content": first[-1]["text"]},
                                 {"role": "user", "content": "And then?"}]
                again = w.request({"type": "generate", "id": f"f{i}", "prompt": {"messages": follow},
                                   "params": {"max_tokens": 6}})
                assert again[-1]["type"] == "done", (opts, i, again[-1])
    finally:
        w.close()

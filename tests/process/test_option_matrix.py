"""Every load-option combination on every fixture shape, with the request features that touch the cache:
no `internal` error, ever (a host can cause any of these), and a refusal is a clear invalid_params. Each
request runs three times: cold, again (a regenerate, from the cache), and as a follow-up that extends the
regenerate's answer; the follow-up reuses exactly the whole previous turn and, where mlx-lm runs the same
computation (no `kv_bits`, no `max_kv_size`), equals a cold mlx-lm run."""

import functools
import itertools

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors

from tests.support import reference
from tests.support.client import generated_tokens
from tests.support.prompts import assert_varied, random_ids

KV_BITS = (None, 8)
MAX_KV = (None, 64)
DRAFT = (False, True)

REQUESTS = [
    ("short", {"tokens": random_ids(20, 1)}, {"max_tokens": 6}),
    ("long", {"tokens": random_ids(600, 2)}, {"max_tokens": 6, "top_logprobs": 2}),  # past gemma's 512 window
    ("penalties", {"tokens": random_ids(80, 3)}, {"max_tokens": 6, "repetition_penalty": 1.3, "stop": ["zz"]}),
    ("json", {"tokens": random_ids(30, 4)}, {"max_tokens": 6, "json_schema": {"type": "object"}}),
    ("sampled", {"tokens": random_ids(70, 5)}, {"max_tokens": 6, "temperature": 0.8, "seed": 3}),
]
GREEDY = ("short", "long", "penalties")  # those mlx-lm's generate_step reproduces as they are


@functools.lru_cache(maxsize=64)
def _mlx_lm(path, ids, n, repetition_penalty=None):
    """Greedy tokens of a cold mlx-lm run (float32, as the worker computes on the CPU), EOS left out."""
    model, tok = reference.load_model(path, "float32")
    procs = make_logits_processors(repetition_penalty=repetition_penalty) if repetition_penalty else None
    out = []
    for t, _ in generate_step(mx.array(list(ids)), model, max_tokens=n, logits_processors=procs):
        if t in tok.eos_token_ids:
            break
        out.append(int(t))
    return out


def _held(ids, events):
    """The tokens a request's cache entry holds: its prompt and every sampled token (an EOS or stop token too),
    but the last one when speculative decoding took it from the main model (mlx-lm's speculative_generate_step
    feeds that token only with the next round's drafts)."""
    done, st = events[-1], next(e for e in events if e["type"] == "stats")
    emitted = generated_tokens(events)
    sampled = emitted + ([done["stop_token"]] if done.get("stop_token") is not None else [])
    assert st["generated_tokens"] == len(sampled), (st, done)
    if st.get("speculative") == "on":
        flags = [f for e in events if e["type"] == "token" for f in e["from_draft"]]
        assert len(flags) == len(emitted)
        # the stop token sends no token event: whether it came from the draft is what the count leaves over
        last_from_draft = st["draft_tokens_accepted"] - sum(flags) == 1 if len(sampled) > len(emitted) else flags[-1]
        if not last_from_draft:
            sampled = sampled[:-1]
    return ids + sampled


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "lfm2"])
def test_no_internal_error_from_any_option_combination(w, fixtures_root, family):
    from tests.support.fixtures import fixture_dir

    path = fixture_dir(family, fixtures_root)
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
            ids = prompt["tokens"]
            for turn in range(2):  # the second turn goes through the prompt cache
                events = w.request({"type": "generate", "id": f"{name}{turn}", "prompt": prompt,
                                    "params": params})
                assert events[-1]["type"] == "done", (label, name, turn, events[-1])
            st = next(e for e in events if e["type"] == "stats")
            assert st["cached_tokens"] == len(ids) - 1, (label, name, st)  # a regenerate: all but one
            held = _held(ids, events)
            stop = [events[-1]["stop_token"]] if events[-1].get("stop_token") is not None else []
            follow = ids + generated_tokens(events) + stop + random_ids(10, 9)  # the answer, then a new message
            events = w.request({"type": "generate", "id": f"{name}-f", "prompt": {"tokens": follow},
                                "params": params})
            assert events[-1]["type"] == "done", (label, name, events[-1])
            st = next(e for e in events if e["type"] == "stats")
            assert st["cached_tokens"] == len(held), (label, name, st, len(ids), len(held))  # all it holds
            if name in GREEDY and kv_bits is None and max_kv is None and events[-1]["stop_reason"] != "stop_string":
                want = _mlx_lm(path, tuple(follow), 6, params.get("repetition_penalty"))
                assert_varied(want, what=f"mlx-lm's follow-up of {name}")
                assert generated_tokens(events) == want, (label, name)


def test_no_internal_error_on_the_gemma3_vision_fixture(w, tmp_path):
    import numpy as np
    from PIL import Image

    from tests.support.vlm_fixtures import build_vlm_fixture

    # head size 32, so kv_group_size 32 fits
    path = build_vlm_fixture("gemma3", tmp_path / "vlm", text_overrides={"head_dim": 32, "query_pre_attn_scalar": 32})
    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(img)
    words = " ".join(["stone", "river", "light"] * 60)  # past the fixture's 512-token window
    chats = [[{"role": "user", "content": [{"type": "image", "path": str(img)}, {"type": "text", "text": t}]}]
             for t in ("What is it?", words)] + [[{"role": "user", "content": words}]]
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

"""`max_kv_size` and `kv_bits` on every model shape: full attention (llama, qwen2), sliding window
(gemma3_text, the gemma3 VLM), through the real worker, against mlx-lm's generate_step run directly."""

import random

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models import cache as mlx_cache

from tests import reference
from tests.client import Worker, generated_tokens
from tests.vlm_fixtures import build_vlm_fixture

FAMILIES = ["llama", "qwen2", "gemma3_text"]
WINDOW = 48


def _ids(n, seed):
    return [random.Random(seed).randrange(20, 400) for _ in range(n)]


def _raw(path, ids, n, cache, **kw):
    model, tok = reference.load_model(path, "float32")
    out = []
    for t, _ in generate_step(mx.array(ids), model, max_tokens=n, prompt_cache=cache(model), **kw):
        if t in tok.eos_token_ids:
            break
        out.append(int(t))
    return out


def _windowed(model):
    """What max_kv_size means, built by hand: every full-attention layer a window (keep 4, as mlx-lm does
    for models without make_cache); sliding-window layers as the model makes them."""
    layers = model.make_cache() if hasattr(model, "make_cache") else [mlx_cache.KVCache() for _ in model.layers]
    return [mlx_cache.RotatingKVCache(max_size=WINDOW, keep=4) if type(c) is mlx_cache.KVCache else c
            for c in layers]


def _quantized_full_exact_local(model):
    """What kv_bits means with sliding-window layers: mlx-lm quantizes the full-attention layers, and the
    rotating ones (which it cannot quantize) stay exact."""
    from worker.cache.layout import make_cache

    return make_cache(model, None, 8)


@pytest.fixture(scope="module")
def w():
    worker = Worker()
    yield worker
    worker.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_max_kv_size_is_a_window_for_every_family(w, family_dirs, family):
    path = family_dirs[family]
    w.load(path, max_kv_size=WINDOW)
    ids = _ids(400, 1)
    events = w.request({"type": "generate", "id": "g", "prompt": {"tokens": ids}, "params": {"max_tokens": 20}})
    assert events[-1]["type"] == "done", events[-1]
    assert generated_tokens(events) == _raw(path, ids, 20, _windowed)
    # the window bounds memory: the entry (with its snapshots of the window layers) is far smaller
    windowed = w.request({"type": "status", "id": "s"})[-1]["cache"]["bytes"]
    w.load(path)
    w.request({"type": "generate", "id": "g2", "prompt": {"tokens": ids}, "params": {"max_tokens": 20}})
    full = w.request({"type": "status", "id": "s2"})[-1]["cache"]["bytes"]
    # gemma3's local layers keep their own 512-token window (and its snapshots): only its global layers shrink
    assert windowed < full * (0.75 if family != "gemma3_text" else 1.0), (windowed, full)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_bits_works_for_every_family(w, family_dirs, family):
    path = family_dirs[family]
    w.load(path, kv_bits=8, kv_group_size=32)
    ids = _ids(600, 2)  # past gemma3's 512-token window: its rotating layers have wrapped
    first = w.request({"type": "generate", "id": "a", "prompt": {"tokens": ids}, "params": {"max_tokens": 12}})
    assert first[-1]["type"] == "done", first[-1]
    raw = _raw(path, ids, 12, _quantized_full_exact_local, kv_bits=8, kv_group_size=32, quantized_kv_start=0,
               prefill_step_size=256)  # the same chunks as the worker on a CPU (quantized after each)
    assert generated_tokens(first) == raw
    follow = ids + generated_tokens(first) + _ids(8, 3)
    second = w.request({"type": "generate", "id": "b", "prompt": {"tokens": follow}, "params": {"max_tokens": 4}})
    assert second[-1]["type"] == "done", second[-1]
    assert second[-2]["cached_tokens"] >= len(ids)  # the quantized cache is reused on the follow-up


def test_kv_bits_with_an_image_on_the_gemma3_vlm(w, tmp_path):
    from PIL import Image

    path = build_vlm_fixture("gemma3", tmp_path / "gemma3-hd32", text_overrides={"head_dim": 32})
    img = tmp_path / "i.png"
    Image.new("RGB", (64, 48), (200, 30, 90)).save(img)
    w.load(path, kv_bits=8, kv_group_size=32)
    msgs = [{"role": "user", "content": [{"type": "image", "path": str(img)}, {"type": "text", "text": "what?"}]}]
    first = w.request({"type": "generate", "id": "v1", "prompt": {"messages": msgs}, "params": {"max_tokens": 6}})
    assert first[-1]["type"] == "done", first[-1]
    msgs += [{"role": "assistant", "content": first[-1]["text"]}, {"role": "user", "content": "and?"}]
    second = w.request({"type": "generate", "id": "v2", "prompt": {"messages": msgs}, "params": {"max_tokens": 6}})
    assert second[-1]["type"] == "done", second[-1]
    assert second[-2]["cached_tokens"] > 0


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_kv_bits_with_max_kv_size_is_refused_clearly(w, family_dirs, family):
    err = w.request({"type": "load", "id": "l", "model_path": str(family_dirs[family]),
                     "options": {"kv_bits": 8, "kv_group_size": 32, "max_kv_size": WINDOW}})[-1]
    assert err["type"] == "error" and err["code"] == "invalid_params", err
    assert "kv_bits" in err["message"] and "max_kv_size" in err["message"]


def _gemma4_text_only(vlm, dst, layout):
    """The Gemma 4 fixture's text part: model_type gemma4 without vision_config, or a gemma4_text
    checkpoint (its text_config at the top, weights under ``model.``)."""
    import json
    import shutil

    shutil.copytree(vlm, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("vision_config")
    if layout == "gemma4_text":
        cfg = dict(cfg["text_config"], eos_token_id=cfg["eos_token_id"], bos_token_id=cfg["bos_token_id"])
        prefix = "language_model.model."
        weights = mx.load(str(dst / "model.safetensors"))
        mx.save_safetensors(str(dst / "model.safetensors"), {"model." + k[len(prefix):]: v for k, v in
                                                             weights.items() if k.startswith(prefix)})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("layout", ["gemma4", "gemma4_text"])
def test_kv_bits_on_a_text_only_gemma4_with_kv_shared_layers(w, tmp_path_factory, layout):
    """Gemma 4's KV-shared layers read their source layers' K/V, quantized with kv_bits: without the vision
    add-on they get its stand-in cache too (mlx-lm alone runs the float kernel on them and fails). A
    follow-up reuses the cache and equals a cold run, the tokens are the VLM checkpoint's, and the model
    as its own draft speculates to the same tokens (speculative decoding's placeholders stand in too)."""
    from tests.vlm_fixtures_gemma4 import gemma4_fixture_dir

    root = tmp_path_factory.mktemp("gemma4-text")
    vlm = gemma4_fixture_dir(root)
    path = _gemma4_text_only(vlm, root / layout, layout)

    def chat(rid, messages):
        evs = w.request({"type": "generate", "id": rid, "prompt": {"messages": messages},
                         "params": {"max_tokens": 12}})
        assert evs[-1]["type"] == "done", evs[-1]  # never `internal`
        return evs

    info = w.load(path, kv_bits=8, kv_group_size=32)
    assert info["model_type"] == layout and not info.get("vision")
    msgs = [{"role": "user", "content": "Describe the picture in a few words."}]
    first = chat("t1", msgs)
    follow = msgs + [{"role": "assistant", "content": first[-1]["text"]}, {"role": "user", "content": "More?"}]
    warm = chat("t2", follow)
    assert warm[-1]["cached_tokens"] >= next(e for e in first if e["type"] == "stats")["prompt_tokens"]
    tokens = generated_tokens(warm)
    assert len(set(tokens)) >= 4, tokens  # a collapsed random model would compare nothing
    assert w.request({"type": "cache_clear", "id": "cc"})[-1]["type"] == "done"
    cold = chat("t3", follow)
    assert cold[-1]["cached_tokens"] == 0 and generated_tokens(cold) == tokens
    assert w.load(vlm, kv_bits=8, kv_group_size=32)["vision"] is True
    assert generated_tokens(chat("t4", follow)) == tokens
    for model in (path, vlm):
        w.load(model, kv_bits=8, kv_group_size=32, draft_model_path=str(model))
        spec = chat(f"s-{model.name}", msgs)
        assert next(e for e in spec if e["type"] == "stats")["speculative"] == "on"
        assert generated_tokens(spec) == generated_tokens(first)

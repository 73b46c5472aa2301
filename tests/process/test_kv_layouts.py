"""`max_kv_size` and `kv_bits` on every text model shape: full attention (llama, qwen2), sliding window
(gemma3_text), and Gemma 4's KV-shared layers, through the real worker, against mlx-lm's generate_step (and
mlx-vlm's, for Gemma 4) run directly on random prompts. The vision models' kv_bits checks are
tests/support/vision_checks.py's ``check_kv_bits_follow_up``."""

import contextlib
import importlib
import types

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models import cache as mlx_cache

from tests.support import reference
from tests.support.client import generated_tokens
from tests.support.continued import continued_ids, streamed
from tests.support.prompts import assert_varied, random_ids
from tests.support.vision_checks import KV, Reference, closer_to_quantized, quantized_layers_shrink, stats

FAMILIES = ["llama", "qwen2", "gemma3_text"]
WINDOW = 48
PREFILL = 256  # the worker's prefill_step_size on a CPU: the references prefill in the same chunks
mlx_lm_generate = importlib.import_module("mlx_lm.generate")  # the module (mlx_lm.generate is also a function)


def _mlx_lm_window(model):
    """PROTOCOL.md's max_kv_size in mlx-lm's own terms. mlx-lm 0.32.2 ignores max_kv_size for a model with its
    own cache layout (llama and gemma3_text have one); for a model without, make_prompt_cache gives every layer
    its window. So: the model's layout, its sliding layers as they are, and each full-attention layer (KVCache)
    the window make_prompt_cache gives a layer of a model without a layout."""
    own = mlx_cache.make_prompt_cache(model, WINDOW)
    windows = mlx_cache.make_prompt_cache(types.SimpleNamespace(layers=own), WINDOW)
    return [w if type(c) is mlx_cache.KVCache else c for c, w in zip(own, windows)]


@contextlib.contextmanager
def _rotating_layers_stay_exact():
    """mlx-lm raises on quantizing a rotating layer (pinned below); PROTOCOL.md: with kv_bits the window layers
    stay exact and the full-attention ones are quantized by mlx-lm's own rule."""
    upstream = mlx_lm_generate.maybe_quantize_kv_cache

    def quantize(prompt_cache, quantized_kv_start, kv_group_size, kv_bits):
        if kv_bits is None:
            return
        for i, c in enumerate(prompt_cache):
            if not isinstance(c, mlx_cache.RotatingKVCache) and hasattr(c, "to_quantized") \
                    and c.offset >= quantized_kv_start:
                prompt_cache[i] = c.to_quantized(group_size=kv_group_size, bits=kv_bits)

    mlx_lm_generate.maybe_quantize_kv_cache = quantize
    try:
        yield
    finally:
        mlx_lm_generate.maybe_quantize_kv_cache = upstream


def _raw(path, ids, n, cache, **kw):
    """mlx-lm's greedy tokens and their logprobs on ``cache`` (updated in place), to EOS or ``n`` tokens."""
    model, tok = reference.load_model(path, "float32")
    out, lps = [], []
    with _rotating_layers_stay_exact():
        for t, lp in generate_step(mx.array(ids), model, max_tokens=n, prompt_cache=cache,
                                   prefill_step_size=PREFILL, **kw):
            if t in tok.eos_token_ids:
                break
            out.append(int(t))
            lps.append(lp[int(t)].item())
    return out, lps


def _nbytes(cache):
    return sum(c.nbytes for c in cache)


def _entry_bytes(w):
    return w.request({"type": "status", "id": "s"})[-1]["cache"]["bytes"]


def _generate(w, rid, ids, n):
    """(events, tokens, each token's logprob) of a token prompt."""
    evs = w.request({"type": "generate", "id": rid, "prompt": {"tokens": ids},
                     "params": {"max_tokens": n, "top_logprobs": 1}})
    assert evs[-1]["type"] == "done", evs[-1]
    return evs, generated_tokens(evs), [lp["logprob"] for e in evs if e["type"] == "token" for lp in e["logprobs"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_max_kv_size_is_a_window_for_every_family(w, family_dirs, family):
    path = family_dirs[family]
    model, _ = reference.load_model(path, "float32")
    ids = random_ids(400, 1)
    windowed_cache, full_cache = _mlx_lm_window(model), mlx_cache.make_prompt_cache(model)
    windowed, full = _raw(path, ids, 20, windowed_cache)[0], _raw(path, ids, 20, full_cache)[0]
    assert_varied(windowed, 4, "windowed mlx-lm")
    assert windowed != full, "the window changes nothing on this prompt: the check would not discriminate"
    # what the window holds: WINDOW slots in each full-attention layer (mlx-lm's rotating buffer, trimmed to its
    # size once decoding), the sliding layers as without max_kv_size
    for c, f in zip(windowed_cache, full_cache):
        assert c.keys.shape[2] == (WINDOW if type(f) is mlx_cache.KVCache else f.keys.shape[2])
    for cache, tokens, options in ((windowed_cache, windowed, {"max_kv_size": WINDOW}), (full_cache, full, {})):
        # a budget of exactly the reference cache's bytes leaves no room for window snapshots: the entry alone
        w.load(path, cache_max_bytes=_nbytes(cache), prefill_step_size=PREFILL, **options)
        assert _generate(w, "g", ids, 20)[1] == tokens
        assert _entry_bytes(w) == _nbytes(cache)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_bits_works_for_every_family(w, family_dirs, family):
    path = family_dirs[family]
    model, _ = reference.load_model(path, "float32")
    ids = random_ids(600, 2)  # past gemma3's 512-token window: its rotating layers have wrapped
    quant = dict(kv_bits=KV["kv_bits"], kv_group_size=KV["kv_group_size"], quantized_kv_start=0)
    cache, plain_cache = mlx_cache.make_prompt_cache(model), mlx_cache.make_prompt_cache(model)
    raw = _raw(path, ids, 12, cache, **quant)
    plain = _raw(path, ids, 12, plain_cache)
    assert_varied(raw[0], 4, "quantized mlx-lm")
    expected = quantized_layers_shrink(cache, plain_cache)
    w.load(path, cache_max_bytes=expected, prefill_step_size=PREFILL, **KV)
    _, first, lps = _generate(w, "a", ids, 12)
    assert first == raw[0]
    closer_to_quantized(lps, raw, plain, family)
    assert _entry_bytes(w) == expected
    # a follow-up that continues the entry reuses all of it (the wrapped windows too) and continues as mlx-lm
    # does on its quantized cache
    more = random_ids(8, 3)
    second, tokens, _ = _generate(w, "b", ids + first + more, 4)
    assert second[-1]["cached_tokens"] == len(ids) + len(first)
    assert tokens == _raw(path, more, 4, cache, **quant)[0]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_kv_bits_with_max_kv_size_is_refused_clearly(w, family_dirs, family):
    err = w.request({"type": "load", "id": "l", "model_path": str(family_dirs[family]),
                     "options": {"kv_bits": 8, "kv_group_size": 32, "max_kv_size": WINDOW}})[-1]
    assert err["type"] == "error" and err["code"] == "invalid_params", err
    assert "kv_bits" in err["message"] and "max_kv_size" in err["message"]


def test_upstream_cannot_quantize_rotating_layers():
    """mlx-lm and mlx-vlm cannot quantize a rotating layer, so their kv_bits fails on every sliding-window
    model; the references keep those layers exact, as PROTOCOL.md says the worker does. When this fails,
    upstream quantizes them: decide whether the worker should too."""
    from mlx_vlm.models import cache as vlm_cache

    for module in (mlx_cache, vlm_cache):
        layer = module.RotatingKVCache(max_size=8)
        layer.update_and_fetch(mx.zeros((1, 1, 4, 32)), mx.zeros((1, 1, 4, 32)))
        with pytest.raises(NotImplementedError):
            layer.to_quantized(group_size=32, bits=8)


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
    add-on they get its stand-in cache too (mlx-lm alone runs the float kernel on them and fails). Against
    mlx-vlm on the VLM checkpoint, quantizing as the worker does (tests/vision_checks.Reference): the first
    turn, a warm follow-up continuing the quantized cache, the same follow-up cold (its logprobs the quantized
    reference's) and on the VLM checkpoint; the model as its own draft speculates to the same tokens
    (speculative decoding's placeholders stand in too)."""
    from tests.support.vlm_fixtures_gemma4 import gemma4_fixture_dir

    root = tmp_path_factory.mktemp("gemma4-text")
    vlm = gemma4_fixture_dir(root)
    path = _gemma4_text_only(vlm, root / layout, layout)
    n = 12

    def chat(rid, messages):
        evs = w.request({"type": "generate", "id": rid, "prompt": {"messages": messages},
                         "params": {"max_tokens": n, "top_logprobs": 1}})
        assert evs[-1]["type"] == "done", evs[-1]  # never `internal`
        return evs, generated_tokens(evs), [lp["logprob"] for e in evs if e["type"] == "token" for lp in e["logprobs"]]

    info = w.load(path, **KV)
    assert info["model_type"] == layout and not info.get("vision")
    ref = Reference(vlm, info["prefill_step_size"], **KV)
    msgs = [{"role": "user", "content": "Describe the picture in a few words."}]
    first, t1, _ = chat("t1", msgs)
    assert t1 == ref.generate(msgs, [], n)[0]
    follow = msgs + [{"role": "assistant", "content": first[-1]["text"]}, {"role": "user", "content": "More?"}]
    warm, t2, _ = chat("t2", follow)
    ids1, text1 = ref.ids(msgs, []), ref.text
    ref.ids(follow, [])
    # the follow-up holds the model's own ids for the answer it continues (PROTOCOL.md, The prompt cache)
    said = t1 + ([first[-1]["stop_token"]] if first[-1].get("stop_token") is not None else [])
    ids2 = continued_ids(ref.proc.tokenizer, text1, ids1, said, ref.text, streamed(path))
    assert stats(warm)["prompt_tokens"] == len(ids2)
    reused = stats(warm)["cached_tokens"]
    common = next((i for i, (a, b) in enumerate(zip(ids1 + said, ids2)) if a != b), len(ids1 + said))
    assert reused == min(common, len(ids2) - 1), (reused, common)
    assert t2 == ref.generate(follow, [], n, ref.cache_at(msgs, [], t1, reused), reused, ids=ids2)[0]
    assert w.request({"type": "cache_clear", "id": "cc"})[-1]["type"] == "done"
    cold, t3, lp3 = chat("t3", follow)  # the same ids: the worker keeps them across a cache_clear
    plain_ref = Reference(vlm, info["prefill_step_size"])
    quant, plain = ref.generate(follow, [], n, ids=ids2), plain_ref.generate(follow, [], n, ids=ids2)
    assert cold[-1]["cached_tokens"] == 0 and t3 == quant[0]
    assert_varied(quant[0], 4, "quantized mlx-vlm")
    closer_to_quantized(lp3, quant[:2], plain[:2], layout)
    assert w.load(vlm, **KV)["vision"] is True  # a new model: its first prompt is tokenized afresh
    assert chat("t4", follow)[1] == ref.generate(follow, [], n)[0]
    for model in (path, vlm):
        w.load(model, draft_model_path=str(model), **KV)
        spec, tokens, _ = chat(f"s-{model.name}", msgs)
        assert stats(spec)["speculative"] == "on"
        assert tokens == t1

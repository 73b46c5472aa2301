"""Gemma 4 audio through the real worker (tiny towers), against mlx-vlm's own generate.

The "e2b" fixture with an audio tower (tests/support/vlm_fixtures_gemma4.py --audio); clips are WAV tones made
by tests.support.vlm_fixtures_gemma3n.wav_bytes. Several clips: mlx-vlm 0.7.10 encodes them as one batch padded
to the longest and scatters the flattened frames, so a clip after a shorter one reads that one's padding
frames instead of its own (pinned below); the worker encodes each clip alone, and two clips, in both
orders, are compared with mlx-vlm's generate where each clip's tokens hold its own soft tokens
(``vlm_generate_clips_alone``).
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.support import reference  # noqa: E402
from tests.support.client import Worker, generated_tokens  # noqa: E402
from tests.process.test_batching import _compare, _stats, run_all  # noqa: E402
from tests.support.prompts import assert_varied  # noqa: E402
from tests.process.test_vision import chat, images, stats  # noqa: E402,F401 (images: a fixture)
from tests.support.vlm_fixtures_gemma3n import (  # noqa: E402
    audio_runs, clip_alone, vlm_generate, vlm_generate_clips_alone, vlm_merge, wav_bytes,
)
from tests.support.vlm_fixtures_gemma4 import gemma4_fixture_dir  # noqa: E402

MAX = 12
QUESTION = "What is this?"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("audio-gemma4")


@pytest.fixture(scope="module")
def clips(root):
    out = {}
    for name, (seconds, freq, rate, channels, seed) in {
        "a": (1.5, 440.0, 16000, 1, 0), "b": (1.5, 880.0, 16000, 1, 1), "short": (0.7, 300.0, 16000, 1, 2),
        "stereo44k": (1.2, 300.0, 44100, 2, 3), "long": (31.0, 440.0, 16000, 1, 4),
    }.items():
        path = root / f"{name}.wav"
        path.write_bytes(wav_bytes(seconds, freq, rate, channels, seed))
        out[name] = str(path)
    return out


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def user(clip_paths, image_paths=(), question=QUESTION):
    return {"role": "user", "content": [{"type": "image", "path": p} for p in image_paths]
            + [{"type": "audio", "path": p} for p in clip_paths] + [{"type": "text", "text": question}]}


def ref_user(n_clips=1):
    return {"role": "user", "content": [{"type": "audio"}] * n_clips + [{"type": "text", "text": QUESTION}]}


def reference_tokens(path, clip_paths, image_paths=(), max_tokens=MAX):
    content = ([{"type": "image"} for _ in image_paths] + [{"type": "audio"} for _ in clip_paths]
               + [{"type": "text", "text": QUESTION}])
    return vlm_generate(path, [{"role": "user", "content": content}], images=list(image_paths),
                        audio=list(clip_paths), max_tokens=max_tokens)


def audio_positions(path, clip):
    from mlx_vlm.utils import load_audio, prepare_inputs

    from tests.support.vlm_fixtures_gemma3n import _LOADED

    reference_tokens(path, [clip], max_tokens=1)  # loads the model into _LOADED
    model, proc = _LOADED[str(path)]
    content = [{"type": "audio"}, {"type": "text", "text": QUESTION}]
    prompt = proc.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                add_generation_prompt=True)
    inp = prepare_inputs(proc, audio=[load_audio(clip, sr=16000)], prompts=prompt, add_special_tokens=False)
    return [i for i, t in enumerate(inp["input_ids"].reshape(-1).tolist()) if t == model.config.audio_token_id]


def _distinct(tokens):
    assert len(set(tokens)) >= 4, tokens
    return tokens


def test_audio_parity_and_cache(worker, root, clips, images):
    path = gemma4_fixture_dir(root, audio=True)
    info = worker.load(path)
    assert info["audio"] is True and info["vision"] is True

    one = _distinct(generated_tokens(chat(worker, "a1", [user([clips["a"]])], MAX)))
    assert one == reference_tokens(path, [clips["a"]])
    other = generated_tokens(chat(worker, "ab", [user([clips["b"]])], MAX))
    assert other == reference_tokens(path, [clips["b"]]) and other != one  # the clip reaches the model
    # two clips of different lengths, in both orders: each clip's own soft tokens (mlx-vlm agrees only
    # longest first)
    for rid, order in (("long-first", ["a", "short"]), ("short-first", ["short", "a"])):
        paths = [clips[k] for k in order]
        ref = vlm_generate_clips_alone(path, [ref_user(len(paths))], paths, MAX)
        assert_varied(ref, 4, what=f"{rid} reference")
        assert generated_tokens(chat(worker, rid, [user(paths)], MAX)) == ref, rid
        if rid == "long-first":
            assert ref == reference_tokens(path, paths)
    st = generated_tokens(chat(worker, "ast", [user([clips["stereo44k"]])], MAX))
    assert st == reference_tokens(path, [clips["stereo44k"]])  # downmixed and resampled as mlx-vlm's
    both = _distinct(generated_tokens(chat(worker, "ai", [user([clips["b"]], [images["a"]])], MAX)))
    assert both == reference_tokens(path, [clips["b"]], [images["a"]])
    text_msgs = [{"role": "user", "content": QUESTION}]
    text = generated_tokens(chat(worker, "at", text_msgs, MAX))
    assert text == reference.generate(path, reference.chat_ids(path, text_msgs), MAX)

    # a follow-up on the same clip: from the cache past the clip, identical to a cold run
    first = chat(worker, "f1", [user([clips["a"]])], MAX)
    answer = "".join(e["text"] for e in first if e["type"] == "token")
    follow = [user([clips["a"]]), {"role": "assistant", "content": answer},
              {"role": "user", "content": "Tell me more."}]
    warm = chat(worker, "f2", follow, MAX)
    assert stats(warm)["cached_tokens"] > audio_positions(path, clips["a"])[-1]
    worker.request({"type": "cache_clear", "id": "cc"})
    cold = chat(worker, "f3", follow, MAX)
    assert stats(cold)["cached_tokens"] == 0 and generated_tokens(cold) == _distinct(generated_tokens(warm))
    # another clip of the same length: a miss at the clip
    changed = [user([clips["b"]])] + follow[1:]
    ch = chat(worker, "f4", changed, MAX)
    assert stats(ch)["cached_tokens"] <= audio_positions(path, clips["b"])[0]


def test_mlx_vlm_reads_a_shorter_clips_padding(root, clips):
    """Upstream pinned (fails once mlx-vlm merges each clip's own frames): transformers' feature extractor
    pads the clips to the longest, and each row's own frames, through the audio tower, are that clip's
    soft tokens alone; mlx-vlm 0.7.10's merge scatters the flattened rows, so a clip after a shorter one
    reads the shorter one's padding frames (longest first happens to be right)."""
    import mlx.core as mx
    from mlx_vlm.utils import load_audio
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    from tests.support.vlm_fixtures_gemma3n import _loaded

    path = gemma4_fixture_dir(root, audio=True)
    model = _loaded(path)[0]
    own = {k: clip_alone(path, clips[k]) for k in ("a", "short")}
    n = {k: v.shape[0] for k, v in own.items()}
    assert n["short"] < n["a"]
    fe = Gemma4AudioFeatureExtractor()  # the checkpoint has no feature-extractor config: its defaults
    for order in (["a", "short"], ["short", "a"]):
        batch = fe([load_audio(clips[k], sr=16000) for k in order], sampling_rate=16000,
                   return_attention_mask=True, return_tensors="np")
        frames, _ = model.audio_tower(mx.array(batch["input_features"]),
                                      ~mx.array(batch["input_features_mask"]).astype(mx.bool_))
        frames = model.embed_audio(frames)  # [2, longest, hidden]
        for i, k in enumerate(order):
            assert mx.allclose(frames[i, :n[k]], own[k], atol=1e-4).item(), (order, k)
        ids, merged = vlm_merge(path, [ref_user(2)], [clips[k] for k in order])
        rows = [merged.inputs_embeds[0, r[0]:r[-1] + 1] for r in audio_runs(path, ids)]
        assert [r.shape[0] for r in rows] == [n[k] for k in order]
        flat = frames.reshape(-1, frames.shape[-1])
        assert mx.allclose(rows[1], flat[n[order[0]]:n[order[0]] + n[order[1]]], atol=1e-4).item()
        right = [mx.array_equal(r, own[k]).item() for r, k in zip(rows, order)]
        assert right == ([True, True] if order[0] == "a" else [True, False]), order


def test_long_clip_and_no_audio_tower(worker, root, clips):
    path = gemma4_fixture_dir(root, audio=True)
    worker.load(path)
    evs = chat(worker, "long", [user([clips["long"]])], 2)  # the feature extractor would cut it at 30 s
    assert evs[-1]["type"] == "error" and evs[-1]["code"] == "invalid_audio", evs[-1]
    info = worker.load(gemma4_fixture_dir(root, variant="moe"))  # the larger models have no audio tower
    assert not info.get("audio") and info["vision"] is True
    evs = chat(worker, "no-tower", [user([clips["a"]])], 2)
    assert evs[-1]["type"] == "error" and evs[-1]["code"] == "invalid_params" and "audio" in evs[-1]["message"]


def test_audio_in_the_batch(root, clips, images):
    path = gemma4_fixture_dir(root, audio=True)
    reqs = [
        {"id": "clip", "prompt": {"messages": [user([clips["a"]])]}, "params": {"max_tokens": MAX}},
        {"id": "clip-image", "prompt": {"messages": [user([clips["short"]], [images["b"]])]},
         "params": {"max_tokens": 16}},
        {"id": "text", "prompt": {"messages": [{"role": "user", "content": "Tell me a story."}]},
         "params": {"max_tokens": 16}},
    ]
    alone, _ = run_all(path, reqs, 1)
    together, _ = run_all(path, reqs, 8)
    _compare(alone, together)
    assert _stats(together["clip"])["concurrent"] >= 2
    assert generated_tokens(alone["clip"]) == reference_tokens(path, [clips["a"]])


def test_clip_embeddings_and_memo(root, clips, monkeypatch):
    """In-process: the prompt's embeddings equal mlx-vlm's ``get_input_embeddings`` over the processor's
    output for the whole prompt; a follow-up on the memoized clip decodes and encodes nothing, and any
    suffix (cut before, inside or after the clip) gives the same rows."""
    import mlx.core as mx
    import msgspec
    from mlx_vlm.utils import load_audio, prepare_inputs

    from tests.support.vlm_fixtures_gemma3n import _LOADED
    from worker.addons import audio as aud
    from worker.loading.model import load
    from worker.prompting.prompt import build_prompt
    from worker.protocol import Generate, LoadOptions

    path = gemma4_fixture_dir(root, audio=True)
    kit = load(str(path), LoadOptions(), lambda f: None)
    req = msgspec.convert({"type": "generate", "id": "g", "prompt": {"messages": [user([clips["a"]])]}},
                          Generate)
    first = build_prompt(kit, req)
    full = first.embed(0)
    reference_tokens(path, [clips["a"]], max_tokens=1)
    model, proc = _LOADED[str(path)]
    content = [{"type": "audio"}, {"type": "text", "text": QUESTION}]
    text = proc.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                              add_generation_prompt=True)
    inp = prepare_inputs(proc, audio=[load_audio(clips["a"], sr=16000)], prompts=text, add_special_tokens=False)
    assert first.ids == inp["input_ids"].reshape(-1).tolist()
    ref = model.get_input_embeddings(inp["input_ids"], None, input_features=inp["input_features"],
                                     input_features_mask=inp["input_features_mask"])
    assert mx.abs(ref.inputs_embeds[0] - full).max().item() == 0.0

    calls = []
    monkeypatch.setattr(aud, "decode", lambda *a, **k: calls.append("decode"))
    monkeypatch.setattr(kit.addon, "encode_audio", lambda *a, **k: calls.append("encode"))
    again = build_prompt(kit, req)
    assert calls == [] and again.ids == first.ids and again.key == first.key
    pos = [i for i, t in enumerate(first.ids) if t == kit.addon.audio_token_id]
    for cut in (1, pos[0], pos[len(pos) // 2], pos[-1] + 1, len(first.ids) - 1):
        assert mx.abs(again.embed(cut) - full[cut:]).max().item() == 0.0, cut


def test_bfloat16_parity(root, clips, images):
    """Stored and run in bfloat16 (load option dtype; "auto" runs float32 on the CPU): still mlx-vlm's."""
    path = gemma4_fixture_dir(root, audio=True, dtype="bfloat16")
    w = Worker()
    try:
        w.load(path, dtype="bfloat16")
        for rid, clip_paths, image_paths in (("c", [clips["a"]], []), ("i", [], [images["a"], images["b"]]),
                                             ("ci", [clips["b"]], [images["a"]])):
            got = _distinct(generated_tokens(chat(w, rid, [user(clip_paths, image_paths)], MAX)))
            assert got == reference_tokens(path, clip_paths, image_paths), rid
    finally:
        w.close()

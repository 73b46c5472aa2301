"""Audio parts through the real worker (Gemma 3n, tiny towers), against mlx-vlm's generate; bad clips.

Clips of different lengths in one prompt: mlx-vlm 0.7.10 encodes them as one batch padded to the longest,
and the padding reaches the shorter clip's last soft token through the audio tower's subsampling
convolution, so that clip's tokens depend on the other clips beside it (pinned below); the worker gives
every clip its own soft tokens, those of a prompt with it alone, and is compared in both orders with
mlx-vlm's generate whose clips hold those (``vlm_generate_clips_alone``).
"""

import base64
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.support.client import Worker, generated_tokens  # noqa: E402
from tests.support.prompts import assert_varied  # noqa: E402
from tests.process.test_vision import chat, stats  # noqa: E402
from tests.support.vlm_fixtures import vlm_fixture_dir  # noqa: E402
from tests.support.vlm_fixtures_gemma3n import (  # noqa: E402
    audio_runs, clip_alone, flac_bytes, gemma3n_fixture_dir, vlm_generate, vlm_generate_clips_alone, vlm_merge,
    wav_bytes, worker_cmd,
)

MAX = 8
QUESTION = "Describe the sound."  # the tiny model's answers to it are varied (to "What is this?": one token)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("audio")


@pytest.fixture(scope="module")
def clips(root):
    out = {}
    for name, (seconds, freq, rate, channels, seed) in {
        "a": (1.5, 440.0, 16000, 1, 0), "b": (1.5, 880.0, 16000, 1, 1), "short": (0.7, 300.0, 16000, 1, 4),
        "stereo44k": (1.2, 300.0, 44100, 2, 2), "long": (31.0, 440.0, 16000, 1, 3),
    }.items():
        path = root / f"{name}.wav"
        path.write_bytes(wav_bytes(seconds, freq, rate, channels, seed))
        out[name] = str(path)
    flac = root / "a.flac"  # the samples of a.wav
    flac.write_bytes(flac_bytes(1.5, 440.0, 16000, 1, 0))
    out["flac"] = str(flac)
    return out


@pytest.fixture(scope="module")
def worker():
    w = Worker(cmd=worker_cmd())
    yield w
    w.close()


def user(part, question=QUESTION):
    return {"role": "user", "content": [part, {"type": "text", "text": question}]}


def ref_user(question=QUESTION):
    return {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": question}]}


def audio_positions(path, clip):
    from mlx_vlm.utils import prepare_inputs

    from tests.support.vlm_fixtures_gemma3n import _LOADED

    vlm_generate(path, [ref_user()], max_tokens=1)
    model, proc = _LOADED[str(path)]
    prompt = proc.tokenizer.apply_chat_template([ref_user()], tokenize=False, add_generation_prompt=True)
    inp = prepare_inputs(proc, audio=[clip], prompts=prompt, add_special_tokens=False)
    return [i for i, t in enumerate(inp["input_ids"].reshape(-1).tolist()) if t == model.config.audio_token_id]


def test_audio_question_and_follow_up(worker, root, clips):
    path = gemma3n_fixture_dir(root)
    info = worker.load(path)
    assert info["audio"] is True and "audio" in worker.ready["capabilities"]
    part = {"type": "audio", "path": clips["a"]}

    one = chat(worker, "a-1", [user(part)], MAX)
    tokens = generated_tokens(one)
    assert tokens == vlm_generate(path, [ref_user()], audio=[clips["a"]], max_tokens=MAX)
    assert_varied(tokens, 4, what="one clip's answer")
    other = generated_tokens(chat(worker, "a-b", [user({"type": "audio", "path": clips["b"]})], MAX))
    assert other == vlm_generate(path, [ref_user()], audio=[clips["b"]], max_tokens=MAX)
    assert other != tokens  # the clip reaches the model
    # resampled and downmixed like mlx-vlm's load_audio
    st = generated_tokens(chat(worker, "a-st", [user({"type": "audio", "path": clips["stereo44k"]})], MAX))
    assert st == vlm_generate(path, [ref_user()], audio=[clips["stereo44k"]], max_tokens=MAX)
    # FLAC: the same samples, the same answer (mlx-vlm too)
    flac = generated_tokens(chat(worker, "a-flac", [user({"type": "audio", "path": clips["flac"]})], MAX))
    assert flac == tokens == vlm_generate(path, [ref_user()], audio=[clips["flac"]], max_tokens=MAX)
    # the same bytes as base64 data (plain and as a data: URL): the same answer
    b64 = base64.b64encode(open(clips["a"], "rb").read()).decode()
    for rid, data in (("a-data", b64), ("a-url", "data:audio/wav;base64," + b64)):
        assert generated_tokens(chat(worker, rid, [user({"type": "audio", "data": data})], MAX)) == tokens

    answer = "".join(e["text"] for e in one if e["type"] == "token")
    follow = [user(part), {"role": "assistant", "content": answer}, {"role": "user", "content": "Tell me more."}]
    warm = chat(worker, "a-2", follow, MAX)
    assert stats(warm)["cached_tokens"] > audio_positions(path, clips["a"])[-1]
    ref_follow = [ref_user(), {"role": "assistant", "content": answer}, {"role": "user", "content": "Tell me more."}]
    assert generated_tokens(warm) == vlm_generate(path, ref_follow, audio=[clips["a"]], max_tokens=MAX)
    worker.request({"type": "cache_clear", "id": "a-cc"})
    cold = chat(worker, "a-3", follow, MAX)
    assert stats(cold)["cached_tokens"] == 0 and generated_tokens(cold) == generated_tokens(warm)
    # another clip in the same place: a miss at the clip, not a stale hit
    changed = [user({"type": "audio", "path": clips["b"]})] + follow[1:]
    ch = chat(worker, "a-4", changed, MAX)
    assert stats(ch)["cached_tokens"] <= audio_positions(path, clips["b"])[0]


def test_text_prompt_with_audio(worker, root, clips):
    path = gemma3n_fixture_dir(root)
    worker.load(path)
    evs = worker.request({"type": "generate", "id": "tp", "params": {"max_tokens": MAX},
                          "prompt": {"text": "<bos><start_of_turn>user\n<audio_soft_token>" + QUESTION
                                             + "<end_of_turn>\n<start_of_turn>model\n",
                                     "add_special_tokens": False,
                                     "audio": [{"type": "audio", "path": clips["a"]}]}})
    assert generated_tokens(evs) == vlm_generate(path, [ref_user()], audio=[clips["a"]], max_tokens=MAX)
    evs = worker.request({"type": "generate", "id": "tp2", "params": {"max_tokens": 2},
                          "prompt": {"text": "no placeholder", "audio": [{"type": "audio", "path": clips["a"]}]}})
    assert evs[-1]["type"] == "error" and evs[-1]["code"] == "invalid_params"


def test_bad_audio(worker, root, clips):
    path = gemma3n_fixture_dir(root)
    worker.load(path)
    good = generated_tokens(chat(worker, "ok", [user({"type": "audio", "path": clips["a"]})], MAX))
    raw = open(clips["a"], "rb").read()
    big = root / "big.wav"
    with open(big, "wb") as f:
        f.truncate((64 << 20) + 1)
    junk = root / "junk.bin"
    junk.write_bytes(os.urandom(4096))
    bad = {
        "undecodable": ({"type": "audio", "data": base64.b64encode(os.urandom(2048)).decode()}, "not a WAV"),
        "corrupt-wav": ({"type": "audio", "data": base64.b64encode(raw[:12] + b"\0" * 64).decode()}, "WAV"),
        "junk-file": ({"type": "audio", "path": str(junk)}, "not a WAV"),
        "corrupt-flac": ({"type": "audio", "data": base64.b64encode(b"fLaC" + os.urandom(300)).decode()}, "FLAC"),
        "ogg": ({"type": "audio", "data": base64.b64encode(b"OggS" + bytes(200)).decode()}, "not a WAV"),
        "not-base64": ({"type": "audio", "data": "!!!not base64!!!"}, "base64"),
        "too-long": ({"type": "audio", "path": clips["long"]}, "at most 30 s"),
        "too-big": ({"type": "audio", "path": str(big)}, "larger than 64 MiB"),
        "missing": ({"type": "audio", "path": str(root / "nope.wav")}, "cannot read"),
        "relative": ({"type": "audio", "path": "a.wav"}, "absolute"),
        "both": ({"type": "audio", "path": clips["a"], "data": "AAAA"}, "exactly one"),
        "empty": ({"type": "audio", "data": ""}, "empty"),
    }
    for rid, (part, words) in bad.items():
        evs = chat(worker, rid, [user(part)], 2)
        assert evs[-1]["type"] == "error" and evs[-1]["code"] == "invalid_audio", (rid, evs[-1])
        assert words in evs[-1]["message"], (rid, evs[-1]["message"])
    assert generated_tokens(chat(worker, "after-bad", [user({"type": "audio", "path": clips["a"]})], MAX)) == good


def test_audio_to_a_model_without_an_audio_tower(worker, root, clips):
    from tests.support.fixtures import fixture_dir

    part = {"type": "audio", "path": clips["a"]}
    for name, model in (("gemma3", vlm_fixture_dir("gemma3", root)), ("llama", fixture_dir("llama", root))):
        info = worker.load(model)
        assert not info.get("audio")
        evs = chat(worker, f"no-audio-{name}", [user(part)], 2)
        assert evs[-1]["type"] == "error" and evs[-1]["code"] == "invalid_params", evs[-1]
        assert "audio" in evs[-1]["message"]
        text = chat(worker, f"text-{name}", [{"role": "user", "content": QUESTION}], 2)
        assert text[-1]["type"] == "done"


def test_two_clips_and_an_image(worker, root, clips):
    """Several clips (each processed alone) and clips beside an image. Clips of one length: mlx-vlm's
    tokens (it pads the clips of one prompt to the longest; clips of one length pad alike). Clips of
    different lengths, in both orders: mlx-vlm with each clip's own soft tokens."""
    import numpy as np
    from PIL import Image

    path = gemma3n_fixture_dir(root)
    worker.load(path)
    img = root / "i.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(img)
    def msg(*parts):
        return [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}]

    a, b = ({"type": "audio", "path": clips[k]} for k in "ab")
    got = generated_tokens(chat(worker, "two", msg(a, b), MAX))
    assert got == vlm_generate(path, msg({"type": "audio"}, {"type": "audio"}), audio=[clips["a"], clips["b"]],
                               max_tokens=MAX)
    # clips of different lengths, both orders: each clip's own soft tokens
    for rid, order in (("long-first", "a short"), ("short-first", "short a")):
        paths = [clips[k] for k in order.split()]
        ref = vlm_generate_clips_alone(path, msg({"type": "audio"}, {"type": "audio"}), paths, MAX)
        assert_varied(ref, 3, what=f"{rid} reference")
        got = generated_tokens(chat(worker, rid, msg(*({"type": "audio", "path": p} for p in paths)), MAX))
        assert got == ref, rid
    mixed = msg({"type": "image", "path": str(img)}, a)
    ref_mixed = msg({"type": "image"}, {"type": "audio"})
    got = generated_tokens(chat(worker, "mixed", mixed, MAX))
    assert got == vlm_generate(path, ref_mixed, images=[str(img)], audio=[clips["a"]], max_tokens=MAX)


def test_mlx_vlm_pads_the_shorter_clip(root, clips):
    """Upstream pinned (fails once mlx-vlm encodes each clip alone, or masks its padding out): beside a
    longer clip, in either order, the shorter clip's last real soft token in mlx-vlm's merge differs from
    the clip's own; every other audio token (the padding tail included) is the clip's own."""
    import mlx.core as mx

    path = gemma3n_fixture_dir(root)
    own = {k: clip_alone(path, clips[k]) for k in ("a", "short")}
    real = {k: int(mx.any(v != v[-1:], axis=-1).sum().item()) for k, v in own.items()}  # before the padding tail
    assert real["short"] < real["a"]
    two = [{"role": "user", "content": [{"type": "audio"}, {"type": "audio"}, {"type": "text", "text": QUESTION}]}]
    for order in (["a", "short"], ["short", "a"]):
        ids, merged = vlm_merge(path, two, [clips[k] for k in order])
        for run, k in zip(audio_runs(path, ids), order):
            rows = merged.inputs_embeds[0, run[0]:run[-1] + 1]
            assert rows.shape == own[k].shape
            differ = mx.any(rows != own[k], axis=-1).tolist()
            assert [i for i, d in enumerate(differ) if d] == ([real[k] - 1] if k == "short" else []), (order, k)


def test_memoized_clip_costs_nothing_on_the_follow_up(root, clips, monkeypatch):
    """In-process: a follow-up on a memoized clip decodes, processes and encodes nothing; embeddings of
    any suffix equal the same rows of the whole prompt's, which equal mlx-vlm's (scale-patched) merge
    over the processor's output for the whole prompt."""
    import mlx.core as mx
    import msgspec
    from mlx_vlm.utils import prepare_inputs

    from tests.support.vlm_fixtures_gemma3n import patch_mlx_vlm
    from worker.addons import audio as aud
    from worker.loading.model import load
    from worker.prompting.prompt import build_prompt
    from worker.protocol import Generate, LoadOptions

    patch_mlx_vlm()
    kit = load(str(gemma3n_fixture_dir(root)), LoadOptions(), lambda f: None)
    addon = kit.addon
    req = msgspec.convert({"type": "generate", "id": "g", "prompt": {"messages": [
        user({"type": "audio", "path": clips["a"]})]}}, Generate)
    first = build_prompt(kit, req)
    full = first.embed(0)
    text = kit.tokenizer.apply_chat_template([ref_user()], tokenize=False, add_generation_prompt=True)
    ref_in = prepare_inputs(addon.processor, audio=[clips["a"]], prompts=text, add_special_tokens=False)
    assert first.ids == ref_in["input_ids"].reshape(-1).tolist()
    from tests.support.vlm_fixtures_gemma3n import _LOADED

    vlm_generate(gemma3n_fixture_dir(root), [ref_user()], max_tokens=1)
    model, _ = _LOADED[str(gemma3n_fixture_dir(root))]  # mlx-vlm's own Model of the same checkpoint
    ref = model.get_input_embeddings(ref_in["input_ids"], None, input_features=ref_in["input_features"],
                                     input_features_mask=ref_in["input_features_mask"])
    assert mx.abs(ref.inputs_embeds[0] - full).max().item() == 0.0

    calls = []
    monkeypatch.setattr(aud, "decode", lambda *a, **k: calls.append("decode"))
    monkeypatch.setattr(addon, "encode_audio", lambda *a, **k: calls.append("encode"))
    monkeypatch.setattr(addon, "_process_audio", lambda *a, **k: calls.append("process"))
    again = build_prompt(kit, req)
    assert calls == [] and again.ids == first.ids and again.key == first.key
    pos = [i for i, t in enumerate(first.ids) if t == addon.audio_token_id]
    for cut in (1, pos[0], pos[0] + 1, pos[len(pos) // 2], pos[-1], pos[-1] + 1, len(first.ids) - 1):
        part = again.embed(cut)
        assert part.shape[0] == len(first.ids) - cut
        assert mx.abs(part - full[cut:]).max().item() == 0.0, cut

"""MP3 clips through the real worker (Gemma 3n, tiny towers), against mlx-vlm's generate on the same file.
The clips are encoded in the test with LAME (lameenc, a test dependency on Linux); MP3 is lossy, so the
reference is mlx-vlm reading the same MP3, not the WAV it was made from."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

lameenc = pytest.importorskip("lameenc")

from tests.support.client import Worker, generated_tokens  # noqa: E402
from tests.support.prompts import assert_varied  # noqa: E402
from tests.families.test_audio_gemma3n import MAX, ref_user, user  # noqa: E402
from tests.process.test_vision import chat, stats  # noqa: E402
from tests.support.vlm_fixtures_gemma3n import _pcm, gemma3n_fixture_dir, vlm_generate, worker_cmd  # noqa: E402


def mp3_bytes(seconds, freq, rate, channels, seed, kbps=128) -> bytes:
    enc = lameenc.Encoder()
    enc.set_bit_rate(kbps)
    enc.set_in_sample_rate(rate)
    enc.set_channels(channels)
    enc.set_quality(2)
    pcm = _pcm(seconds, freq, rate, channels, seed)
    return bytes(enc.encode(pcm.tobytes()) + enc.flush())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("mp3")


@pytest.fixture(scope="module")
def worker():
    w = Worker(cmd=worker_cmd())
    yield w
    w.close()


def test_mp3_question_follow_up_and_a_broken_file(worker, root):
    path = gemma3n_fixture_dir(root)
    worker.load(path)
    clips = {}
    for name, spec in {"mono16k": (1.5, 440.0, 16000, 1, 0), "stereo44k": (1.2, 660.0, 44100, 2, 1)}.items():
        clips[name] = root / f"{name}.mp3"
        clips[name].write_bytes(mp3_bytes(*spec))
    answers = {}
    for name, clip in clips.items():
        evs = chat(worker, f"mp3-{name}", [user({"type": "audio", "path": str(clip)})], MAX)
        answers[name] = generated_tokens(evs)
        assert answers[name] == vlm_generate(path, [ref_user()], audio=[str(clip)], max_tokens=MAX)
        assert_varied(answers[name], 4, what=f"{name} answer")
    assert answers["mono16k"] != answers["stereo44k"]

    part = {"type": "audio", "path": str(clips["mono16k"])}
    text = "".join(e["text"] for e in chat(worker, "mp3-f1", [user(part)], MAX) if e["type"] == "token")
    follow = [user(part), {"role": "assistant", "content": text}, {"role": "user", "content": "Tell me more."}]
    warm = chat(worker, "mp3-f2", follow, MAX)
    assert stats(warm)["cached_tokens"] > 188  # past the clip's audio tokens
    ref = [ref_user(), {"role": "assistant", "content": text}, {"role": "user", "content": "Tell me more."}]
    assert generated_tokens(warm) == vlm_generate(path, ref, audio=[str(clips["mono16k"])], max_tokens=MAX)

    # a frame header and no frames after it: recognised as MP3, but no audio decodes from it
    bad = root / "bad.mp3"
    bad.write_bytes(clips["mono16k"].read_bytes()[:4])
    err = chat(worker, "mp3-bad", [user({"type": "audio", "path": str(bad)})], MAX)[-1]
    assert err["type"] == "error" and err["code"] == "invalid_audio", err
    assert worker.request({"type": "status", "id": "mp3-st"})[-1]["type"] == "done"

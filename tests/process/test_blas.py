"""Issue 9 through the real process: the optimized BLAS is really mapped, and the worker runs without it."""

import os

import pytest

from tests.support import reference as ref
from tests.support.client import Worker, generated_tokens

HAVE_OPENBLAS = any(os.path.exists(f"/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0")
                    for arch in ("x86_64", "aarch64"))


def _mapped(pid):
    with open(f"/proc/{pid}/maps") as fh:
        return fh.read()


@pytest.mark.skipif(not HAVE_OPENBLAS, reason="libopenblas0-pthread is not installed (make setup installs it)")
def test_fast_path_is_active_and_exact(llama_dir):
    w = Worker()
    try:
        blas = w.ready["device"]["blas"]
        assert blas["name"] == "openblas" and blas["preloaded"] is True
        maps = _mapped(w.ready["pid"])
        assert os.path.realpath(blas["path"]) in maps or blas["path"] in maps
        assert w.ready["device"]["compute_dtype"] == "float32"
        w.load(llama_dir)
        events = w.request({"type": "generate", "id": "g", "prompt": {"text": "blas check"},
                            "params": {"max_tokens": 16}})
        # the reference runs in this test process, on MLX's reference BLAS
        assert generated_tokens(events) == ref.generate(llama_dir, ref.text_ids(llama_dir, "blas check"), 16)
    finally:
        w.close()


def test_runs_on_reference_blas_and_says_so_once(llama_dir):
    w = Worker(env={"MLX_WORKER_BLAS": "off"})
    try:
        assert w.ready["device"]["blas"]["name"] == "reference"
        assert "openblas-pthread" not in _mapped(w.ready["pid"])  # numpy's prefixed copy may be mapped
        w.load(llama_dir)
        events = w.request({"type": "generate", "id": "g", "prompt": {"text": "no blas"},
                            "params": {"max_tokens": 8}})
        assert generated_tokens(events) == ref.generate(llama_dir, ref.text_ids(llama_dir, "no blas"), 8)
        w.close()
        log = "".join(w.stderr_lines)
        assert log.count("reference BLAS") == 1, log
    finally:
        w.close()

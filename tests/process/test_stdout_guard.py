"""Acceptance: code printing to stdout inside the worker (Python print, C-level write) cannot corrupt the stream.

The printing code is a checkpoint's own `model_file`, loaded with trust_remote_code: exactly the
kind of third-party code that prints.
"""

import json
import shutil

from tests.support import reference as ref
from tests.support.client import Worker, generated_tokens

NOISY = '''
import ctypes, os, sys
from mlx_lm.models.llama import Model as _Model, ModelArgs

print("python print at import")
os.write(1, b"raw fd-1 write at import\\n")
libc = ctypes.CDLL(None)
libc.printf(b"C printf at import\\n")
libc.fflush(None)


class Model(_Model):
    def __call__(self, *args, **kwargs):
        print("python print in forward", flush=True)
        os.write(1, b"raw write in forward\\n")
        libc.puts(b"C puts in forward")
        libc.fflush(None)
        return super().__call__(*args, **kwargs)
'''


def test_prints_do_not_reach_the_stream(llama_dir, tmp_path):
    d = tmp_path / "noisy"
    shutil.copytree(llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_file"] = "noisy.py"
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "noisy.py").write_text(NOISY)
    w = Worker()
    try:
        w.load(d, trust_remote_code=True)
        events = w.request({"type": "generate", "id": "g", "prompt": {"text": "hello"},
                            "params": {"max_tokens": 5}})
        assert generated_tokens(events) == ref.generate(llama_dir, ref.text_ids(llama_dir, "hello"), 5)
        w.close()
        w.wait_eof()
        # every stdout line was a protocol event (the client json-decodes each one)
        assert all(json.loads(line)["type"] for line in w.raw_lines)
        noise = "".join(w.stderr_lines)
        for marker in ("python print at import", "raw fd-1 write at import", "C printf at import",
                       "python print in forward", "C puts in forward"):
            assert marker in noise, marker
    finally:
        w.close()

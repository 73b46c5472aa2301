"""`pip install .` into a fresh virtual environment outside the repo gives a working `mlx-worker`; the worker
needs neither model_prep/ nor its `prep` extra (gguf)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import reference
from tests.support.client import Worker, generated_tokens
from tests.unit.test_lock import LOCKS

ROOT = Path(__file__).resolve().parents[2]
UV = ROOT / ".venv" / "tools" / "bin" / "uv"


# Imported first by every Python process of the worker (its BLAS re-exec included): gguf and model_prep
# unimportable, as after `pip install .` without the prep extra.
NO_PREP = '''
import sys
sys.modules["gguf"] = None
sys.modules["model_prep"] = None
print("NO PREP ACTIVE", file=sys.stderr, flush=True)
'''


def test_the_worker_runs_without_model_prep_or_gguf(tmp_path, llama_dir):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_PREP)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    probe = subprocess.run([sys.executable, "-c", "import gguf"], env={**os.environ, **env}, cwd=ROOT,
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "gguf" in probe.stderr  # the block holds
    w = Worker(env=env)
    try:
        w.load(llama_dir)
        ids = reference.text_ids(llama_dir, "hello world")
        events = w.request({"type": "generate", "id": "g", "prompt": {"tokens": ids},
                            "params": {"max_tokens": 8, "temperature": 0}})
        assert events[-1]["type"] == "done", events[-1]
        assert generated_tokens(events) == reference.generate(llama_dir, ids, 8, dtype="float32")
        assert any("NO PREP ACTIVE" in line for line in w.stderr_lines)
    finally:
        w.close()


@pytest.mark.slow
def test_pip_install_gives_a_working_console_script(tmp_path, llama_dir):
    if not UV.exists():
        pytest.skip("uv is installed by `make setup`")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # a regular (not editable) install of the package from its source tree, versions held to the lock
    lock = LOCKS / "requirements-linux-cpu.txt" if sys.platform == "linux" else LOCKS / "requirements-macos.txt"
    subprocess.run([str(UV), "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"),
                    str(ROOT), "--constraint", str(lock), "--build-constraint", str(lock)],
                   check=True, cwd=tmp_path)
    script = venv / "bin" / "mlx-worker"
    assert script.exists()
    w = Worker(cmd=[str(script)], cwd=tmp_path)  # outside the repo: nothing is imported from it
    try:
        assert w.ready["protocol_version"]
        w.load(llama_dir)
        ids = reference.text_ids(llama_dir, "hello world")
        events = w.request({"type": "generate", "id": "g", "prompt": {"tokens": ids},
                            "params": {"max_tokens": 8, "temperature": 0}})
        assert events[-1]["type"] == "done", events[-1]
        assert generated_tokens(events) == reference.generate(llama_dir, ids, 8, dtype="float32")
        out = subprocess.run([str(venv / "bin" / "python"), "-c", "import worker; print(worker.__file__)"],
                             capture_output=True, text=True, cwd=tmp_path, check=True).stdout
        assert str(venv) in out  # the installed copy, not the checkout
        gguf = subprocess.run([str(venv / "bin" / "python"), "-c", "import gguf"], capture_output=True, cwd=tmp_path)
        assert gguf.returncode != 0  # model_prep's dependency is an extra (prep), not the worker's
    finally:
        w.close()

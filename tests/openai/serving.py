"""The OpenAI server (``python -m openai_server``) as a subprocess on a free loopback port, for the tests."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-test-key"


def thinker_dir(root) -> Path:
    """The Hermes-style tool fixture (tests/support/tool_fixtures.py) driven to close its thinking block where it
    would emit some mid-answer token: with ``think_open`` its answers start with reasoning, then the answer."""
    from tests.support import reference
    from tests.support.tool_fixtures import drive_marker, tool_fixture_dir

    src = tool_fixture_dir("hermes", root)
    _, tok = reference.load_model(src)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    plain = reference.generate(src, tok.apply_chat_template(ask, add_generation_prompt=True, think_open=True), 30)
    special = set(tok.all_special_ids)
    x = next(t for t in plain[6:] if t not in special and plain.index(t) >= 6)
    return drive_marker(src, Path(root) / "thinker", "</think>", x)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, *args, api_key=KEY, timeout=120):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.api_key = api_key
        self.log = tempfile.NamedTemporaryFile("w+", prefix="openai-server-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "openai_server", "--model", str(model), "--port", str(self.port),
               "--log-level", "warning", *(["--api-key", api_key] if api_key else []), *map(str, args)]
        env = {k: v for k, v in os.environ.items() if k != "MLX_WORKER_API_KEY"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.health(quiet=True) is None:
            assert self.proc.poll() is None, f"the server exited ({self.proc.returncode}):\n{self.output()}"
            assert time.monotonic() < deadline, f"the server did not come up:\n{self.output()}"
            time.sleep(0.1)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-4000:]

    def health(self, quiet=False):
        """/health's body with its status code, or None while nothing listens (or it is not ready, if quiet)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return None if quiet else (e.code, json.loads(e.read()))
        except OSError:
            return None

    def wait_idle(self, timeout=5.0) -> float:
        """Seconds until the worker runs nothing (its status, through /health)."""
        t0 = time.monotonic()
        while True:
            h = self.health()
            if h and h[0] == 200 and not h[1]["running"] and not h[1]["queue"]:
                return time.monotonic() - t0
            assert time.monotonic() - t0 < timeout, f"still running after {timeout} s: {h}"
            time.sleep(0.02)

    def client(self, **kw):
        import openai

        return openai.OpenAI(**{"base_url": self.base_url, "api_key": self.api_key or "none", "max_retries": 0, "timeout": 60, **kw})

    def async_client(self, **kw):
        import openai

        return openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key or "none", max_retries=0, timeout=60,
                                  **kw)

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def main(argv=None) -> None:
    """For the Node tests (tests/openai/node): ``thinker ROOT`` prints the fixture's path; ``greedy MODEL N
    MESSAGES_JSON`` prints mlx-lm's greedy answer (JSON text) of N tokens."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["thinker", "greedy"])
    ap.add_argument("args", nargs="+")
    a = ap.parse_args(argv)
    if a.what == "thinker":
        print(thinker_dir(a.args[0]))
    else:
        from tests.support import reference

        model, n, messages = a.args[0], int(a.args[1]), json.loads(a.args[2])
        print(json.dumps(reference.decode(model, reference.generate(model, reference.chat_ids(model, messages), n))))


if __name__ == "__main__":
    main()

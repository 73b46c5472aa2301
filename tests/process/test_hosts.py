"""Host examples: shell scripts (jq) and the asyncio client, on the tiny fixture."""
import asyncio
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.client import Worker

ROOT = Path(__file__).resolve().parents[2]
SHELL = ROOT / "host_examples" / "shell"
sys.path.insert(0, str(ROOT / "host_examples" / "python"))
needs_jq = pytest.mark.skipif(not shutil.which("jq"), reason="jq not installed")


def _env(model):
    return {**os.environ, "MODEL": str(model), "WORKER_CMD": f"{sys.executable} -m worker"}


@needs_jq
def test_summarize_matches_worker(llama_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog.\nIt was a sunny day.\n")
    out = subprocess.run([str(SHELL / "summarize.sh"), str(doc)], env={**_env(llama_dir), "MAX_TOKENS": "12"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    w = Worker()
    try:
        w.load(llama_dir)
        done = w.request({"type": "generate", "id": "g", "prompt": {"messages": [
            {"role": "system", "content": "Summarize the user text in a few sentences."},
            {"role": "user", "content": doc.read_text()}]}, "params": {"max_tokens": 12}})[-1]
    finally:
        w.close()
    assert out.stdout == done["text"] + "\n"


@needs_jq
def test_describe_image_reports_unsupported(llama_dir, tmp_path):
    img = tmp_path / "cat.png"
    img.write_bytes(b"\x89PNG\r\n\x1a\n")
    out = subprocess.run([str(SHELL / "describe_image.sh"), str(img)], env=_env(llama_dir),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 3
    assert "does not accept image" in out.stderr and "invalid_params" in out.stderr


def test_async_client(llama_dir):
    from async_client import AsyncWorker, WorkerError

    async def main():
        async with AsyncWorker(cwd=ROOT) as w:
            await w.load(llama_dir)
            evs = [ev async for ev in w.generate({"text": "hello"}, {"max_tokens": 5})]
            assert evs[-1]["stop_reason"] == "max_tokens"
            assert "".join(e["text"] for e in evs if e["type"] == "token") == evs[-1]["text"]
            # cancel while decoding
            got = []
            async for ev in w.generate({"text": "x"}, {"max_tokens": 100000}, id="long"):
                got.append(ev)
                if ev["type"] == "token" and len([e for e in got if e["type"] == "token"]) == 1:
                    assert (await w.cancel("long"))["cancelled"] is True
            assert got[-1]["stop_reason"] == "cancelled"
            # crash: error with stderr tail, then the client restarts the worker
            gen = w.generate({"text": "x"}, {"max_tokens": 100000})
            await gen.__anext__()
            w.proc.send_signal(signal.SIGKILL)
            with pytest.raises(WorkerError, match="stderr tail"):
                async for _ in gen:
                    pass
            for _ in range(200):
                if w.restarts == 1 and w.ready and w.proc.returncode is None:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            await w.load(llama_dir)
            done = await w.result({"type": "generate", "prompt": {"text": "hi"}, "params": {"max_tokens": 2}})
            assert done["stop_reason"] == "max_tokens"

    asyncio.run(main())


@pytest.mark.real_model
def test_the_agent_example_runs_two_tools_on_the_default_model(smollm2_dir, capsys):
    """host_examples/python/agent_tools.py on SmolLM2: a forced first call, the host runs it, the result goes
    back, and the follow-up reuses the whole first turn (the call included) from the prompt cache."""
    import json

    from agent_tools import TOOLS, agent, run_tool

    out = asyncio.run(agent(str(smollm2_dir), "What is the weather in Paris, in Fahrenheit?", 3, 96))
    msgs = out["messages"]
    assert out["steps"] >= 2 and msgs[1]["role"] == "assistant" and msgs[1]["tool_calls"]
    call = msgs[1]["tool_calls"][0]["function"]
    assert call["name"] in {t["function"]["name"] for t in TOOLS}
    assert msgs[2] == {"role": "tool", "tool_call_id": msgs[1]["tool_calls"][0]["id"],
                       "content": run_tool(call["name"], json.loads(call["arguments"]))}
    lines = capsys.readouterr().out.splitlines()
    first = next(x for x in lines if x.startswith("step 0: tool_calls"))
    second = next(x for x in lines if x.startswith("step 1: ") and x.endswith("from the cache"))
    prompt0 = int(first.split(" of ")[1].split()[0])
    cached1 = int(second.split(", ")[1].split(" of ")[0])
    assert cached1 > prompt0  # the first prompt and the call's tokens

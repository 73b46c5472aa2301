"""openai_server's translation, without a worker: OpenAI request bodies -> the worker's generate, the worker's
events -> OpenAI's objects (parallel calls, reasoning, usage), and the worker's error codes -> HTTP."""
import pytest

from openai_server import errors
from openai_server.requests import chat_job, completion_job
from openai_server.responses import Turn

HI = [{"role": "user", "content": "hi"}]


def _err(fn, *a):
    with pytest.raises(errors.ApiError) as e:
        fn(*a)
    return e.value.status, e.value.param


def test_a_chat_body_becomes_a_generate():
    job = chat_job({"model": "m", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "be"}, {"type": "text", "text": "brief"}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                                     {"type": "text", "text": "what?"}]},
        {"role": "assistant", "content": None, "reasoning_content": "hmm", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}],
        "max_completion_tokens": 7, "stop": "END", "temperature": 0.5, "seed": 3, "logprobs": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "required",
        "chat_template_kwargs": {"enable_thinking": False}, "prompt_cache_key": "conv-1", "user": "u",
        "stream": True, "stream_options": {"include_usage": True}})
    g = job.generate
    assert g["prompt"]["messages"] == [
        {"role": "system", "content": "be\nbrief"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                                     {"type": "text", "text": "what?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"}]
    assert g["params"] == {"max_tokens": 7, "stop": ["END"], "temperature": 0.5, "seed": 3, "top_logprobs": 1,
                           "json_schema": {"type": "object"}}
    assert g["prompt"]["tool_choice"] == "required" and g["prompt"]["template_kwargs"] == {"enable_thinking": False}
    assert g["cache_key"] == "conv-1" and job.stream and job.include_usage and job.logprobs == 0
    assert job.max_tokens_name == "max_completion_tokens"


@pytest.mark.parametrize("body, param", [
    ({"n": 3}, "n"), ({"functions": []}, "functions"), ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"temperature": "hot"}, "temperature"), ({"seed": True}, "seed"),
    ({"stop": [1]}, "stop"), ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"messages": []}, "messages"), ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "relative.png"}}]}]},
     "messages[0].content[0].image_url.url"),
    ({"tool_choice": "required"}, "tool_choice"), ({"tools": [{"type": "retrieval"}]}, "tools"),
])
def test_bad_chat_bodies_are_400_naming_the_field(body, param):
    assert _err(chat_job, {"model": "m", "messages": HI, **body}) == (400, param)


def test_local_files_can_be_turned_off():
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///tmp/a.png"}}]}]}
    assert chat_job(body).generate["prompt"]["messages"][0]["content"][0]["image_url"]["url"] == "file:///tmp/a.png"
    assert _err(chat_job, body, False) == (400, "messages[0].content[0].image_url.url")


def test_a_completion_body():
    job = completion_job({"model": "m", "prompt": ["once"], "logprobs": 3})
    assert job.generate["prompt"] == {"text": "once"} and job.generate["params"] == {"max_tokens": 16,
                                                                                    "top_logprobs": 3}
    assert completion_job({"model": "m", "prompt": [1, 2, 3]}).generate["prompt"] == {"tokens": [1, 2, 3]}
    for body, param in (({"prompt": ["a", "b"]}, "prompt"), ({"prompt": "a", "echo": True}, "echo"),
                        ({"prompt": "a", "best_of": 2}, "best_of"), ({}, "prompt"), ({"prompt": "a", "logprobs": 9},
                                                                                      "logprobs")):
        assert _err(completion_job, {"model": "m", **body}) == (400, param)


def _events():
    call = lambda i, city: {"type": "tool_call", "id": "r", "index": i, "tokens": [1], "call": {  # noqa: E731
        "id": f"call_{i}", "type": "function", "function": {"name": "w", "arguments": f'{{"city": "{city}"}}'}}}
    calls = [call(0, "Paris")["call"], call(1, "Rome")["call"]]
    return [{"type": "progress", "id": "r", "stage": "prompt", "fraction": 0.0},
            {"type": "token", "id": "r", "text": "let me see", "tokens": [5, 6], "channel": "reasoning"},
            {"type": "token", "id": "r", "text": "", "tokens": [7], "channel": "answer"},
            call(0, "Paris"), call(1, "Rome"),
            {"type": "stats", "id": "r", "prompt_tokens": 50, "cached_tokens": 40, "generated_tokens": 12,
             "reasoning_tokens": 2},
            {"type": "done", "id": "r", "request": "generate", "stop_reason": "tool_calls", "text": "",
             "reasoning": "let me see", "tool_calls": calls}]


def test_parallel_calls_and_reasoning_as_chunks_and_as_a_whole():
    turn = Turn("chatcmpl-1", "m", True, None)
    chunks = [c for ev in _events() for c in turn.add(ev)]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"reasoning_content": "let me see"}
    assert [d["tool_calls"][0]["index"] for d in deltas[1:]] == [0, 1]
    assert [d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:]] == ['{"city": "Paris"}',
                                                                               '{"city": "Rome"}']
    assert not any("content" in d for d in deltas)
    assert turn.last_chunk()["choices"][0]["finish_reason"] == "tool_calls"
    whole = turn.response()
    msg = whole["choices"][0]["message"]
    assert msg["content"] is None and msg["reasoning_content"] == "let me see" and len(msg["tool_calls"]) == 2
    assert whole["usage"] == {"prompt_tokens": 50, "completion_tokens": 12, "total_tokens": 62,
                              "prompt_tokens_details": {"cached_tokens": 40},
                              "completion_tokens_details": {"reasoning_tokens": 2}}
    assert turn.usage_chunk()["choices"] == [] and turn.usage_chunk()["usage"] == whole["usage"]


@pytest.mark.parametrize("code, status", [("invalid_params", 400), ("context_overflow", 400), ("queue_full", 429),
                                          ("shutting_down", 503), ("no_model", 503), ("internal", 500),
                                          ("out_of_memory", 503), ("invalid_image", 400), ("something_new", 500)])
def test_worker_errors_map_to_statuses(code, status):
    e = errors.from_worker({"type": "error", "code": code, "message": "x"})
    assert e.status == status and set(e.body()["error"]) == {"message", "type", "param", "code"}


def test_the_field_a_worker_error_names():
    msg = "invalid `generate` request: Expected `int` >= 0 - at `$.params.max_tokens`"
    assert errors.from_worker({"code": "invalid_params", "message": msg}, "max_completion_tokens").param == \
        "max_completion_tokens"
    assert errors.worker_param("bad at `$.prompt.messages[2].content`") == "messages[2].content"
    assert errors.worker_param("bad at `$.params.json_schema`") == "response_format"
    assert errors.worker_param("no field here") is None


def test_the_server_is_a_host_it_imports_nothing_of_the_worker():
    """openai_server speaks the protocol to a worker process; it never imports worker/ (nor model_prep)."""
    import ast
    from pathlib import Path

    import openai_server

    for path in Path(openai_server.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] in ("worker", "model_prep")], (path, names)


def test_the_console_script():
    import tomllib
    from pathlib import Path

    from openai_server.__main__ import load_options, parser

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["mlx-worker-serve"] == "openai_server.__main__:main"
    assert {d.split("==")[0] for d in project["optional-dependencies"]["serve"]} == {"starlette", "uvicorn"}
    args = parser().parse_args(["--model", "m", "--max-concurrent", "4", "--kv-bits", "8", "--no-warmup",
                                "--cache-dir", "/tmp/c"])
    assert load_options(args) == {"max_concurrent": 4, "kv_bits": 8, "cache_dir": "/tmp/c", "warmup": False}

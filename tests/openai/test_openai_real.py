"""The `openai` SDK against the server on SmolLM2-135M-Instruct (CPU, float32 as the worker computes it there):
chat answers equal mlx-lm's own greedy tokens, a tool round trip with tool_choice "required" (SmolLM2's template
ignores tools: the worker's own Hermes prompt) whose follow-up is served from the cache, a JSON schema, an
abort mid-stream, and 4 concurrent requests (queued FIFO by the worker on a CPU). Few tokens: ~13 tokens/s, and mlx-lm in this process is slower still."""
import asyncio
import functools
import json

import jsonschema
import pytest

from tests.openai.serving import Server
from tests.support import reference

pytestmark = pytest.mark.real_model
ASK = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server(smollm2_dir):
    s = Server(smollm2_dir, "--served-model-name", "smollm2")
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@functools.lru_cache(maxsize=None)
def _greedy_json(path, messages, n):
    ids = reference.generate(path, reference.chat_ids(path, json.loads(messages)), n, dtype="float32")
    return reference.decode(path, ids)


def _greedy(path, messages, n):
    """mlx-lm's greedy answer (in this process: MLX's reference BLAS, slow; so each is computed once)."""
    return _greedy_json(path, json.dumps(messages), n)


def test_streamed_and_whole_chats_are_mlx_lm_greedy(client, smollm2_dir):
    want = _greedy(smollm2_dir, ASK, 10)
    r = client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=10)
    assert r.choices[0].message.content == want and "Paris" in want
    chunks = list(client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.prompt_tokens == len(reference.chat_ids(smollm2_dir, ASK))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 1  # the same prompt


def test_a_required_tool_round_trip(client):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model="smollm2", messages=ask, tools=[WEATHER], tool_choice="required",
                                           max_tokens=40)
    msg = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and msg.tool_calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(msg.tool_calls[0].function.arguments), WEATHER["function"]["parameters"])
    follow = ask + [msg.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": '{"celsius": 21}'}]
    second = client.chat.completions.create(model="smollm2", messages=follow, tools=[WEATHER], max_tokens=3)
    # the first turn, the call included (the worker serves the model's own ids for the re-rendered call)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens + \
        first.usage.completion_tokens - 1
    assert second.choices[0].message.content


def test_a_json_schema_answer_validates(client):
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 12}},
              "required": ["capital"], "additionalProperties": False}
    r = client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=24, response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_an_abort_mid_stream_then_the_next_request_is_right(client, server, smollm2_dir):
    stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Write a poem."}],
                                            max_tokens=2000, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    assert server.wait_idle(timeout=3.0) < 3.0
    r = client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=10)
    assert r.choices[0].message.content == _greedy(smollm2_dir, ASK, 10)


def test_four_concurrent_requests(server):
    """Sent together (the worker queues them, FIFO on a CPU): each answer is the one it gets alone."""
    questions = [[{"role": "user", "content": q}] for q in ("Hi!", "What is 2+2?", "Name a fruit.", "Say yes.")]

    async def ask(c, m):
        return (await c.chat.completions.create(model="smollm2", messages=m, max_tokens=3)).choices[0].message.content

    async def main():
        async with server.async_client() as c:
            together = await asyncio.gather(*(ask(c, m) for m in questions))
            alone = [await ask(c, m) for m in questions]
        return together, alone

    together, alone = asyncio.run(main())
    assert together == alone and all(together)

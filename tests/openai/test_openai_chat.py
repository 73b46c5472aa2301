"""The unmodified `openai` Python SDK against the server on the tiny llama fixture: answers equal mlx-lm's own greedy
output, streaming, usage and the prompt cache, sampling fields, errors in OpenAI's shape, cancel on disconnect,
concurrent requests, and a worker that dies."""
import asyncio
import json
import os
import signal
import time

import openai
import pytest

from tests.openai.serving import Server
from tests.support import reference

ASK = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def server(llama_dir):
    s = Server(llama_dir, "--max-concurrent", 4)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _greedy(path, messages, n):
    return reference.decode(path, reference.generate(path, reference.chat_ids(path, messages), n))


def test_a_chat_is_mlx_lm_greedy_output(client, llama_dir):
    r = client.chat.completions.create(model="llama-seed0", messages=ASK, max_tokens=12)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "llama-seed0"
    assert r.choices[0].message.content == _greedy(llama_dir, ASK, 12)
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(reference.chat_ids(llama_dir, ASK)) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_a_streamed_chat_is_the_same_text_with_usage_last(client, llama_dir):
    chunks = list(client.chat.completions.create(model="llama-seed0", messages=ASK, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == _greedy(llama_dir, ASK, 12)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.chat.completions.create(model="llama-seed0", messages=ASK, max_tokens=3, stream=True))
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)  # no usage unless asked


def test_a_follow_up_turn_reuses_the_earlier_turn_from_the_cache(client):
    first = client.chat.completions.create(model="llama-seed0", messages=[
        {"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a colour."}],
        max_tokens=8)
    turn = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "And another one?"}]
    second = client.chat.completions.create(model="llama-seed0", messages=turn, max_tokens=4)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens


def test_sampling_fields_reach_the_worker(client, llama_dir):
    create = client.chat.completions.create
    greedy = _greedy(llama_dir, ASK, 16)
    a, b = (create(model="llama-seed0", messages=ASK, max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
            for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content != greedy
    cut = greedy[4:7]
    r = create(model="llama-seed0", messages=ASK, max_tokens=16, stop=[cut])
    assert r.choices[0].message.content == greedy[:greedy.index(cut)] and r.choices[0].finish_reason == "stop"
    r = create(model="llama-seed0", messages=ASK, max_completion_tokens=3)
    assert r.usage.completion_tokens == 3
    ids = reference.generate(llama_dir, reference.chat_ids(llama_dir, ASK), 1)
    other = next(t for t in range(100, 200) if t != ids[0])
    r = create(model="llama-seed0", messages=ASK, max_tokens=1, logit_bias={str(other): 100})
    assert r.choices[0].message.content == reference.decode(llama_dir, [other])
    r = create(model="llama-seed0", messages=ASK, max_tokens=16, presence_penalty=1.5, frequency_penalty=1.5)
    assert r.usage.completion_tokens == 16


def test_logprobs(client, llama_dir):
    r = client.chat.completions.create(model="llama-seed0", messages=ASK, max_tokens=6, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 6 and "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token  # greedy: the most likely
        assert t.logprob == t.top_logprobs[0].logprob <= 0 and bytes(t.bytes).decode() == t.token
    r = client.chat.completions.create(model="llama-seed0", messages=ASK, max_tokens=2, logprobs=True)
    assert [t.top_logprobs for t in r.choices[0].logprobs.content] == [[], []]
    assert client.chat.completions.create(model="llama-seed0", messages=ASK, max_tokens=2).choices[0].logprobs is None


def test_completions(client, llama_dir):
    prompt = "Once upon a time"
    want = reference.decode(llama_dir, reference.generate(llama_dir, reference.text_ids(llama_dir, prompt), 8))
    r = client.completions.create(model="llama-seed0", prompt=prompt, max_tokens=8)
    assert r.object == "text_completion" and r.choices[0].text == want and r.usage.completion_tokens == 8
    chunks = list(client.completions.create(model="llama-seed0", prompt=prompt, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want and chunks[-1].usage.total_tokens > 8
    assert client.completions.create(model="llama-seed0", prompt=prompt).usage.completion_tokens == 16  # OpenAI's
    r = client.completions.create(model="llama-seed0", prompt=prompt, max_tokens=3, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == 3
    assert all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["llama-seed0"]
    assert client.models.retrieve("llama-seed0").id == "llama-seed0"
    status, body = server.health()
    assert status == 200 and body["status"] == "ok" and body["model"] == "llama-seed0"


def _error(call):
    with pytest.raises(openai.APIStatusError) as e:
        call()
    body = e.value.body
    assert set(body) == {"message", "type", "param", "code"}, body  # the SDK hands over the "error" object
    return e.value.status_code, body


@pytest.mark.parametrize("kwargs, status, param", [
    ({"n": 2}, 400, "n"),
    ({"extra_body": {"best_of": 3}}, 400, "best_of"),
    ({"extra_body": {"messages": [{"role": "user", "content": "hi", "audio": {}}]}}, 400, "messages[0].audio"),
    ({"model": "gpt-4o"}, 404, "model"),
    ({"temperature": -1}, 400, "temperature"),
    ({"max_tokens": -5}, 400, "max_tokens"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400,
     "response_format.json_schema.schema"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
     400, "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,iVBORw0KGgo="}}]}]}, 400, None),  # the worker: this model has no vision
])
def test_errors_are_openai_errors_and_the_server_carries_on(client, llama_dir, kwargs, status, param):
    kw = {"model": "llama-seed0", "messages": ASK, "max_tokens": 2, **kwargs}
    got, body = _error(lambda: client.chat.completions.create(**kw))
    assert (got, body["param"]) == (status, param), body
    assert body["type"] == "invalid_request_error" and body["message"]
    assert client.chat.completions.create(model="llama-seed0", messages=ASK, max_tokens=12).choices[0].message.content \
        == _greedy(llama_dir, ASK, 12)


def test_a_wrong_api_key_is_401(server):
    bad = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.body["code"] == "invalid_api_key"


def test_a_client_that_disconnects_mid_stream_cancels_its_generate(client, server, llama_dir):
    stream = client.chat.completions.create(model="llama-seed0", messages=ASK, max_tokens=100000, stream=True)
    got = 0
    for chunk in stream:
        got += bool(chunk.choices[0].delta.content)
        if got == 3:
            break
    assert server.health()[1]["running"], "the long generate runs"
    stream.close()  # the connection closes mid-stream
    assert server.wait_idle(timeout=2.0) < 2.0  # cancelled in the worker, not left to run to the context's end
    r = client.chat.completions.create(model="llama-seed0", messages=ASK, max_tokens=12)
    assert r.choices[0].message.content == _greedy(llama_dir, ASK, 12)


def test_a_non_streamed_request_whose_client_leaves_is_cancelled_too(server):
    slow = server.client(timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        slow.chat.completions.create(model="llama-seed0", messages=ASK, max_tokens=100000)
    assert server.wait_idle(timeout=2.0) < 2.0


def test_four_concurrent_requests(server, llama_dir):
    questions = [[{"role": "user", "content": q}] for q in ("Hi!", "What is a cat?", "Count to three.", "Why?")]

    async def main():
        async with server.async_client() as c:
            return await asyncio.gather(*(c.chat.completions.create(model="llama-seed0", messages=m, max_tokens=10)
                                          for m in questions))

    t0 = time.monotonic()
    answers = asyncio.run(main())
    assert time.monotonic() - t0 < 30
    assert [a.choices[0].message.content for a in answers] == [_greedy(llama_dir, m, 10) for m in questions]


def test_a_dead_worker_is_restarted_and_meanwhile_answered_503(client, server, llama_dir):
    status, body = server.health()
    pid = body["worker_pid"]
    os.kill(pid, signal.SIGKILL)
    seen = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            r = client.chat.completions.create(model="llama-seed0", messages=ASK, max_tokens=12)
            break
        except openai.APIStatusError as e:
            assert e.status_code == 503 and e.body["type"] == "server_error", e.body
            seen.add(e.status_code)
            time.sleep(0.1)
    assert seen == {503}
    assert r.choices[0].message.content == _greedy(llama_dir, ASK, 12)
    status, body = server.health()
    assert status == 200 and body["restarts"] == 1 and body["worker_pid"] != pid


def test_the_stream_is_server_sent_events(server):
    """Raw HTTP: data lines, each a JSON chunk, ending in [DONE]."""
    import urllib.request

    req = urllib.request.Request(f"{server.base_url}/chat/completions", method="POST", data=json.dumps(
        {"model": "llama-seed0", "messages": ASK, "max_tokens": 3, "stream": True}).encode(),
        headers={"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])

"""Tools, structured output and reasoning through the `openai` SDK, on the Hermes-style tool fixture (Qwen3's
template reduced: ``<tool_call>`` JSON, ``<think>`` markers) driven to close its thinking block: the checks of a
serving test list (reasoning present and not leaked, single / parallel / required tool calls, a complex tool
schema, json_schema, a multi-turn reasoning round trip), each against mlx-lm's own rendering and tokens."""
import json

import jsonschema
import pytest

from tests.openai.serving import Server, thinker_dir
from tests.support import reference

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}},
                   "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}}
ORDER = {"type": "function", "function": {  # nested objects, an array of objects, enums, bounds, a boolean
    "name": "place_order", "description": "order items",
    "parameters": {"type": "object", "properties": {
        "order": {"type": "object", "properties": {
            "items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
                "type": "object", "properties": {"sku": {"type": "string", "enum": ["tea", "cake"]},
                                                 "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["sku", "qty"], "additionalProperties": False}},
            "express": {"type": "boolean"}}, "required": ["items", "express"], "additionalProperties": False},
        "note": {"type": "string", "maxLength": 8}},
        "required": ["order", "note"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
THINK = {"chat_template_kwargs": {"think_open": True}}  # the template opens the thinking block


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return thinker_dir(tmp_path_factory.mktemp("openai-tools"))


@pytest.fixture(scope="module")
def server(model):
    s = Server(model)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _chat(client, model, **kw):
    return client.chat.completions.create(model=model.name, **{"messages": ASK, "max_tokens": 150, **kw})


def _schema(tool):
    return jsonschema.Draft202012Validator(tool["function"]["parameters"])


def _as_message(msg) -> dict:
    """The assistant message as an app appends it to the conversation (the SDK's object, dumped)."""
    return msg.model_dump(exclude_none=True)


def test_a_required_tool_round_trip_reuses_the_call_from_the_cache(client, model):
    first = _chat(client, model, tools=TOOLS, tool_choice="required")
    msg = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and msg.content is None and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.type == "function" and call.id and call.function.name in ("get_weather", "add")
    _schema(WEATHER if call.function.name == "get_weather" else ADD).validate(json.loads(call.function.arguments))
    follow = ASK + [_as_message(msg), {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    second = _chat(client, model, messages=follow, tools=TOOLS, max_tokens=4)
    assert second.choices[0].finish_reason == "length"
    # the first prompt and the call as generated (the template re-renders it token for token)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens + \
        first.usage.completion_tokens - 1
    _, tok = reference.load_model(model)
    rendered = tok.apply_chat_template(
        [ASK[0], {"role": "assistant", "content": "", "tool_calls": [{"function": {
            "name": call.function.name, "arguments": json.loads(call.function.arguments)}}]}, follow[2]],
        tools=TOOLS, add_generation_prompt=True)
    assert second.usage.prompt_tokens == len(rendered)


def test_a_streamed_call_comes_as_tool_calls_deltas(client, model):
    named = {"type": "function", "function": {"name": "add"}}
    whole = _chat(client, model, tools=TOOLS, tool_choice=named).choices[0].message.tool_calls[0]
    chunks = list(_chat(client, model, tools=TOOLS, tool_choice=named, stream=True))
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas and {d.index for d in deltas} == {0}
    assert deltas[0].id and deltas[0].type == "function" and deltas[0].function.name == "add"
    args = "".join(d.function.arguments or "" for d in deltas)
    assert (json.loads(args), whole.function.name) == (json.loads(whole.function.arguments), "add")
    _schema(ADD).validate(json.loads(args))
    assert not any(c.choices[0].delta.content for c in chunks)  # the call's text is not content
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_and_auto_make_no_call_on_this_model(client, model):
    for choice in ("none", "auto"):
        r = _chat(client, model, tools=TOOLS, tool_choice=choice, max_tokens=8)
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"


def test_a_complex_tool_schema(client, model):
    r = _chat(client, model, tools=[ORDER, WEATHER], tool_choice={"type": "function", "function": {"name":
                                                                                                   "place_order"}})
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "place_order"
    _schema(ORDER).validate(json.loads(call.function.arguments))


def test_parallel_calls_in_the_conversation_reach_the_template(client, model):
    """An assistant turn with two calls and their two results: both are rendered (mlx-lm's rendering)."""
    calls = [{"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
             {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "London"}'}}]
    convo = ASK + [{"role": "assistant", "content": None, "tool_calls": calls},
                   {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
                   {"role": "tool", "tool_call_id": "call_b", "content": "rain"}]
    r = _chat(client, model, messages=convo, tools=TOOLS, max_tokens=2)
    _, tok = reference.load_model(model)
    rendered = [dict(m, tool_calls=[{"function": {"name": c["function"]["name"],
                                                  "arguments": json.loads(c["function"]["arguments"])}}
                                    for c in m["tool_calls"]]) if m.get("tool_calls") else m for m in convo]
    assert r.usage.prompt_tokens == len(tok.apply_chat_template(rendered, tools=TOOLS, add_generation_prompt=True))


def test_response_format_json_schema_and_json_object(client, model):
    schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London"]},
                                               "celsius": {"type": "integer", "minimum": -20, "maximum": 40}},
              "required": ["city", "celsius"], "additionalProperties": False}
    r = _chat(client, model, response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema,
                                                                                      "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    assert r.choices[0].finish_reason == "stop"
    r = _chat(client, model, response_format={"type": "json_object"}, max_tokens=60)
    if r.choices[0].finish_reason == "stop":  # a random model may fill every token with one long string
        json.loads(r.choices[0].message.content)


def _reference_split(model):
    """mlx-lm's greedy tokens for ASK with the thinking block open, cut before the driven model's second
    ``</think>`` (it writes one wherever it would write the driven token): (max_tokens, reasoning, answer)."""
    _, tok = reference.load_model(model)
    ids = reference.generate(model, tok.apply_chat_template(ASK, add_generation_prompt=True, think_open=True), 30)
    end = tok.convert_tokens_to_ids("</think>")
    n = ids.index(end, ids.index(end) + 1) if ids.count(end) > 1 else len(ids)
    reasoning, answer = reference.decode(model, ids[:n]).split("</think>")
    assert reasoning.strip() and answer.strip(), "the driven fixture must close its reasoning mid-way"
    return n, reasoning, answer


def test_reasoning_is_present_and_not_leaked(client, model):
    n, reasoning, answer = _reference_split(model)
    r = _chat(client, model, max_tokens=n, extra_body=THINK)
    msg = r.choices[0].message
    assert msg.model_extra["reasoning_content"] == reasoning and msg.content == answer
    assert reasoning.strip() and reasoning.strip() not in msg.content and "think>" not in msg.content
    assert 0 < r.usage.completion_tokens_details.reasoning_tokens < r.usage.completion_tokens


def test_streamed_reasoning_stays_in_reasoning_content(client, model):
    n, reasoning, answer = _reference_split(model)
    chunks = list(_chat(client, model, max_tokens=n, extra_body=THINK, stream=True,
                        stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    thought = [d.model_extra.get("reasoning_content") for d in deltas]
    assert "".join(t or "" for t in thought) == reasoning
    assert "".join(d.content or "" for d in deltas) == answer
    assert not any(t and d.content for t, d in zip(thought, deltas))  # one channel per chunk
    first_answer = next(i for i, d in enumerate(deltas) if d.content)
    assert not any(thought[first_answer:])  # the reasoning comes first, then only the answer
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens > 0


def test_a_multi_turn_reasoning_round_trip(client, model):
    """Turn 2 carries turn 1's answer (and its reasoning_content, which templates drop for past turns): it is
    accepted, reuses turn 1's prompt from the cache, and its own reasoning again stays out of the content."""
    n, reasoning, _ = _reference_split(model)
    first = _chat(client, model, max_tokens=n, extra_body=THINK)
    assert first.choices[0].message.model_extra["reasoning_content"] == reasoning
    convo = ASK + [_as_message(first.choices[0].message), {"role": "user", "content": "And in London?"}]
    assert convo[1]["reasoning_content"]
    second = _chat(client, model, messages=convo, max_tokens=n, extra_body=THINK)
    msg = second.choices[0].message
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 2  # up to <think>
    assert "think>" not in (msg.content or "")
    if msg.model_extra.get("reasoning_content"):
        assert msg.model_extra["reasoning_content"].strip() not in (msg.content or "")

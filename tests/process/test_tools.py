"""Tools and reasoning through the real worker: templates that render tools (Hermes/Qwen ``<tool_call>``
JSON and Mistral ``[TOOL_CALLS]``), constrained calls, the events against mlx-lm's own parsers, the prompt
cache across a tool round trip, thinking channels, and every bad input."""

import contextlib
import importlib
import json

import pytest

from tests.support import reference
from tests.support.client import Worker
from tests.support.prompts import assert_varied
from tests.support.tool_fixtures import drive_marker, tool_fixture_dir

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}},
                   "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tool-fixtures")
    return {f: tool_fixture_dir(f, root) for f in ("hermes", "mistral")}


@pytest.fixture(scope="module")
def workers(dirs):
    ws = {}
    for fam, d in dirs.items():
        ws[fam] = Worker()
        ws[fam].load(d)
    yield ws
    for w in ws.values():
        w.close()


@contextlib.contextmanager
def _serving(workers, dirs, family, path, **options):
    """The family's shared worker with another model (or options) loaded, its own model back afterwards
    (a load takes a fraction of a second, a new worker process several)."""
    w = workers[family]
    w.load(path, **options)
    try:
        yield w
    finally:
        w.load(dirs[family])


def _gen(w, rid, messages, max_tokens=150, params=None, **prompt):
    evs = w.request({"type": "generate", "id": rid, "prompt": {"messages": messages, **prompt},
                     "params": {"max_tokens": max_tokens, **(params or {})}})
    assert evs[-1]["type"] == "done", evs[-1]
    return evs


def _ids(evs):
    return [t for e in evs if e["type"] in ("token", "tool_call") for t in e["tokens"]]


@pytest.mark.parametrize("family", ["hermes", "mistral"])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_a_constrained_call_is_what_mlx_lm_parses_from_the_same_text(workers, dirs, family, choice):
    w = workers[family]
    info = w.request({"type": "status", "id": "s"})[-1]["model"]
    evs = _gen(w, f"c-{family}", ASK, tools=TOOLS, tool_choice=choice)
    done, stats = evs[-1], evs[-2]
    calls = [e for e in evs if e["type"] == "tool_call"]
    assert len(calls) == 1 and done["stop_reason"] == "tool_calls", done
    assert done["tool_calls"] == [calls[0]["call"]] and done["text"] == ""
    if not isinstance(choice, str):
        assert calls[0]["call"]["function"]["name"] == "add"
    # the prompt is mlx-lm's own rendering with tools=
    _, tok = reference.load_model(dirs[family])
    prompt = tok.apply_chat_template(ASK, tools=TOOLS, add_generation_prompt=True)
    assert stats["prompt_tokens"] == len(prompt)
    # the text the model generated, parsed by mlx-lm's parser for the format the worker reported at load
    ids = _ids(evs)  # the EOS that ended it is done.stop_token, in no event
    assert done["stop_token"] == tok.eos_token_id  # the turn end the template writes (<|im_end|>, </s>)
    raw = tok.decode(ids, skip_special_tokens=False)
    start, end = tok.tool_call_start, tok.tool_call_end
    assert raw.startswith(start) and raw.endswith(end)
    parser = importlib.import_module(f"mlx_lm.tool_parsers.{info['tool_parser']}")
    parsed = parser.parse_tool_call(raw[len(start): len(raw) - len(end) if end else None], TOOLS)
    got = calls[0]["call"]["function"]
    assert (got["name"], json.loads(got["arguments"])) == (parsed["name"], parsed["arguments"])
    assert calls[0]["call"]["id"].startswith("call_") and calls[0]["tokens"] == ids[:len(calls[0]["tokens"])]


def test_load_reports_the_tool_format_and_thinking_markers(workers):
    info = {f: w.request({"type": "status", "id": "s"})[-1]["model"] for f, w in workers.items()}
    assert (info["hermes"]["tool_parser"], info["hermes"]["tool_prompt"]) == ("json_tools", "template")
    assert info["hermes"]["reasoning_markers"] == ["<think>", "</think>"]
    assert (info["mistral"]["tool_parser"], "reasoning_markers" in info["mistral"]) == ("mistral", False)


@pytest.mark.parametrize("family", ["hermes", "mistral"])
def test_auto_tools_leave_the_tokens_as_mlx_lm_makes_them(workers, dirs, family):
    """A random model calls no tool: the output is the plain greedy tokens, all of them in the answer."""
    evs = _gen(workers[family], f"a-{family}", ASK, max_tokens=24, tools=TOOLS)
    _, tok = reference.load_model(dirs[family])
    prompt = tok.apply_chat_template(ASK, tools=TOOLS, add_generation_prompt=True)
    ids = _ids(evs)
    assert ids == reference.generate(dirs[family], prompt, 24)
    assert evs[-1]["stop_reason"] != "tool_calls" and "tool_calls" not in evs[-1]
    assert evs[-1]["text"] == reference.decode(dirs[family], reference.generate(dirs[family], prompt, 24))


def test_a_tool_round_trip_reuses_the_whole_call(workers, dirs):
    """The result appended to the conversation: the template re-renders the call as it was generated, and
    the cache serves everything the re-tokenized conversation shares with the first turn."""
    w = workers["hermes"]
    w.request({"type": "cache_clear", "id": "cc"})
    first = _gen(w, "r1", ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    done = first[-1]
    _, tok = reference.load_model(dirs["hermes"])
    follow = ASK + [{"role": "assistant", "content": done["text"], "tool_calls": done["tool_calls"]},
                    {"role": "tool", "tool_call_id": done["tool_calls"][0]["id"], "content": "sunny, 21 C"}]
    generated = tok.decode(_ids(first), skip_special_tokens=False)
    rendered = tok.apply_chat_template(
        [follow[0], dict(follow[1], tool_calls=[{"id": "x", "type": "function", "function": {
            "name": "get_weather", "arguments": json.loads(done["tool_calls"][0]["function"]["arguments"])}}]),
         follow[2]], tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert generated in rendered  # the call text, markers included, exactly as generated
    second = _gen(w, "r2", follow, max_tokens=4, tools=TOOLS)
    p1 = tok.apply_chat_template(ASK, tools=TOOLS, add_generation_prompt=True) + _ids(first) + [done["stop_token"]]
    p2 = tok.apply_chat_template(
        [follow[0], dict(follow[1], tool_calls=[{"id": "x", "function": {"name": "get_weather", "arguments": json.loads(
            done["tool_calls"][0]["function"]["arguments"])}}]), follow[2]], tools=TOOLS, add_generation_prompt=True)
    shared = next((i for i, (a, b) in enumerate(zip(p1, p2)) if a != b), min(len(p1), len(p2)))
    assert second[-2]["prompt_tokens"] == len(p2)
    assert second[-1]["cached_tokens"] >= min(shared, len(p2) - 1) > len(p1) - len(_ids(first))


@pytest.fixture(scope="module")
def thinker_dir(dirs, tmp_path_factory):
    """The Hermes fixture driven to close its thinking block where it would emit some mid-answer token."""
    src = dirs["hermes"]
    _, tok = reference.load_model(src)
    prompt = tok.apply_chat_template(ASK, add_generation_prompt=True, think_open=True)
    plain = reference.generate(src, prompt, 30)
    special = set(tok.all_special_ids)
    x = next(t for t in plain[6:] if t not in special and plain.index(t) >= 6)
    return drive_marker(src, tmp_path_factory.mktemp("thinker") / "m", "</think>", x)


@pytest.fixture
def thinker(workers, dirs, thinker_dir):
    with _serving(workers, dirs, "hermes", thinker_dir) as w:
        yield w, thinker_dir


def _split_reference(path, max_tokens=30):
    _, tok = reference.load_model(path)
    prompt = tok.apply_chat_template(ASK, add_generation_prompt=True, think_open=True)
    ids = reference.generate(path, prompt, max_tokens)
    text = reference.decode(path, ids)
    assert "</think>" in text, "the driven fixture must close its reasoning"
    reasoning, answer = text.split("</think>", 1)
    return ids, reasoning, answer


def test_reasoning_and_answer_channels_split_at_the_marker(thinker):
    w, path = thinker
    ids, reasoning, answer = _split_reference(path)
    evs = _gen(w, "t1", ASK, max_tokens=30, template_kwargs={"think_open": True})
    toks = [e for e in evs if e["type"] == "token"]
    assert all(e["channel"] in ("reasoning", "answer") for e in toks)
    channels = [e["channel"] for e in toks if e["text"]]
    assert channels == sorted(channels, key=lambda c: c == "answer")  # reasoning first, then the answer
    assert "".join(e["text"] for e in toks if e["channel"] == "reasoning") == reasoning == evs[-1]["reasoning"]
    assert "".join(e["text"] for e in toks if e["channel"] == "answer") == answer == evs[-1]["text"]
    assert _ids(evs) == ids
    assert evs[-2]["reasoning_tokens"] == sum(len(e["tokens"]) for e in toks if e["channel"] == "reasoning")


def test_a_stop_string_inside_the_reasoning_does_not_stop_the_answer(thinker):
    w, path = thinker
    _, reasoning, answer = _split_reference(path)
    stop = reasoning.strip()[:3]
    assert stop and stop not in answer
    evs = _gen(w, "t2", ASK, max_tokens=30, template_kwargs={"think_open": True}, params={"stop": [stop]})
    assert evs[-1]["reasoning"] == reasoning and evs[-1]["text"] == answer
    assert evs[-1]["stop_reason"] != "stop_string"
    cut = answer[2:5]  # in the answer it stops, as ever
    evs = _gen(w, "t3", ASK, max_tokens=30, template_kwargs={"think_open": True}, params={"stop": [cut]})
    assert evs[-1]["stop_reason"] == "stop_string" and evs[-1]["text"] == answer[:answer.index(cut)]


def test_json_schema_applies_to_the_answer_only(thinker):
    w, path = thinker
    _, reasoning, _ = _split_reference(path)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    evs = _gen(w, "t4", ASK, max_tokens=60, template_kwargs={"think_open": True}, params={"json_schema": schema})
    assert evs[-1]["reasoning"] == reasoning  # free text, as without the schema
    value = json.loads(evs[-1]["text"])
    assert set(value) == {"n"} and 0 <= value["n"] <= 9


@pytest.fixture(scope="module")
def garbled_dir(dirs, tmp_path_factory):
    """The Hermes fixture driven to open a tool call where it would emit one token, and to close it where
    it would emit a later one: in auto mode it writes calls whose text is no JSON (one closed, one still
    open when ``max_tokens`` ends it)."""
    src = dirs["hermes"]
    _, tok = reference.load_model(src)
    prompt = tok.apply_chat_template(ASK, tools=TOOLS, add_generation_prompt=True)
    plain = reference.generate(src, prompt, 30)
    special = set(tok.all_special_ids)
    x = next(t for t in plain[3:] if t not in special and plain.index(t) >= 3)
    root = tmp_path_factory.mktemp("garbled")
    opened = drive_marker(src, root / "open", "<tool_call>", x)
    out = reference.generate(opened, prompt, 30)
    i = out.index(tok.convert_tokens_to_ids("<tool_call>"))
    y = next(t for t in out[i + 3:] if t not in special and t not in out[:i + 3])
    return drive_marker(opened, root / "close", "</tool_call>", y)


def test_a_tool_call_that_does_not_parse_is_kept_as_answer_text(workers, dirs, garbled_dir):
    """channels.py: a call that does not parse is released as answer text, markers included. The answer is
    then mlx-lm's own decoding of every generated token, and no call is reported."""
    from mlx_lm.tool_parsers import json_tools

    path = garbled_dir
    _, tok = reference.load_model(path)
    ids = reference.generate(path, tok.apply_chat_template(ASK, tools=TOOLS, add_generation_prompt=True), 30)
    text = reference.decode(path, ids)
    # what makes this test: a closed call and an open one, neither of them parsable by mlx-lm's parser
    assert text.count("<tool_call>") == 2 and text.count("</tool_call>") == 1, text
    closed, still_open = text.split("<tool_call>")[1].split("</tool_call>")[0], text.split("<tool_call>")[2]
    for call in (closed, still_open):
        assert call.strip(), text
        with pytest.raises(Exception):
            json_tools.parse_tool_call(call, TOOLS)
    with _serving(workers, dirs, "hermes", path) as w:
        evs = _gen(w, "garbled", ASK, max_tokens=30, tools=TOOLS)
    done, toks = evs[-1], [e for e in evs if e["type"] == "token"]
    assert not [e for e in evs if e["type"] == "tool_call"] and "tool_calls" not in done, done
    assert done["stop_reason"] == "max_tokens" and done["text"] == text
    assert "".join(e["text"] for e in toks) == text and all(e["channel"] == "answer" for e in toks)
    assert _ids(evs) == ids


def test_a_marker_split_across_tokens_still_splits_the_channels(dirs):
    """In process, with the fixture's real detokenizer: ``</think>`` and ``<tool_call>`` spelled in pieces."""
    from mlx_lm.tool_parsers import json_tools

    from worker.generation.channels import Channels, Markers

    _, tok = reference.load_model(dirs["hermes"])
    pieces = ["so I think", " </", "thi", "nk>", "ok <tool", "_call>", '\n{"name": "add", "arguments": {"a": 1}}',
              "\n</tool_call>", " done"]
    ids = [tok.encode(p, add_special_tokens=False) for p in pieces]
    markers = Markers(think=("<think>", "</think>"), tool=("<tool_call>", "</tool_call>"),
                      parser=json_tools.parse_tool_call)
    ch = Channels(tok.detokenizer, (), markers, "reasoning")
    out = [p for group in ids for t in group for p in ch.add(t)] + ch.finish()
    assert "".join(p.text for p in out if p.kind == "reasoning") == "so I think "
    assert ch.text == "ok  done" and "".join(p.text for p in out if p.kind == "answer") == ch.text
    assert [c["name"] for c in ch.calls] == ["add"] and ch.calls[0]["arguments"] == {"a": 1}
    assert [t for p in out for t in p.ids] == [t for group in ids for t in group]  # every id, once


BAD = [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, ASK, "prompt.tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]}, ASK,
     "prompt.tools[0].function.parameters"),
    ({"tools": [ADD, ADD]}, ASK, "prompt.tools[1].function.name"),
    ({"tool_choice": "required"}, ASK, "prompt.tool_choice"),
    ({"template_kwargs": {"tools": []}}, ASK, "prompt.template_kwargs"),
    ({"tools": TOOLS}, ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{nope"}}]}],
     "messages[1].tool_calls[0].function.arguments"),
    ({"tools": TOOLS}, ASK + [{"role": "tool", "content": "sunny"}], "messages[1].tool_call_id"),
    ({"tools": TOOLS}, ASK + [{"role": "tool", "tool_call_id": "c9", "content": "sunny"}], "messages[1].tool_call_id"),
    ({"tools": TOOLS}, ASK + [{"role": "user", "content": "x", "tool_calls": []}], "messages[1].tool_calls"),
]


@pytest.mark.parametrize("prompt,messages,field", BAD, ids=[b[2] for b in BAD])
def test_bad_tool_inputs_name_the_field(workers, prompt, messages, field):
    w = workers["hermes"]
    evs = w.request({"type": "generate", "id": "bad", "prompt": {"messages": messages, **prompt},
                     "params": {"max_tokens": 4}})
    assert evs[-1]["type"] == "error" and evs[-1]["code"] == "invalid_params", evs[-1]
    assert field in evs[-1]["message"], evs[-1]["message"]
    assert _gen(w, "after", ASK, max_tokens=2)[-1]["type"] == "done"  # the worker serves on


@pytest.mark.parametrize("prompt,field", [
    ({"text": "hi", "tools": TOOLS}, "prompt.tools"),
    ({"messages": ASK, "tools": TOOLS, "tool_choice": "required"}, "params.json_schema"),
    ({"messages": ASK, "tools": [{"type": "function", "function": {"name": "bad name"}}]}, "name"),
])
def test_more_bad_tool_requests(workers, prompt, field):
    params = {"max_tokens": 4, **({"json_schema": True} if field == "params.json_schema" else {})}
    evs = workers["hermes"].request({"type": "generate", "id": "bad2", "prompt": prompt, "params": params})
    assert evs[-1]["type"] == "error" and evs[-1]["code"] in ("invalid_params", "invalid_request"), evs[-1]
    assert field in evs[-1]["message"], evs[-1]["message"]


@pytest.mark.real_model
def test_smollm2_gets_tools_through_the_workers_own_prompt(smollm2_dir):
    """SmolLM2's template ignores tools: the worker renders them (Hermes format, mlx-lm's json_tools
    parser). Whatever the model emits in auto mode is handled; a named choice gives a valid call, and
    the result goes back into the conversation."""
    from worker.prompting.tools import WORKER_PROMPT, worker_rendering

    w = Worker()
    try:
        info = w.load(smollm2_dir)
        assert (info["tool_parser"], info["tool_prompt"]) == ("json_tools", "worker")
        auto = _gen(w, "s1", ASK, max_tokens=32, tools=TOOLS)
        assert auto[-1]["stop_reason"] in ("eos", "max_tokens", "tool_calls")
        rendered = worker_rendering(ASK, [WEATHER, ADD])
        assert WORKER_PROMPT.split("{tools}")[0] in rendered[0]["content"]
        mlx_lm_ref = reference.InChild(w.proc.pid)  # with the worker's BLAS: in this process ~10 prompt tok/s
        try:
            ids = mlx_lm_ref.chat_ids(smollm2_dir, rendered)
            assert auto[-2]["prompt_tokens"] == len(ids)
            expected = mlx_lm_ref.generate(smollm2_dir, ids, 32, dtype="float32")
        finally:
            mlx_lm_ref.close()
        assert_varied(expected, 4, what="mlx-lm's output")
        assert _ids(auto) == expected  # the same tokens as mlx-lm on the same rendering
        named = _gen(w, "s2", ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
        call = named[-1]["tool_calls"][0]
        assert named[-1]["stop_reason"] == "tool_calls" and call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "London")
        follow = ASK + [{"role": "assistant", "content": "", "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"}]
        answer = _gen(w, "s3", follow, max_tokens=8, tools=TOOLS)
        assert answer[-1]["cached_tokens"] > auto[-2]["prompt_tokens"]  # the first turn and the call
    finally:
        w.close()


def test_tool_choice_none_renders_no_tools_and_parses_nothing(workers, dirs):
    w = workers["hermes"]
    evs = _gen(w, "n1", [{"role": "user", "content": None}] + ASK, max_tokens=8, tools=TOOLS, tool_choice="none")
    _, tok = reference.load_model(dirs["hermes"])
    plain = tok.apply_chat_template([{"role": "user", "content": ""}] + ASK, add_generation_prompt=True)
    assert evs[-2]["prompt_tokens"] == len(plain) and "tool_calls" not in evs[-1]
    assert _ids(evs) == reference.generate(dirs["hermes"], plain, 8)


def test_a_constrained_call_turns_speculation_off(workers, dirs):
    # its own draft: the same tokenizer
    with _serving(workers, dirs, "mistral", dirs["mistral"], draft_model_path=str(dirs["mistral"])) as w:
        evs = _gen(w, "sp", ASK, tools=TOOLS, tool_choice="required")
        assert evs[-2]["speculative"] == "off: tool_choice" and evs[-1]["stop_reason"] == "tool_calls"


def test_the_workers_rendering_adds_the_tool_prompt_only_when_tools_are_offered():
    from worker.prompting.tools import WORKER_PROMPT, worker_rendering

    history = ASK + [{"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "add", "arguments": {"a": 1, "b": 2}}}]}, {"role": "tool", "tool_call_id": "c1", "content": "3"}]
    plain = worker_rendering(history, [])
    assert [m["role"] for m in plain] == ["user", "assistant", "user"]
    assert plain[1]["content"] == '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    assert plain[2]["content"] == "<tool_response>\n3\n</tool_response>"
    offered = worker_rendering([{"role": "system", "content": "Be brief."}] + history, [ADD])
    assert offered[0]["content"].startswith("Be brief.\n\n" + WORKER_PROMPT.split("{tools}")[0])
    assert json.dumps(ADD) in offered[0]["content"] and len(offered) == 4

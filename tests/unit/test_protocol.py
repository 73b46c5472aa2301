"""The protocol definition: generated docs and schema are fresh, decoding classifies errors."""

import io
import json

import msgspec
import pytest

from worker.protocol import CODES, WorkerError, decode_request, messages
from worker.protocol.docs import ROOT, refresh
from worker.protocol.framing import TooLong, id_in_head, read_lines
from worker.protocol.schema import schema_text


def test_schema_is_fresh():
    committed = (ROOT / "schema" / "protocol.schema.json").read_text(encoding="utf-8")
    assert committed == schema_text(), "run: python -m worker.protocol.docs --write"


def test_protocol_md_is_fresh():
    text = (ROOT / "PROTOCOL.md").read_text(encoding="utf-8")
    assert text == refresh(text), "run: python -m worker.protocol.docs --write"


def test_every_code_and_stop_reason_is_documented():
    text = (ROOT / "PROTOCOL.md").read_text(encoding="utf-8")
    prose = text.split("<!-- BEGIN GENERATED")[0]
    for code in CODES:
        assert f"`{code}`" in prose, code
    for reason in messages.StopReason.__args__:
        assert f"`{reason}`" in prose, reason
    for tag in messages.REQUEST_TYPES:
        assert f"`{tag}`" in prose, tag


def test_schema_validates_examples():
    schema = json.loads(schema_text())
    consts = {t for d in schema["$defs"].values() if isinstance(d, dict) and "type" in d.get("properties", {})
              for t in d["properties"]["type"].get("enum", [])}
    assert set(messages.REQUEST_TYPES) <= consts
    ev = messages.Done(id="x", request="generate", stop_reason="eos", text="hi", seq=3)
    assert json.loads(msgspec.json.encode(ev)) == {
        "type": "done", "id": "x", "seq": 3, "request": "generate", "stop_reason": "eos", "text": "hi"}


@pytest.mark.parametrize("line,code", [
    (b"{", "parse_error"), (b"null", "invalid_request"), (b'{"id": ""}', "invalid_request"),
    (b'{"id": "a", "type": 1}', "invalid_request"), (b'{"id": "a", "type": "x"}', "unknown_type"),
    (b'{"id": "a", "type": "tokenize"}', "invalid_params"),
    (b'{"id": "a", "type": "generate", "prompt": {}, "params": {"top_p": 0}}', "invalid_params"),
    (b'{"id": "a", "type": "generate", "prompt": {}, "params": {"max_tokens": 1e400}}', "invalid_params"),
])
def test_decode_errors(line, code):
    with pytest.raises(WorkerError) as info:
        decode_request(line)
    assert info.value.code == code
    assert info.value.number == CODES[code]


def test_decode_ok():
    req = decode_request(b'{"id": "a", "type": "generate", "prompt": {"text": "hi"}, '
                         b'"params": {"stop": ["\\n"]}}')
    assert isinstance(req, messages.Generate) and req.params.stop == ["\n"]


def test_read_lines_skips_long_lines():
    data = b'{"a":1}\n' + b"x" * 100 + b"\n\n" + b"y" * 30 + b'\n{"b":2}'
    out = list(read_lines(io.BytesIO(data), max_bytes=32))
    assert out[0] == b'{"a":1}'
    assert isinstance(out[1], TooLong) and out[1].size == 100
    assert out[2] == b"" and out[3] == b"y" * 30 and out[4] == b'{"b":2}'


@pytest.mark.parametrize("end", [b"\n", b"\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_the_line_limit_counts_the_line_without_its_terminator(end, extra):
    """PROTOCOL.md, Errors step 1: a line of exactly the limit is read whether it ends in \\n or \\r\\n."""
    limit = 64
    line = b"a" * (limit + extra)
    data = b'{"x":1}' + end + line + end + b'{"y":2}' + end
    out = list(read_lines(io.BytesIO(data), max_bytes=limit))
    assert out[0] == b'{"x":1}' and out[2] == b'{"y":2}' and len(out) == 3, out
    if extra <= 0:
        assert out[1] == line
    else:
        assert isinstance(out[1], TooLong) and out[1].size == limit + 1 and out[1].head.rstrip(b"\r") == line


def test_the_last_line_without_a_newline():
    assert list(read_lines(io.BytesIO(b"a" * 64), max_bytes=64)) == [b"a" * 64]
    out = list(read_lines(io.BytesIO(b"a" * 66), max_bytes=64))
    assert len(out) == 1 and isinstance(out[0], TooLong)


@pytest.mark.parametrize("head,rid", [
    (b'{"type":"generate","id":"g1","prompt":{"text":"aaaa', "g1"),
    (b'{ "id" : "sp\\"q", "type"', 'sp"q'),
    (b'{"prompt":{"id":"inner","text":"a"},"id":"outer","params":{"x', "outer"),  # only the top-level one
    (b'{"messages":[{"id":"x"}],"type":"generate","id":"late","prompt', "late"),
    (b'{"x":"id","id":"k"', "k"),  # "id" as a value is not the key
    (b'{"type":"generate","prompt":{"text":"aaaa', None),  # the id comes after the cut
    (b'{"id":5,"type"', None),
    (b'{"id":"","type"', None),
    (b'{"id":"\\ud800","type"', None),
    (b'[{"id":"a"}', None),
    (b'{"id":"cut sho', None),
])
def test_id_in_the_head_of_an_oversized_line(head, rid):
    assert id_in_head(head) == rid


def _validator():
    import jsonschema

    return jsonschema.Draft202012Validator(json.loads(schema_text()))


@pytest.mark.parametrize("doc", [
    {"type": "generate", "id": "g", "prompt": {}},  # exactly one of text/tokens/messages
    {"type": "generate", "id": "g", "prompt": {"text": "a", "tokens": [1]}},
    {"type": "generate", "id": "g", "prompt": {"text": "a"}, "params": {"logit_bias": {"x": 1.0}}},
    {"type": "generate", "id": "g", "prompt": {"text": "a"}, "params": {"logit_bias": {"-1": 1.0}}},
    {"type": "generate", "id": "g", "prompt": {"text": "a"}, "params": {"bogus": 1}},
    {"type": "done", "id": "g", "seq": 2, "request": "generate", "surprise": 1},  # events are closed too
    {"type": "done", "id": "g", "request": "generate"},  # seq is required
    {"type": "done", "id": "g", "seq": 2, "request": "dance"},
    {"type": "error", "id": "g", "seq": 2, "code": "oops", "number": 1, "message": "m"},
    {"type": "done", "id": "s", "seq": 2, "request": "status", "state": "sleeping"},
])
def test_schema_rejects_what_the_worker_rejects(doc):
    assert not _validator().is_valid(doc)
    if "params" in doc:  # the worker rejects these lines when it reads them (a bad prompt: in the engine)
        with pytest.raises(WorkerError):
            decode_request(json.dumps(doc).encode())


@pytest.mark.parametrize("doc", [
    {"type": "generate", "id": "g", "prompt": {"text": "a", "tokens": None}},
    {"type": "generate", "id": "g", "prompt": {"tokens": [1, 2]}, "params": {"logit_bias": {"12": -5}}},
    {"type": "generate", "id": "g", "prompt": {"messages": [{"role": "user", "content": "hi"}]},
     "params": {"json_schema": True}},
    {"type": "done", "id": "g", "seq": 9, "request": "generate", "stop_reason": "eos", "text": ""},
])
def test_schema_accepts_what_the_worker_accepts(doc):
    assert _validator().is_valid(doc)
    if doc["type"] == "generate":
        decode_request(json.dumps(doc).encode())


def test_no_nonstandard_keywords():
    assert '"discriminator"' not in schema_text()


def test_protocol_md_links_resolve():
    import re

    text = (ROOT / "PROTOCOL.md").read_text(encoding="utf-8")
    links = set(re.findall(r"\]\(#([a-z0-9_-]+)\)", text))
    headings = {h.strip().lower().replace(" ", "-").replace("`", "") for h in re.findall(r"^#+ (.+)$", text, re.M)}
    assert links and not links - headings, sorted(links - headings)


def _doc_events(section: str) -> list:
    """The event lines (``← {...}``) of the first code block after ``section`` in PROTOCOL.md, each
    checked against the JSON Schema."""
    import jsonschema

    text = (ROOT / "PROTOCOL.md").read_text(encoding="utf-8")
    block = text.split(section, 1)[1].split("```", 2)[1]
    schema = json.loads(schema_text())
    validator = jsonschema.Draft202012Validator({**schema, "oneOf": [{"$ref": "#/$defs/Event"}]})
    events = [json.loads(line[2:]) for line in block.splitlines() if line.startswith("← {")]
    for ev in events:
        errors = list(validator.iter_errors(ev))
        assert not errors, (ev, errors[0].message)
    return events


def test_transcript_lines_match_the_schema():
    """Every event line of PROTOCOL.md's transcript is a valid event of this version."""
    events = _doc_events("## Transcript")
    assert events
    assert events[0]["protocol_version"] == messages.PROTOCOL_VERSION


def test_tool_round_trip_lines_match_the_schema():
    """The tool round trip in PROTOCOL.md (*Tools and reasoning*): every event line is a valid event."""
    events = _doc_events("## Tools and reasoning")
    assert {e["type"] for e in events} >= {"tool_call", "done"}


def test_every_version_a_host_reads_is_this_one():
    """PROTOCOL.md's title and transcript and the README's sample `ready` say PROTOCOL_VERSION."""
    import re

    protocol = (ROOT / "PROTOCOL.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert protocol.splitlines()[0] == f"# mlx-worker protocol, version {messages.PROTOCOL_VERSION}"
    for name, text in (("PROTOCOL.md", protocol), ("README.md", readme)):
        said = re.findall(r'"protocol_version":\s*"([0-9.]+)"', text)
        assert said and set(said) == {messages.PROTOCOL_VERSION}, (name, said)


def _fields(cls) -> set:
    return set(cls.__struct_fields__) - {"id", "seq", "request"}


def test_the_stats_prose_names_every_stats_field():
    """generate's events, item 3 (`stats`), names every field a host may get."""
    text = (ROOT / "PROTOCOL.md").read_text(encoding="utf-8")
    item = text.split("\n3. `stats`:", 1)[1].split("\n4. ", 1)[0]
    missing = {f for f in _fields(messages.Stats) if f"`{f}`" not in item}
    assert not missing, sorted(missing)


def test_the_done_fields_table_names_every_done_field():
    """The table "Which `done` fields a request gets" names every field of `done`, each in the row of a
    request that gets it (generate: its answer, its tool calls, its reasoning)."""
    text = (ROOT / "PROTOCOL.md").read_text(encoding="utf-8")
    table = text.split("**Which `done` fields a request gets:**", 1)[1].split("\n\n", 2)[1]
    rows = {line.split("|")[1].strip(): line.split("|")[2] for line in table.splitlines()[2:]}
    named = {f for f in _fields(messages.Done) if any(f"`{f}`" in cells for cells in rows.values())}
    assert named == _fields(messages.Done), sorted(_fields(messages.Done) - named)
    generate = rows["`generate`"]
    for f in ("stop_reason", "text", "tool_calls", "reasoning", "cached_tokens", "cache_miss_reason"):
        assert f"`{f}`" in generate, f

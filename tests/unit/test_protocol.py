"""The protocol definition: generated docs and schema are fresh, decoding classifies errors."""

import json

import msgspec
import pytest

from worker.protocol import CODES, WorkerError, decode_request, messages
from worker.protocol.docs import ROOT, refresh
from worker.protocol.framing import TooLong, read_lines
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
    import io

    data = b'{"a":1}\n' + b"x" * 100 + b"\n\n" + b"y" * 30 + b'\n{"b":2}'
    out = list(read_lines(io.BytesIO(data), max_bytes=32))
    assert out[0] == b'{"a":1}'
    assert isinstance(out[1], TooLong) and out[1].size == 101
    assert out[2] == b"" and out[3] == b"y" * 30 and out[4] == b'{"b":2}'


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

"""The framing rule for bad lines (PROTOCOL.md, Errors): each case's code is decided by the worker's own
checks, not by the JSON decoder, so it is the same with any msgspec version (`make check-newest`)."""

import json

import pytest

from tests.support.client import Worker
from worker.protocol import WorkerError, decode_request

# (line, code, echoed id); every byte and escape sequence is spelled out so nothing depends on a JSON encoder.
CASES = [
    # invalid UTF-8, anywhere in the line -> parse_error, never an id
    (b'{"type":"status","id":"\xff"}', "parse_error", None),
    (b'{"type":"status","id":"a","x":"\xed\xa0\x80"}', "parse_error", None),  # an encoded surrogate
    (b'{"type":"status","id":"a","x":"\xed\xbf\xbf"}', "parse_error", None),
    (b'{"type":"status","id":"a","x":"\xc0\xaf"}', "parse_error", None),  # an overlong "/"
    (b'{"type":"status","id":"a","x":"\xe2\x82"}', "parse_error", None),  # a truncated sequence
    (b'{"type":"status","id":"a"} \xff', "parse_error", None),  # outside any string
    (b'{"type":"status","id":"a","\xff":1}', "parse_error", None),  # in a key
    (b'{"type":"generate","id":"g","prompt":{"text":"\xf4\x90\x80\x80"}}', "parse_error", None),  # > U+10FFFF
    # lone surrogate escapes, in any key or value -> invalid_request, the id echoed when it is valid
    (b'{"type":"status","id":"\\ud800"}', "invalid_request", None),
    (b'{"type":"status","id":"\\udc00x"}', "invalid_request", None),
    (b'{"type":"status","id":"a","x":"\\ud800"}', "invalid_request", "a"),
    (b'{"type":"status","id":"a","x":"\\uDFFF"}', "invalid_request", "a"),
    (b'{"type":"status","id":"a","x":"\\ud83d\\ud83d"}', "invalid_request", "a"),  # two highs
    (b'{"type":"status","id":"a","\\ud800":1}', "invalid_request", "a"),  # a key
    (b'{"type":"generate","id":"g","prompt":{"text":"hi \\ud800"}}', "invalid_request", "g"),
    (b'{"type":"generate","id":"g","prompt":{"messages":[{"role":"user","content":"\\udead"}]}}',
     "invalid_request", "g"),
    (b'{"type":"generate","id":"g","prompt":{"text":"x"},"params":{"stop":["a","\\ud800"]}}',
     "invalid_request", "g"),
    (b'{"type":"cancel","id":"c","target":"\\ud800"}', "invalid_request", "c"),
    (b'{"type":"load","id":"l","model_path":"/m/\\udbff"}', "invalid_request", "l"),
    # ... and before the field checks: a lone surrogate in an otherwise invalid request
    (b'{"type":"generate","id":"g","prompt":{"text":"\\ud800"},"params":{"max_tokens":"9"}}',
     "invalid_request", "g"),
    (b'{"type":"dance","id":"d","x":"\\ud800"}', "invalid_request", "d"),
    (b'{"id":"\\ud800","type":"dance"}', "invalid_request", None),
]

VALID = [
    # an escaped surrogate pair is one character (U+1F600), not a lone surrogate
    (b'{"type":"generate","id":"g","prompt":{"text":"\\ud83d\\ude00"}}', "\U0001F600"),
    (b'{"type":"generate","id":"g","prompt":{"text":"\\uD83D\\uDE00!"}}', "\U0001F600!"),
    # an escaped backslash followed by the letters "ud800" is plain text
    (b'{"type":"generate","id":"g","prompt":{"text":"\\\\ud800"}}', "\\ud800"),
    ('{"type":"generate","id":"g","prompt":{"text":"é 中 😀"}}'.encode(), "é 中 😀"),
]


@pytest.mark.parametrize("line,code,rid", CASES)
def test_bad_line_code(line, code, rid):
    with pytest.raises(WorkerError) as info:
        decode_request(line)
    assert info.value.code == code, info.value.message
    assert getattr(info.value, "request_id", None) == rid
    info.value.message.encode("utf-8")  # the message itself can always be written


@pytest.mark.parametrize("line,text", VALID)
def test_valid_unicode_decodes(line, text):
    assert decode_request(line).prompt.text == text


def test_lone_surrogate_message_names_the_field():
    with pytest.raises(WorkerError) as info:
        decode_request(b'{"type":"generate","id":"g","prompt":{"text":"x"},"params":{"stop":["a","\\ud800"]}}')
    assert "$.params.stop[1]" in info.value.message


def test_bad_lines_through_the_process():
    """The same lines through the real worker: one error each, with the code and id above."""
    w = Worker()
    try:
        for i, (line, code, rid) in enumerate(CASES):
            w.send_raw(line + b"\n")
            w.send({"type": "status", "id": f"probe{i}"})
            events = w.collect(f"probe{i}")
            errors = [e for e in w.backlog + events if e["type"] == "error"]
            w.backlog.clear()
            assert [(e["code"], e["id"]) for e in errors] == [(code, rid)], (line, errors)
        events = w.request(json.loads(VALID[0][0]))  # no model: the line itself was accepted
        assert events[-1]["code"] == "no_model"
    finally:
        w.close()


def _status_line(rid: str, size: int) -> bytes:
    """A status request of exactly ``size`` bytes (padded with spaces, which JSON allows)."""
    line = b'{"type":"status","id":"' + rid.encode() + b'"'
    return line + b" " * (size - len(line) - 1) + b"}"


def test_a_line_of_the_limit_is_read_whatever_its_terminator():
    """PROTOCOL.md, Errors step 1: the limit counts a line without its \\n or \\r\\n; one byte more is
    line_too_long, answered with the line's id (its beginning holds it)."""
    limit = 1024
    w = Worker(args=["--max-line-bytes", str(limit)])
    try:
        for end in (b"\n", b"\r\n"):
            for extra in (-1, 0, 1):
                rid = f"s{extra}{len(end)}"
                line = _status_line(rid, limit + extra)
                assert len(line) == limit + extra
                w.send_raw(line + end)
                ev = w.collect(rid)[-1]
                if extra <= 0:
                    assert ev["type"] == "done" and ev["request"] == "status", (end, extra, ev)
                else:
                    assert ev["type"] == "error" and ev["code"] == "line_too_long", (end, extra, ev)
                    assert str(limit + 1) in ev["message"], ev
    finally:
        w.close()

"""Line framing and request decoding: bytes in, a typed request (or a precise error) out."""

import json
import re
from typing import BinaryIO, Iterator, Optional, Tuple

import msgspec
import numpy as np

from .errors import WorkerError
from .messages import REQUEST_TYPES, AnyRequest

DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024

_decoder = msgspec.json.Decoder(AnyRequest)
_raw_decoder = msgspec.json.Decoder()


HEAD_BYTES = 64 * 1024  # of an oversized line, kept to find its id (id_in_head)


class TooLong:
    """Stands in for a line that exceeded the limit (its bytes were skipped but its first ``HEAD_BYTES``)."""

    def __init__(self, size: int, head: bytes = b""):
        self.size = size  # bytes, without the terminator
        self.head = head


def read_lines(stream: BinaryIO, max_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[object]:
    """Yield each line (bytes, without its ``\n`` or ``\r\n`` and trailing ``\r``s) or a ``TooLong`` for one
    whose bytes before that terminator exceed ``max_bytes``.

    Reads at most ``max_bytes + 2`` bytes per call (the line and a ``\r\n``), so a huge line never sits in
    memory: its remainder is skipped up to the next newline and serving continues.
    """
    while True:
        line = stream.readline(max_bytes + 2)
        if not line:
            return
        if line.endswith(b"\n"):
            body = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        elif len(line) < max_bytes + 2:  # the last line, without a newline
            body = line
        else:  # max_bytes + 2 bytes and no newline yet: too long whatever follows
            size, tail = len(line), line[-2:]
            while True:
                rest = stream.readline(max_bytes)
                size, tail = size + len(rest), (tail + rest)[-2:]
                if not rest or rest.endswith(b"\n"):
                    break
            yield TooLong(size - len(_terminator(tail)), line[:HEAD_BYTES])
            continue
        if len(body) > max_bytes:
            yield TooLong(len(body), body[:HEAD_BYTES])
            continue
        yield body.rstrip(b"\r")


def _terminator(end: bytes) -> bytes:
    return b"\r\n" if end.endswith(b"\r\n") else b"\n" if end.endswith(b"\n") else b""


# the JSON tokens that matter to find a top-level key: strings, brackets, colons and commas
_HEAD_TOKENS = re.compile(rb'"(?:\\.|[^"\\])*"|[{}\[\]:,]')


def id_in_head(head: bytes) -> Optional[str]:
    """The top-level ``"id"`` of a line cut short (an oversized one), when its beginning holds it: a valid id
    (1-256 characters of Unicode) written before any long value, as hosts write ``{"type":..,"id":..,...}``."""
    depth, key, after_colon = 0, None, False
    for m in _HEAD_TOKENS.finditer(head):
        tok = m.group()
        if tok in (b"{", b"["):
            depth += 1
        elif tok in (b"}", b"]"):
            depth -= 1
        elif tok == b":":
            after_colon = depth == 1 and key is not None
            continue
        elif tok != b",":  # a string: a key at depth 1, or a value
            if after_colon and key == b'"id"':
                try:
                    rid = json.loads(tok)
                except ValueError:
                    return None
                return rid if _valid_id(rid) else None
            key = tok if depth == 1 and not after_colon else None
            after_colon = False
            continue
        key, after_colon = None, False
        if depth <= 0:
            return None
    return None


def decode_request(line: bytes) -> AnyRequest:
    """Decode one line. Raises ``WorkerError`` (only) with ``request_id`` set when the id was readable.

    Which error a bad line gets is decided here, in the order PROTOCOL.md lists, and not by the
    decoder: UTF-8 and lone surrogates are checked before msgspec sees the line, so the codes do not
    change with msgspec's version.
    """
    try:
        line.decode("utf-8")  # strict: no encoded surrogates, no overlong forms, no stray bytes
    except UnicodeDecodeError as exc:
        raise _error("parse_error", f"the line is not valid UTF-8 (byte {exc.start}: {exc.reason})", None)
    if _SURROGATE_ESCAPE.search(line):
        _reject_lone_surrogates(line)
    try:
        return _decoder.decode(line)
    except msgspec.DecodeError as exc:
        typed_error = exc
    except (UnicodeError, RecursionError, ValueError, OverflowError) as exc:
        raise _error("parse_error", f"the line is not valid UTF-8 JSON: {type(exc).__name__}: {exc}", None)
    try:
        code, message, rid = _diagnose(line, typed_error)
    except Exception as exc:  # the diagnosis itself must never take the reader down
        code, message, rid = "parse_error", f"the line is not valid JSON: {type(exc).__name__}", None
    raise _error(code, message, rid)


def _error(code: str, message: str, rid: Optional[str]) -> WorkerError:
    err = WorkerError(code, message)
    err.request_id = rid
    return err


# A high surrogate escape not followed by a low one, or a low one not preceded by a high one.
# (A false alarm, e.g. an escaped backslash before "ud800", only costs the slow check below.)
_SURROGATE_ESCAPE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def _reject_lone_surrogates(line: bytes) -> None:
    """Refuse a line with a lone UTF-16 surrogate escape in any key or value: it is not Unicode.

    The standard library's JSON decoder keeps lone surrogates as they are (msgspec's behaviour has
    changed between versions), so it finds them; a line it cannot parse is left to the main path.
    """
    if nesting_depth(line) > MAX_DEPTH:
        return
    try:
        obj = json.loads(line, parse_constant=_reject, parse_int=_any_int, parse_float=_any_int)
    except (ValueError, RecursionError):
        return
    path = _lone_surrogate_path(obj)
    if path is None:
        return
    rid = obj.get("id") if isinstance(obj, dict) else None
    if not _valid_id(rid):
        rid = None
    raise _error("invalid_request", f"`{path}` contains a lone UTF-16 surrogate escape "
                 "(\\ud800-\\udfff without its pair), which is not valid Unicode", rid)


def _lone_surrogate_path(obj) -> Optional[str]:
    """The JSON path of the first string (key or value) that holds a lone surrogate, else None."""
    stack = [("$", obj)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not valid_text(value):
                return path
        elif isinstance(value, dict):
            for key, item in value.items():
                if not valid_text(key):
                    return path
                stack.append((f"{path}.{key}", item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


def valid_text(s: str) -> bool:
    """Whether a str is Unicode (no lone surrogates), so it can be written as UTF-8."""
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _valid_id(rid) -> bool:
    return isinstance(rid, str) and 1 <= len(rid) <= 256 and valid_text(rid)


MAX_DEPTH = 128
_STRINGS = re.compile(rb'"(?:\\.|[^"\\])*"')


def nesting_depth(line: bytes) -> int:
    """How deeply arrays/objects nest (strings ignored), computed without recursion."""
    brackets = np.frombuffer(_STRINGS.sub(b"", line), dtype=np.uint8)
    steps = (np.isin(brackets, (91, 123)).astype(np.int32) - np.isin(brackets, (93, 125)))
    return int(np.cumsum(steps).max(initial=0))


def _diagnose(line: bytes, typed_error: Exception) -> Tuple[str, str, Optional[str]]:
    if nesting_depth(line) > MAX_DEPTH:  # decided here, not by whatever stack depth is left
        return "parse_error", f"the line nests arrays/objects deeper than {MAX_DEPTH} levels", None
    try:
        obj = _raw_decoder.decode(line)
    except msgspec.DecodeError as exc:
        try:  # valid JSON that msgspec cannot hold, e.g. a number beyond float range
            obj = json.loads(line, parse_constant=_reject, parse_int=_any_int, parse_float=_any_int)
        except (ValueError, RecursionError):
            return "parse_error", f"the line is not valid JSON: {exc}", None
    if not isinstance(obj, dict):
        return "invalid_request", f"a request must be a JSON object, got {type(obj).__name__}", None
    rid = obj.get("id")
    if not _valid_id(rid):
        return "invalid_request", "a request needs a string `id` (1-256 characters)", None
    kind = obj.get("type")
    if not isinstance(kind, str):
        return "invalid_request", "a request needs a string `type`", rid
    if kind not in REQUEST_TYPES:
        known = ", ".join(sorted(REQUEST_TYPES))
        return "unknown_type", f"unknown request type {kind!r}; known types: {known}", rid
    return "invalid_params", f"invalid `{kind}` request: {typed_error}", rid


def _any_int(text):
    return 0  # the diagnosis only needs the structure, not the value (no 4300-digit limit)


def _reject(name):
    raise ValueError(f"{name} is not JSON")

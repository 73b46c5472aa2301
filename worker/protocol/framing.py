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
_encoder = msgspec.json.Encoder()


class TooLong:
    """Stands in for a line that exceeded the limit (its bytes were skipped)."""

    def __init__(self, size: int):
        self.size = size


def read_lines(stream: BinaryIO, max_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[object]:
    """Yield each line (bytes, without the newline) or a ``TooLong`` for an oversized one.

    Reads at most ``max_bytes + 1`` bytes per call, so a huge line never sits in memory: its
    remainder is skipped up to the next newline and serving continues.
    """
    while True:
        line = stream.readline(max_bytes + 1)
        if not line:
            return
        if len(line) > max_bytes and not line.endswith(b"\n"):
            size = len(line)
            while True:
                rest = stream.readline(max_bytes)
                size += len(rest)
                if not rest or rest.endswith(b"\n"):
                    break
            yield TooLong(size)
            continue
        yield line.rstrip(b"\r\n")


def decode_request(line: bytes) -> AnyRequest:
    """Decode one line. Raises ``WorkerError`` (only) with ``request_id`` set when the id was readable."""
    try:
        req = _decoder.decode(line)
    except msgspec.DecodeError as exc:
        typed_error = exc
    except (UnicodeError, RecursionError, ValueError, OverflowError) as exc:
        raise _error("parse_error", f"the line is not valid UTF-8 JSON: {type(exc).__name__}: {exc}", None)
    else:
        _check_encodable(req)
        return req
    try:
        code, message, rid = _diagnose(line, typed_error)
    except Exception as exc:  # the diagnosis itself must never take the reader down
        code, message, rid = "parse_error", f"the line is not valid JSON: {type(exc).__name__}", None
    raise _error(code, message, rid)


def _error(code: str, message: str, rid: Optional[str]) -> WorkerError:
    err = WorkerError(code, message)
    err.request_id = rid
    return err


def _check_encodable(req) -> None:
    """Lone UTF-16 surrogates (``"\\ud800"``) decode, but are not Unicode: nothing could echo them."""
    try:
        _encoder.encode(req)
    except UnicodeEncodeError:
        rid = req.id if _valid_text(req.id) else None
        raise _error("invalid_request", "the request contains a lone UTF-16 surrogate escape "
                     "(\\ud800-\\udfff without its pair), which is not valid Unicode", rid)


def _valid_text(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


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
    if not isinstance(rid, str) or not rid or len(rid) > 256 or not _valid_text(rid):
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

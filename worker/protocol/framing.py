"""Line framing and request decoding: bytes in, a typed request (or a precise error) out."""

import json
from typing import BinaryIO, Iterator, Optional, Tuple

import msgspec

from .errors import WorkerError
from .messages import REQUEST_TYPES, AnyRequest

DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024

_decoder = msgspec.json.Decoder(AnyRequest)
_raw_decoder = msgspec.json.Decoder()


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
    """Decode one line. Raises ``WorkerError`` with ``request_id`` set when the id was readable."""
    try:
        return _decoder.decode(line)
    except msgspec.DecodeError as exc:
        typed_error = exc
    code, message, rid = _diagnose(line, typed_error)
    err = WorkerError(code, message)
    err.request_id = rid
    raise err


def _diagnose(line: bytes, typed_error: Exception) -> Tuple[str, str, Optional[str]]:
    try:
        obj = _raw_decoder.decode(line)
    except msgspec.DecodeError as exc:
        try:  # valid JSON that msgspec cannot hold, e.g. a number beyond float range
            obj = json.loads(line, parse_constant=_reject)
        except (ValueError, RecursionError):
            return "parse_error", f"the line is not valid JSON: {exc}", None
    if not isinstance(obj, dict):
        return "invalid_request", f"a request must be a JSON object, got {type(obj).__name__}", None
    rid = obj.get("id")
    if not isinstance(rid, str) or not rid or len(rid) > 256:
        return "invalid_request", "a request needs a string `id` (1-256 characters)", None
    kind = obj.get("type")
    if not isinstance(kind, str):
        return "invalid_request", "a request needs a string `type`", rid
    if kind not in REQUEST_TYPES:
        known = ", ".join(sorted(REQUEST_TYPES))
        return "unknown_type", f"unknown request type {kind!r}; known types: {known}", rid
    return "invalid_params", f"invalid `{kind}` request: {typed_error}", rid


def _reject(name):
    raise ValueError(f"{name} is not JSON")

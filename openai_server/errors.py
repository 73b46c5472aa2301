"""OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, and the HTTP status of each of the
worker's error codes (PROTOCOL.md, Errors)."""
from __future__ import annotations

import re

# worker code -> (HTTP status, OpenAI error type, OpenAI code)
WORKER_CODES = {
    "invalid_params": (400, "invalid_request_error", "invalid_params"),
    "invalid_request": (400, "invalid_request_error", "invalid_request"),
    "parse_error": (400, "invalid_request_error", "parse_error"),
    "unknown_type": (400, "invalid_request_error", "unknown_type"),
    "line_too_long": (413, "invalid_request_error", "request_too_large"),
    "invalid_image": (400, "invalid_request_error", "invalid_image"),
    "invalid_audio": (400, "invalid_request_error", "invalid_audio"),
    "context_overflow": (400, "invalid_request_error", "context_length_exceeded"),
    "model_not_found": (404, "invalid_request_error", "model_not_found"),
    "no_model": (503, "server_error", "model_not_loaded"),
    "queue_full": (429, "rate_limit_error", "queue_full"),
    "shutting_down": (503, "server_error", "shutting_down"),
    "out_of_memory": (503, "server_error", "out_of_memory"),
    "internal": (500, "server_error", "internal_error"),
}
# the worker names a bad field by its path in the request it was sent; the OpenAI request's name for it
_FIELDS = {"params.json_schema": "response_format", "params.top_logprobs": "top_logprobs",
           "prompt.template_kwargs": "chat_template_kwargs", "cache_key": "prompt_cache_key",
           "prompt.text": "prompt", "prompt.tokens": "prompt"}
_PATH = re.compile(r"\$\.((?:params|prompt)\.[A-Za-z_]+|cache_key)((?:\[\d+\]|\.[A-Za-z_]+)*)")


class ApiError(Exception):
    """An HTTP error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def unsupported(param: str, why: str = "is not supported by this server") -> ApiError:
    return ApiError(400, f"'{param}' {why}", "invalid_request_error", param, "unsupported_parameter")


def worker_param(message: str) -> str | None:
    """The request field a worker error message names (``at `$.params.max_tokens```), as OpenAI names it."""
    m = _PATH.search(message)
    if not m:
        return None
    head, tail = m.group(1), m.group(2)
    if head in _FIELDS:
        return _FIELDS[head]
    return head.split(".", 1)[1] + tail


def from_worker(event: dict, max_tokens_name: str = "max_tokens") -> ApiError:
    """A worker ``error`` event as the HTTP error to answer."""
    status, type_, code = WORKER_CODES.get(event.get("code"), (500, "server_error", "internal_error"))
    param = worker_param(event.get("message", ""))
    if param == "max_tokens":
        param = max_tokens_name
    return ApiError(status, event.get("message", "worker error"), type_, param, code)


def unavailable(why: str) -> ApiError:
    return ApiError(503, why, "server_error", None, "worker_unavailable")

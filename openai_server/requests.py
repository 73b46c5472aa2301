"""OpenAI request bodies -> the worker's ``generate`` (PROTOCOL.md, generate; Tools and reasoning).

Every field is either translated, accepted and ignored (``IGNORED``), or refused with a 400 naming it: nothing is
dropped silently. Ranges the worker checks itself (its ``invalid_params`` names the field) are left to it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from openai_server.errors import bad, unsupported

# accepted for compatibility, with no effect here
IGNORED = {"user", "safety_identifier", "metadata", "store", "service_tier", "parallel_tool_calls"}
# sampling fields common to both endpoints: OpenAI name -> worker params name
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "presence_penalty": "presence_penalty",
            "frequency_penalty": "frequency_penalty", "logit_bias": "logit_bias",
            # extensions other OpenAI-compatible servers (vLLM, mlx-lm) accept too
            "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty"}
COMMON = {"model", "stream", "stream_options", "stop", "max_tokens", "n", "prompt_cache_key", *SAMPLING, *IGNORED}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "tools", "tool_choice", "response_format", "logprobs",
                        "top_logprobs", "chat_template_kwargs"}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo", "suffix", "best_of"}
_ROLES = {"system", "developer", "user", "assistant", "tool"}
_MESSAGE_FIELDS = {"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content", "reasoning",
                   "refusal"}


@dataclass
class Job:
    """One HTTP request, translated: the worker's generate and what the answer must report."""
    generate: dict
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: no logprobs; else how many alternatives per token
    max_tokens_name: str = "max_tokens"
    extra: dict = field(default_factory=dict)


def _check_fields(body, allowed: set) -> None:
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object", "invalid_request")
    for key in body:
        if key not in allowed:
            raise unsupported(key, "is not a recognized or supported request argument")


def _type(body: dict, key: str, types, what: str):
    value = body.get(key)
    if value is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in _tuple(types)):
        raise bad(key, f"'{key}' must be {what}", "invalid_type")
    return value


def _tuple(types):
    return types if isinstance(types, tuple) else (types,)


def _common(body: dict, params: dict) -> dict:
    """The fields both endpoints share: n, stop, sampling, stream options."""
    n = _type(body, "n", int, "an integer")
    if n not in (None, 1):
        raise unsupported("n", "must be 1: this server returns one choice per request")
    for key, name in SAMPLING.items():
        if body.get(key) is not None:
            params[name] = body[key]
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                "repetition_penalty"):
        _type(body, key, (int, float), "a number")
    _type(body, "seed", int, "an integer")
    _type(body, "logit_bias", dict, "an object mapping token ids to biases")
    stop = body.get("stop")
    if isinstance(stop, str):
        params["stop"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if stop:
            params["stop"] = stop
    elif stop is not None:
        raise bad("stop", "'stop' must be a string or a list of strings", "invalid_type")
    stream = _type(body, "stream", bool, "a boolean") or False
    options = _type(body, "stream_options", dict, "an object") or {}
    for key in options:
        if key != "include_usage":
            raise unsupported(f"stream_options.{key}")
    if options and not stream:
        raise bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
    extra = {}
    key = _type(body, "prompt_cache_key", str, "a string")
    if key:
        extra["cache_key"] = key
    return {"stream": stream, "include_usage": bool(options.get("include_usage")), "extra": extra}


def _max_tokens(body: dict, params: dict, keys=("max_completion_tokens", "max_tokens"), default=None) -> str:
    for key in keys:
        value = _type(body, key, int, "an integer")
        if value is not None:
            params["max_tokens"] = value
            return key
    if default is not None:
        params["max_tokens"] = default
    return keys[-1]


def _image_url(url, where: str, local_files: bool) -> None:
    if not isinstance(url, str) or not url:
        raise bad(where, f"'{where}' must be a non-empty string", "invalid_type")
    if url.startswith("data:"):
        return
    if url.startswith(("http://", "https://")):
        raise bad(where, "image URLs are not fetched: send the image as a data: URL (base64)", "invalid_image_url")
    if not local_files:
        raise bad(where, "local image files are turned off on this server: send a data: URL", "invalid_image_url")
    if not (url.startswith("file://") or url.startswith("/")):
        raise bad(where, "an image URL must be a data: URL, a file:// URL or an absolute path", "invalid_image_url")


def _part(part, where: str, local_files: bool) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("text", "refusal"):
        text = part.get(kind)
        if not isinstance(text, str):
            raise bad(f"{where}.{kind}", f"'{where}.{kind}' must be a string", "invalid_type")
        return {"type": "text", "text": text}
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        _image_url(url, f"{where}.image_url.url", local_files)
        return {"type": "image_url", "image_url": {"url": url}}
    if kind == "input_audio":
        audio = part.get("input_audio") or {}
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
            raise bad(f"{where}.input_audio.data", "input_audio needs base64 'data'", "invalid_type")
        return {"type": "audio", "data": audio["data"]}
    raise bad(f"{where}.type", f"content part type {kind!r} is not supported (text, image_url, input_audio)",
              "invalid_type")


def _content(content, where: str, local_files: bool):
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(where, f"'{where}' must be a string or a list of content parts", "invalid_type")
    parts = [_part(p, f"{where}[{j}]", local_files) for j, p in enumerate(content)]
    if all(p["type"] == "text" for p in parts):  # chat templates expect a string where there is only text
        return "\n".join(p["text"] for p in parts)
    return parts


def _message(m, i: int, local_files: bool) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad(where, f"'{where}' must be an object", "invalid_type")
    for key in m:
        if key not in _MESSAGE_FIELDS:
            raise unsupported(f"{where}.{key}")
    role = m.get("role")
    if role not in _ROLES:
        raise bad(f"{where}.role", f"'{where}.role' must be one of {sorted(_ROLES)}")
    out = {"role": "system" if role == "developer" else role,
           "content": _content(m.get("content"), f"{where}.content", local_files)}
    if out["content"] is None and role != "assistant":
        raise bad(f"{where}.content", f"'{where}.content' is required for role {role}")
    if m.get("tool_calls"):
        calls = m["tool_calls"]
        if role != "assistant" or not isinstance(calls, list):
            raise bad(f"{where}.tool_calls", "'tool_calls' is a list, on assistant messages only")
        out["tool_calls"] = [{"id": c.get("id"), "type": "function", "function": c.get("function")}
                             if isinstance(c, dict) else c for c in calls]
    if role == "tool":
        out["tool_call_id"] = m.get("tool_call_id")
        if m.get("name") is not None:
            out["name"] = m["name"]
    return out  # reasoning_content of earlier turns is dropped: templates render past turns without it


def _response_format(rf, params: dict) -> None:
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return
    if kind == "json_object":
        params["json_schema"] = True
    elif kind == "json_schema":
        spec = rf.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad("response_format.json_schema.schema", "response_format json_schema needs a 'schema' object")
        params["json_schema"] = schema
    else:
        raise bad("response_format.type", "response_format.type must be text, json_object or json_schema")


def _tools(body: dict, prompt: dict) -> None:
    tools = body.get("tools")
    if tools is None:
        if body.get("tool_choice") not in (None, "none", "auto"):
            raise bad("tool_choice", "'tool_choice' needs 'tools'")
        return
    if not isinstance(tools, list) or not all(isinstance(t, dict) and t.get("type", "function") == "function"
                                              and isinstance(t.get("function"), dict) for t in tools):
        raise bad("tools", "'tools' must be a list of {\"type\": \"function\", \"function\": {...}}")
    if tools:
        prompt["tools"] = tools
        if body.get("tool_choice") is not None:
            prompt["tool_choice"] = body["tool_choice"]


def chat_job(body, local_files: bool = True) -> Job:
    """A /v1/chat/completions body as a Job."""
    _check_fields(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list", "invalid_type")
    prompt = {"messages": [_message(m, i, local_files) for i, m in enumerate(messages)]}
    params: dict = {}
    common = _common(body, params)
    name = _max_tokens(body, params)
    _tools(body, prompt)
    if body.get("response_format") is not None:
        _response_format(body["response_format"], params)
    kwargs = _type(body, "chat_template_kwargs", dict, "an object")
    if kwargs:
        prompt["template_kwargs"] = kwargs
    logprobs = None
    top = _type(body, "top_logprobs", int, "an integer")
    if _type(body, "logprobs", bool, "a boolean"):
        logprobs = top or 0
        params["top_logprobs"] = max(logprobs, 1)  # the worker reports a token's logprob with its alternatives
    elif top:
        raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    return Job({"type": "generate", "prompt": prompt, "params": params, **common.pop("extra")},
               logprobs=logprobs, max_tokens_name=name, **common)


def _prompt(value) -> dict:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str):
        return {"text": value}
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return {"tokens": value}
    if isinstance(value, list) and len(value) > 1:
        raise unsupported("prompt", "must be one prompt: batches of prompts are not supported")
    raise bad("prompt", "'prompt' must be a string or a list of token ids", "invalid_type")


def completion_job(body) -> Job:
    """A /v1/completions body as a Job (OpenAI's default of 16 tokens)."""
    _check_fields(body, COMPLETION_FIELDS)
    if "prompt" not in body:
        raise bad("prompt", "'prompt' is required", "missing_required_parameter")
    if body.get("echo"):
        raise unsupported("echo")
    if body.get("suffix"):
        raise unsupported("suffix")
    if body.get("best_of") not in (None, 1):
        raise unsupported("best_of", "must be 1")
    params: dict = {}
    common = _common(body, params)
    _max_tokens(body, params, ("max_tokens",), default=16)
    logprobs = _type(body, "logprobs", int, "an integer")
    if logprobs is not None:
        if not 0 <= logprobs <= 5:
            raise bad("logprobs", "'logprobs' must be between 0 and 5")
        params["top_logprobs"] = max(logprobs, 1)
    return Job({"type": "generate", "prompt": _prompt(body["prompt"]), "params": params, **common.pop("extra")},
               logprobs=logprobs, **common)

"""Tools in, tool calls out: chat messages for the template, the model's call format, constrained calls.

The chat template renders ``tools``, assistant ``tool_calls`` and ``tool`` messages (HF's conventions:
arguments as an object). mlx-lm tells which call format a template uses (``TokenizerWrapper``:
``tool_call_start`` / ``tool_call_end`` and the parser; ``tool_parser_type`` names it). A template that
ignores tools (SmolLM2's) gets the worker's own system prompt in the Hermes format that Qwen uses, parsed
by mlx-lm's ``json_tools``, so tools work with any chat model. A constrained call (``tool_choice``
``required`` or a named function) is an llguidance grammar: the format's markers around a JSON object
whose ``name`` is the function's and whose ``arguments`` follow its schema, written with ``json.dumps``'
separators, so the template re-renders the call as it was generated.
"""

import functools
import json
from dataclasses import dataclass
from typing import Callable, Optional

from ..protocol import FunctionCall, ToolCall, WorkerError

# what apply_chat_template or the worker set themselves
RESERVED_KWARGS = frozenset({"messages", "conversation", "tools", "documents", "add_generation_prompt",
                             "tokenize", "return_dict", "continue_final_message", "chat_template",
                             "return_tensors", "padding", "truncation", "max_length", "tokenizer_kwargs"})

WORKER_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>"
)

# the text between a format's markers, as its templates render one call: (before, after) the JSON object
_CALL_BODY = {"json_tools": ("\n", "\n"), "mistral": ("[", "]")}


@dataclass(frozen=True)
class ToolFormat:
    parser: str  # mlx-lm's parser module name
    start: str
    end: str
    parse: Callable
    source: str  # "template" | "worker"


def tool_format(tokenizer) -> Optional[ToolFormat]:
    """The model's tool-call format: its template's (as mlx-lm infers it), the worker's for a template
    that ignores tools, or None (a template that renders tools in a format mlx-lm cannot parse)."""
    if getattr(tokenizer, "has_tool_calling", False):
        name = tokenizer._tokenizer.init_kwargs.get("tool_parser_type", "unknown")
        return ToolFormat(name, tokenizer.tool_call_start, tokenizer.tool_call_end, tokenizer.tool_parser,
                          "template")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and "tools" not in template:
        from mlx_lm.tool_parsers import json_tools

        return ToolFormat("json_tools", json_tools.tool_call_start, json_tools.tool_call_end,
                          json_tools.parse_tool_call, "worker")
    return None


def tools_on(prompt) -> bool:
    return bool(prompt.tools) and prompt.tool_choice != "none"


def check_tools(prompt) -> list:
    """The request's tools as the template gets them (plain dicts), after checking them."""
    seen, out = set(), []
    for i, tool in enumerate(prompt.tools or []):
        f = tool.function
        if f.name in seen:
            raise WorkerError("invalid_params", f"prompt.tools[{i}].function.name: {f.name!r} is defined twice")
        seen.add(f.name)
        err = _schema_error(json.dumps(f.parameters, sort_keys=True)) if f.parameters else None
        if err:
            raise WorkerError("invalid_params", f"prompt.tools[{i}].function.parameters is not a usable "
                              f"JSON Schema: {err}")
        d = {"name": f.name}  # OpenAI's order: templates render the dicts as JSON
        if f.description is not None:
            d["description"] = f.description
        d["parameters"] = f.parameters or {"type": "object", "properties": {}}
        if f.strict is not None:
            d["strict"] = f.strict
        out.append({"type": "function", "function": d})
    choice = prompt.tool_choice
    if not isinstance(choice, str) and choice.function.name not in seen:
        raise WorkerError("invalid_params", f"prompt.tool_choice names {choice.function.name!r}, which is not "
                          "in prompt.tools")
    if choice == "required" and not seen:
        raise WorkerError("invalid_params", "prompt.tool_choice is \"required\" but prompt.tools is empty")
    kwargs = prompt.template_kwargs or {}
    bad = sorted(RESERVED_KWARGS & set(kwargs))
    if bad:
        raise WorkerError("invalid_params", f"prompt.template_kwargs cannot set {', '.join(bad)}")
    return out


@functools.lru_cache(maxsize=256)
def _schema_error(schema_json: str) -> Optional[str]:
    """llguidance's verdict on a tool's schema (memoized: a chat re-sends the same tools every turn)."""
    from llguidance import LLMatcher

    err = LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(schema_json))
    return err if err and not err.startswith("WARNING") else None


def tool_fields(i: int, m, called: set) -> dict:
    """A message's tool fields for the template; ``called`` collects the call ids seen so far."""
    d = {}
    if m.tool_calls is not None:
        if m.role != "assistant":
            raise WorkerError("invalid_params", f"messages[{i}].tool_calls: only assistant messages make calls")
        d["tool_calls"] = [{"id": tc.id, "type": "function", "function": {
            "name": tc.function.name,
            "arguments": _arguments(tc.function.arguments, f"messages[{i}].tool_calls[{j}].function.arguments")}}
            for j, tc in enumerate(m.tool_calls)]
        called.update(tc.id for tc in m.tool_calls)
    if m.role == "tool":
        if m.tool_call_id is None:
            raise WorkerError("invalid_params", f"messages[{i}].tool_call_id is required for a tool message")
        if m.tool_call_id not in called:
            raise WorkerError("invalid_params", f"messages[{i}].tool_call_id {m.tool_call_id!r} answers no "
                              "earlier assistant tool call")
        d["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            d["name"] = m.name
    elif m.tool_call_id is not None:
        raise WorkerError("invalid_params", f"messages[{i}].tool_call_id: only tool messages answer calls")
    return d


def _arguments(value, field: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise WorkerError("invalid_params", f"{field} is not JSON: {exc}")
    if not isinstance(value, dict):
        raise WorkerError("invalid_params", f"{field} must be a JSON object")
    return value


def worker_rendering(messages: list, tools: list) -> list:
    """For a template that ignores tools: the tools in the system message, calls and results as text."""
    listing = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
    system = WORKER_PROMPT.format(tools=listing)
    out = []
    for d in messages:
        d = dict(d)
        calls = d.pop("tool_calls", None)
        if calls:
            d["content"] = (d.get("content") or "") + "".join(
                "<tool_call>\n" + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                             ensure_ascii=False) + "\n</tool_call>" for c in calls)
        if d["role"] == "tool":
            d = {"role": "user", "content": f"<tool_response>\n{d['content']}\n</tool_response>"}
        out.append(d)
    if not tools:  # calls and results in the history, no tools offered now
        return out
    if out and out[0]["role"] == "system" and isinstance(out[0]["content"], str):
        out[0] = dict(out[0], content=out[0]["content"] + "\n\n" + system)
    else:
        out.insert(0, {"role": "system", "content": system})
    return out


def call_grammar(kit, prompt, fmt: Optional[ToolFormat]) -> Optional[str]:
    """A Lark grammar (llguidance) for one call when tool_choice is "required" or names a function."""
    choice = prompt.tool_choice
    if not prompt.tools or choice in ("auto", "none"):
        return None
    if fmt is None or fmt.parser not in _CALL_BODY:
        raise WorkerError("invalid_params", "prompt.tool_choice: constrained calls are not available for this "
                          f"model's tool format ({fmt.parser if fmt else 'none that mlx-lm parses'}); "
                          f"use \"auto\"")
    names = [t.function.name for t in prompt.tools] if choice == "required" else [choice.function.name]
    params = {t.function.name: t.function.parameters or {"type": "object", "properties": {}} for t in prompt.tools}
    calls = [{"type": "object", "properties": {"name": {"const": n}, "arguments": params[n]},
              "required": ["name", "arguments"], "additionalProperties": False} for n in names]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = dict(schema, **{"x-guidance": {"whitespace_flexible": False, "item_separator": ", ",
                                            "key_separator": ": "}})
    before, after = _CALL_BODY[fmt.parser]
    parts = [_literal(kit, fmt.start), json.dumps(before), "call", json.dumps(after)]
    if fmt.end:
        parts.append(_literal(kit, fmt.end))
    rule = " ".join(part for part in parts if part != '""')
    return f"start: {rule}\ncall: %json {json.dumps(schema)}\n"


def _literal(kit, text: str) -> str:
    """A marker in the grammar: its special token when it is one, else its text."""
    ids = kit.tokenizer.encode(text, add_special_tokens=False)
    special = set(getattr(kit.tokenizer, "all_special_ids", []) or []) | set(
        getattr(kit.tokenizer, "added_tokens_decoder", {}) or {})
    if len(ids) == 1 and ids[0] in special:
        return f"<[{ids[0]}]>"
    return json.dumps(text)


def wire_call(call: dict) -> ToolCall:
    """A parsed call (``{"id", "name", "arguments"}``, as channels.py releases it) as the wire's ToolCall."""
    return ToolCall(id=call["id"], function=FunctionCall(
        name=call["name"], arguments=json.dumps(call["arguments"], ensure_ascii=False)))

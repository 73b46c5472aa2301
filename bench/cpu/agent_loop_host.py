"""The host's side of the agent loop (``agent_loop.py``): the messages each step appends, what the chat template
gets for them (as PROTOCOL.md says the worker renders them), the prompt text and its fresh tokenization with
offsets, and the figure's denominator: the reusable tokens of a turn."""

from __future__ import annotations

import json
from pathlib import Path

# The worker's own tool prompt for chat templates that ignore tools (PROTOCOL.md, Tools and reasoning). Written
# out here because bench does not import the worker's rooms; the results show the host's prompt length beside
# stats.prompt_tokens wherever they differ (on a first turn, where nothing is reused, only a rendering that
# differs from the worker's can make them differ).
WORKER_TOOL_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>")


def step_messages(step: dict, calls: list, image: str | None) -> list:
    """The wire messages a step appends: a user message, or one ``tool`` message per call of the last turn
    (a turn that made no call gets the result as a user message, and the record says so)."""
    if "user" in step:
        if image:
            return [{"role": "user", "content": [{"type": "image", "path": image},
                                                 {"type": "text", "text": step["user"]}]}]
        return [{"role": "user", "content": step["user"]}]
    if not calls:
        return [{"role": "user", "content": "Tool output:\n" + "\n".join(step["tool"])}]
    return [{"role": "tool", "tool_call_id": c["id"], "content": step["tool"][i % len(step["tool"])]}
            for i, c in enumerate(calls)]


def template_messages(wire: list, tools: list, renders_tools: bool) -> tuple[list, dict]:
    """What the chat template gets for these wire messages (PROTOCOL.md: arguments as objects, part lists
    joined unless they hold an image), and the template's ``tools`` argument. A template that ignores tools
    gets the worker's rendering: the tool prompt in the system message, calls and results as text."""
    images = any(isinstance(m.get("content"), list) and any(p["type"] == "image" for p in m["content"])
                 for m in wire)
    out = []
    for m in wire:
        d = {"role": m["role"], "content": _content(m.get("content") or "", images)}
        if m.get("tool_calls"):
            d["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                "name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in m["tool_calls"]]
        if m["role"] == "tool":
            d["tool_call_id"] = m["tool_call_id"]
        out.append(d)
    if renders_tools:
        return out, {"tools": tools}
    return _worker_rendering(out, tools), {}


def _content(content, images: bool):
    if isinstance(content, str):
        return content
    if not images:
        return "".join(p["text"] for p in content if p["type"] == "text")
    return [{"type": "text", "text": p["text"]} if p["type"] == "text" else {"type": "image"} for p in content]


def _worker_rendering(messages: list, tools: list) -> list:
    system = WORKER_TOOL_PROMPT.format(tools="".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools))
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
    if out and out[0]["role"] == "system" and isinstance(out[0]["content"], str):
        out[0] = dict(out[0], content=out[0]["content"] + "\n\n" + system)
    else:
        out.insert(0, {"role": "system", "content": system})
    return out


class Prompter:
    """The model's tokenizer (and processor, for images) on the host side: the rendered prompt text, its fresh
    tokenization and each token's end offset."""

    def __init__(self, path: Path, template_kwargs: dict | None):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.raw = None  # tokenizer.json's own decoder: transformers' GemmaTokenizer decodes byte-level ids wrongly
        if (path / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            self.raw = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.kwargs = dict(template_kwargs or {})
        self.renders_tools = "tools" in (self.tok.chat_template or "")
        self.processor = None
        if json.loads((path / "config.json").read_text()).get("vision_config"):
            from transformers import AutoProcessor

            self.processor = AutoProcessor.from_pretrained(str(path))

    def render(self, msgs: list, kwargs: dict, generation_prompt=True) -> str:
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt,
                                            **kwargs, **self.kwargs)

    def encode(self, text: str, images: bool) -> tuple[list, list]:
        """(ids, end offsets); with images the processor's expansion of each placeholder first."""
        if images:
            text = text.replace(self.processor.boi_token, self.processor.full_image_sequence)
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], [e for _, e in enc["offset_mapping"]], text

    def decode(self, ids: list) -> str:
        if self.raw is not None:
            return self.raw.decode(ids, skip_special_tokens=False)
        return self.tok.decode(ids, skip_special_tokens=False)


def _common(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def reusable(prev_text: str, prev_ids: list, generated: list, text: str, ends: list, p: Prompter) -> dict:
    """The new prompt's tokens whose text lies inside the common text prefix (``reusable``), that prefix in
    characters, and how much of the generated text it keeps (``generated_chars_kept`` of ``generated_chars``)."""
    head = p.decode(prev_ids)
    said = p.decode(prev_ids + generated)[len(head):]
    # what the host got streamed: mlx-lm's detokenizer drops an answer's one leading space, and the host re-sends
    # that text; both count as the previous output
    n = max(_common(prev_text + s, text) for s in {said, said[1:] if said.startswith(" ") else said})
    k = 0
    while k < len(ends) and ends[k] <= n:
        k += 1
    return {"reusable": k, "common_chars": n, "generated_chars_kept": max(0, n - len(prev_text)),
            "generated_chars": len(said)}

"""A generate request's prompt -> token ids, cache key and (for images) input embeddings.

Validation happens once, in ``normalise``: it turns ``text`` / ``tokens`` / ``messages`` (+ images) into a
``PromptInput``. Text-only prompts are tokenized here; prompts with images go to the model's VisionAddOn,
which returns the ``PromptPlan``. This module knows the kit only by duck typing (no import of model.py).
"""

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

from ..protocol import AudioPart, Generate, TextPart, WorkerError
from .boundaries import system_end, token_checkpoints
from .prefix_tokens import detokenizer
from .tools import check_tools, tool_fields, tools_on, worker_rendering


@dataclass
class PromptInput:
    """A validated prompt: either ``ids`` (given tokens, no images) or ``text`` to tokenize."""

    text: Optional[str] = None
    ids: Optional[List[int]] = None
    images: list = field(default_factory=list)  # ImagePart / ImageUrlPart, in prompt order
    audio: list = field(default_factory=list)  # AudioPart, in prompt order
    add_special_tokens: bool = True
    boundaries: tuple = ()  # characters of ``text`` where the next turn may leave it (boundaries.py)


@dataclass
class PromptPlan:
    ids: List[int]  # what the text model sees
    key: List[int]  # what the prompt cache matches on: ids, with image positions made image-specific
    embed: Optional[Callable[[int], Any]] = None  # with images: reused -> embeddings of ids[reused:]
    state: Any = None  # a VisionAddOn's per-request state (a context manager, e.g. M-RoPE), or None
    # the model generated these ids after this prompt: told to the tokenizer that made ``ids`` (prefix_tokens.py),
    # so a follow-up whose text continues prompt and output reuses both; None for a prompt sent as tokens
    remember: Optional[Callable[[List[int]], None]] = None
    checkpoints: tuple = ()  # token positions where the next turn may leave it (boundaries.py), ascending


def build_prompt(kit, req: Generate) -> PromptPlan:
    inp = normalise(kit, req)
    if inp.images or inp.audio:
        return kit.addon.build_prompt(kit, inp)
    if inp.ids is not None:
        ids, remember = inp.ids, None
    else:
        ids = kit.encoder.encode(inp.text, inp.add_special_tokens)
        remember = functools.partial(kit.encoder.remember_output, inp.text, inp.add_special_tokens, ids,
                                     detokenize=detokenizer(kit.tokenizer))
    if not ids:
        raise WorkerError("invalid_params", "the prompt is empty")
    checkpoints = ()
    if kit.cache.bounded and inp.text is not None:
        checkpoints = token_checkpoints(kit.tokenizer, inp.text, ids, inp.add_special_tokens, inp.boundaries)
    return PromptPlan(ids=ids, key=ids, remember=remember, checkpoints=checkpoints)


def normalise(kit, req: Generate) -> PromptInput:
    """Check the prompt against the loaded model and render chat messages through its template."""
    p = req.prompt
    if sum(x is not None for x in (p.text, p.tokens, p.messages)) != 1:
        raise WorkerError("invalid_params", "prompt needs exactly one of `text`, `tokens`, `messages`")
    for name in ("tools", "template_kwargs"):
        if getattr(p, name) is not None and p.messages is None:
            raise WorkerError("invalid_params", f"prompt.{name} needs prompt.messages (the chat template uses it)")
    if p.tool_choice != "auto" and not p.tools:
        raise WorkerError("invalid_params", "prompt.tool_choice needs prompt.tools")
    images, audio = list(p.images or []), list(p.audio or [])
    if p.messages is not None:
        if images or audio:
            raise WorkerError("invalid_params", "put images and audio in the messages' content, not in "
                              "prompt.images / prompt.audio")
        parts = [part for m in p.messages if isinstance(m.content, list) for part in m.content]
        images = [part for part in parts if not isinstance(part, (TextPart, AudioPart))]
        audio = [part for part in parts if isinstance(part, AudioPart)]
    if images and kit.addon is None:
        unsupported = " (its vision family is not supported yet)" if kit.config.get("vision_config") else ""
        raise WorkerError("invalid_params", "this model has no vision add-on: send text only" + unsupported)
    if audio and not getattr(kit.addon, "accepts_audio", False):
        raise WorkerError("invalid_params", "this model takes no audio (it has no audio tower, or its audio "
                          "family is not supported yet): send text" + (" or images" if kit.addon else ""))
    if p.tokens is not None:
        bad = [t for t in p.tokens if t >= kit.info.vocab_size]
        if bad:
            raise WorkerError("invalid_params", f"prompt.tokens has ids outside the vocabulary "
                              f"(size {kit.info.vocab_size}): {bad[:5]}")
        if not images and not audio:
            return PromptInput(ids=list(p.tokens))
        # re-tokenized by the processor (which expands the placeholders): specials are kept
        return PromptInput(text=kit.tokenizer.decode(list(p.tokens), skip_special_tokens=False),
                           images=images, audio=audio, add_special_tokens=False)
    if p.text is not None:
        return PromptInput(text=p.text, images=images, audio=audio, add_special_tokens=p.add_special_tokens)
    if not kit.info.chat_template:
        raise WorkerError("invalid_params", "this model has no chat template; send prompt.text or prompt.tokens")
    messages, kwargs = chat_input(kit, p, bool(images or audio))
    try:
        text = kit.tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=p.add_generation_prompt, **kwargs)
    except Exception as exc:  # jinja errors: the template refused these messages
        raise WorkerError("invalid_params", f"the chat template failed on these messages: {exc}")
    special = kit.addon.add_special_tokens_for_chat if images or audio else False
    end = system_end(kit.tokenizer, messages, kwargs, text) if kit.cache.bounded else None
    return PromptInput(text=text, images=images, audio=audio, add_special_tokens=special,
                       boundaries=(end,) if end is not None else ())


def chat_input(kit, p, with_images: bool):
    """The messages and extra template arguments (tools, template_kwargs) the chat template gets."""
    called: set = set()
    messages = [{"role": m.role, "content": _content(m.content if m.content is not None else "", with_images),
                 **tool_fields(i, m, called)} for i, m in enumerate(p.messages)]
    kwargs = dict(p.template_kwargs or {})
    tools = check_tools(p)
    tools = tools if tools_on(p) else []
    fmt = kit.tool_format
    if fmt is not None and fmt.source == "worker":  # the template ignores tools: the worker renders them
        if tools or called:
            messages = worker_rendering(messages, tools)
    elif tools:
        kwargs["tools"] = tools
    return messages, kwargs


def _content(content, with_images: bool):
    """Text-only part lists become one string (many chat templates only accept strings); with images or
    audio, the template gets typed parts, an image as ``{"type": "image"}``, a clip as ``{"type": "audio"}``."""
    if isinstance(content, str):
        return content
    if not with_images:
        return "".join(part.text for part in content if isinstance(part, TextPart))
    return [{"type": "text", "text": part.text} if isinstance(part, TextPart)
            else {"type": "audio"} if isinstance(part, AudioPart) else {"type": "image"} for part in content]

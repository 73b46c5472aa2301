"""A generate request's prompt -> token ids, cache key and (for images) input embeddings."""

from dataclasses import dataclass, field
from typing import Any, List, Optional

from .model import ModelKit
from .protocol import Generate, TextPart, WorkerError


@dataclass
class PromptPlan:
    ids: List[int]  # what the text model sees
    key: List[int]  # what the prompt cache matches on: ids, with image positions made image-specific
    embeddings: Optional[Any] = None  # mx.array [len(ids), hidden] when images are present
    state: Any = None  # a VisionAddOn's per-request state (e.g. M-RoPE positions), or None
    notes: List[str] = field(default_factory=list)


def has_images(req: Generate) -> bool:
    p = req.prompt
    if p.images:
        return True
    return any(not isinstance(part, TextPart) for m in (p.messages or []) if not isinstance(m.content, str)
               for part in m.content)


def build_prompt(kit: ModelKit, req: Generate) -> PromptPlan:
    if has_images(req):
        if kit.addon is None:
            raise WorkerError("invalid_params", "this model has no vision add-on: send text only"
                              + (" (its vision family is not supported yet)" if kit.config.get("vision_config") else ""))
        return kit.addon.build_prompt(kit, req)
    ids = prompt_tokens(kit, req)
    return PromptPlan(ids=ids, key=ids)


def prompt_tokens(kit: ModelKit, req: Generate) -> List[int]:
    p = req.prompt
    given = [x is not None for x in (p.text, p.tokens, p.messages)]
    if sum(given) != 1:
        raise WorkerError("invalid_params", "prompt needs exactly one of `text`, `tokens`, `messages`")
    tok = kit.tokenizer
    if p.tokens is not None:
        bad = [t for t in p.tokens if t >= kit.info.vocab_size]
        if bad:
            raise WorkerError(
                "invalid_params",
                f"prompt.tokens has ids outside the vocabulary (size {kit.info.vocab_size}): {bad[:5]}",
            )
        ids = list(p.tokens)
    elif p.text is not None:
        ids = tok.encode(p.text, add_special_tokens=p.add_special_tokens)
    else:
        if not kit.info.chat_template:
            raise WorkerError(
                "invalid_params", "this model has no chat template; send prompt.text or prompt.tokens"
            )
        messages = [{"role": m.role, "content": _content(m.content)} for m in p.messages]
        try:
            text = tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=p.add_generation_prompt
            )
        except Exception as exc:  # jinja errors: the template refused these messages
            raise WorkerError("invalid_params", f"the chat template failed on these messages: {exc}")
        ids = tok.encode(text, add_special_tokens=False)
    if not ids:
        raise WorkerError("invalid_params", "the prompt is empty")
    return ids


def _content(content):
    """Text-only part lists become one string: many chat templates only accept strings."""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content if isinstance(part, TextPart))

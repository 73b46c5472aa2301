"""Where the next turn is likely to leave this prompt: the end of its system messages (a new conversation with
the same system prompt) and the start of its thinking tail (a template that opens the reasoning in the
generation prompt drops it from the turn it re-renders). mlx-lm's server checkpoints its cache at the same two
places. A model whose cache cannot be cut back (sliding windows, recurrent state) is snapshotted there while
prefilling (generation/snapshot_policy.py); any other cache is trimmed anywhere and needs none."""

from typing import List, Optional

from ..cache.prefix import common_prefix

THINKING_TAIL = 11  # tokens from the end searched for the think-start marker (as mlx-lm's server)


def system_end(tokenizer, messages: list, kwargs: dict, text: str) -> Optional[int]:
    """The character where the leading system messages end in ``text`` (rendered from ``messages``), or None."""
    n = 0
    while n < len(messages) and messages[n]["role"] == "system":
        n += 1
    if n == 0 or n == len(messages):
        return None
    try:
        head = tokenizer.apply_chat_template(messages[:n] + [{"role": "user", "content": ""}], tokenize=False,
                                             add_generation_prompt=False, **kwargs)
    except Exception:  # noqa: BLE001 (a template that wants another shape: no checkpoint)
        return None
    c = common_prefix(head, text)
    return c if 0 < c < len(text) else None


def token_checkpoints(tokenizer, text: str, ids: List[int], special: bool, chars) -> tuple:
    """Token positions for the character positions ``chars`` of ``text`` (those where tokenizing the head alone
    gives the prompt's own ids), and the start of the thinking tail; ascending."""
    out = set()
    for c in chars:
        head = tokenizer.encode(text[:c], add_special_tokens=special)
        if 0 < len(head) < len(ids) and list(ids[:len(head)]) == [int(t) for t in head]:
            out.add(len(head))
    if getattr(tokenizer, "has_thinking", False):
        at = tokenizer.rfind_think_start(ids, start=max(0, len(ids) - THINKING_TAIL))
        if at > 0:
            out.add(at)
    return tuple(sorted(out))

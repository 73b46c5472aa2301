"""Raw mlx-lm, run directly: what the worker's output is compared against."""

import functools

import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler


@functools.lru_cache(maxsize=4)
def load_model(path, dtype=None):
    """mlx-lm's own load; ``dtype="float32"`` casts like the worker does on the CPU."""
    model, tok = load(str(path))
    if dtype is not None:
        model.set_dtype(getattr(mx, dtype))
    return model, tok


def chat_ids(path, messages):
    _, tok = load_model(path)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def text_ids(path, text):
    _, tok = load_model(path)
    return list(tok.encode(text))


def generate(path, ids, max_tokens, temperature=0.0, seed=None, stop_at_eos=True, top_p=1.0,
             dtype=None):
    model, tok = load_model(path, dtype)
    if seed is not None:
        mx.random.seed(seed)
    out = []
    sampler = make_sampler(temperature, top_p)
    for token, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens, sampler=sampler):
        if stop_at_eos and token in tok.eos_token_ids:
            break
        out.append(token)
    return out


def decode(path, ids):
    """Text the way mlx-lm's stream_generate builds it (its streaming detokenizer)."""
    _, tok = load_model(path)
    detok = tok.detokenizer
    for t in ids:
        detok.add_token(t)
    detok.finalize()
    return detok.text

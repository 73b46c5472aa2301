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


def generate_processed(path, ids, max_tokens, **processors):
    """Greedy generate_step with mlx-lm's own logits processors (``make_logits_processors``' arguments):
    (tokens, each token's logprob)."""
    from mlx_lm.sample_utils import make_logits_processors

    model, tok = load_model(path)
    out, lps = [], []
    for t, lp in generate_step(mx.array(ids), model, max_tokens=max_tokens,
                               logits_processors=make_logits_processors(**processors)):
        if t in tok.eos_token_ids:
            break
        out.append(t)
        lps.append(lp[t].item())
    return out, lps


def logprobs_of(path, ids, out, banned=()):
    """Each token of ``out``'s log-probability under mlx-lm's model given ``ids`` and the tokens before it (with
    the ``banned`` ids' logits lowered by 100, as a logit_bias of -100 does)."""
    model, _ = load_model(path)
    logits = model(mx.array([ids + out]))[0, len(ids) - 1:-1].astype(mx.float32)
    if banned:
        logits[:, mx.array(list(banned))] -= 100
    lps = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return [lps[i, t].item() for i, t in enumerate(out)]


def greedy_choices(path, ids, out):
    """At each position of ``out``: the token greedy decoding would pick there, given ``ids`` and ``out``
    before it."""
    model, _ = load_model(path)
    return mx.argmax(model(mx.array([ids + out]))[0, len(ids) - 1:-1], axis=-1).tolist()


def decode(path, ids):
    """Text the way mlx-lm's stream_generate builds it (its streaming detokenizer)."""
    _, tok = load_model(path)
    detok = tok.detokenizer
    for t in ids:
        detok.add_token(t)
    detok.finalize()
    return detok.text

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


def stream_generate(path, prompt, max_tokens, dtype=None):
    """mlx-lm's own greedy ``stream_generate`` of ``prompt`` (text or ids): (tokens without an EOS, text)."""
    from mlx_lm import stream_generate as mlx_lm_stream_generate

    model, tok = load_model(path, dtype)
    responses = list(mlx_lm_stream_generate(model, tok, prompt, max_tokens=max_tokens, sampler=make_sampler(0.0)))
    tokens = [r.token for r in responses]
    if responses[-1].finish_reason == "stop":
        tokens = tokens[:-1]
    return tokens, "".join(r.text for r in responses)


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


class InChild:
    """This module's functions run in a child process with the worker's BLAS (its LD_PRELOAD and thread count,
    read from /proc): the test processes keep MLX's reference BLAS (tests/conftest.py), which prefills a real
    model at ~10 tokens/s, the worker's OpenBLAS at hundreds. Paths go as strings; results come back as JSON
    (lists, not tuples). Without OpenBLAS under the worker the functions run in this process."""

    def __init__(self, worker_pid: int):
        import os
        import subprocess
        import sys
        from pathlib import Path

        from bench.raw import BLAS_ENV_KEYS, worker_blas_env

        blas = worker_blas_env(worker_pid)
        self.proc = None
        if "LD_PRELOAD" not in blas:
            return
        env = {k: v for k, v in os.environ.items() if k not in BLAS_ENV_KEYS}
        root = Path(__file__).resolve().parents[2]
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.reference"], cwd=root,
                                     env={**env, **blas, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __getattr__(self, name):
        if self.proc is None:
            return globals()[name]

        def call(*args, **kw):
            import json

            args = [str(a) if hasattr(a, "is_dir") else a for a in args]
            self.proc.stdin.write(json.dumps({"fn": name, "args": args, "kw": kw}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the reference child died (exit {self.proc.wait()})")
            answer = json.loads(line)
            if "error" in answer:
                raise RuntimeError(f"reference {name} in the child: {answer['error']}")
            return answer["result"]

        return call

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait()


def _serve() -> None:
    """The child's side of ``InChild``: one JSON call a line on stdin, one answer a line on stdout."""
    import json
    import os
    import sys

    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints go to stderr, never into the answers
    for line in sys.stdin:
        call = json.loads(line)
        try:
            answer = {"result": globals()[call["fn"]](*call["args"], **call["kw"])}
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails with it
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    _serve()

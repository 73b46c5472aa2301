"""Checks every vision family's tests run through the real worker, against mlx-vlm's own generate
(tests/process/test_vision.py's, for checkpoints built elsewhere): parity and the prompt cache, the ids of images
processed alone, kv_bits on a follow-up, a speculative text turn, and a batch."""

import contextlib
import os
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.support.client import Worker, generated_tokens  # noqa: E402
from tests.support.continued import continued_ids, streamed  # noqa: E402
from tests.support.prompts import random_ids  # noqa: E402
from tests.process.test_batching import _compare, _stats, run_all  # noqa: E402
from tests.process.test_vision import (MAX, QUESTION, _first_image_token, _last_image_token, _vlm, chat,  # noqa: E402
                               stats, user, vlm_generate)


def distinct(tokens, at_least=4):
    """A random tiny model can collapse into one repeated token: compared outputs must not."""
    assert len(set(tokens)) >= at_least, tokens
    return tokens


def follow_up(worker, tag, image):
    first = chat(worker, f"{tag}-f1", [user([image])])
    answer = "".join(e["text"] for e in first if e["type"] == "token")
    return [user([image]), {"role": "assistant", "content": answer}, {"role": "user", "content": "Tell me more."}]


def check_parity_and_cache(worker, path, images, tag, text_reference):
    """tests/process/test_vision.py's test_family_parity_and_cache for a checkpoint built elsewhere;
    ``text_reference(messages)``: mlx-lm's greedy tokens for a text-only chat."""
    info = worker.load(path)
    assert info["vision"] is True and not info.get("warnings")
    one = distinct(generated_tokens(chat(worker, f"{tag}-1", [user([images["a"]])])))
    assert one == vlm_generate(path, [images["a"]])
    two = distinct(generated_tokens(chat(worker, f"{tag}-2", [user([images["a"], images["b"]])])))
    assert two == vlm_generate(path, [images["a"], images["b"]])
    other = generated_tokens(chat(worker, f"{tag}-c", [user([images["c"]])]))
    assert other != one and other == vlm_generate(path, [images["c"]])
    text_msgs = [{"role": "user", "content": QUESTION}]
    text = distinct(generated_tokens(chat(worker, f"{tag}-t", text_msgs)))
    assert text == vlm_generate(path, [])
    assert text == text_reference(text_msgs)

    follow = follow_up(worker, tag, images["a"])
    warm = chat(worker, f"{tag}-f2", follow)
    assert stats(warm)["cached_tokens"] > _last_image_token(path, [images["a"]])
    assert worker.request({"type": "cache_clear", "id": f"{tag}-cc"})[-1]["type"] == "done"
    cold = chat(worker, f"{tag}-f3", follow)
    assert stats(cold)["cached_tokens"] == 0
    assert distinct(generated_tokens(cold)) == generated_tokens(warm)

    changed = [user([images["c"]])] + follow[1:]
    ch = chat(worker, f"{tag}-f4", changed)
    assert stats(ch)["cached_tokens"] <= _first_image_token(path, [images["c"]])
    worker.request({"type": "cache_clear", "id": f"{tag}-cc2"})
    assert generated_tokens(chat(worker, f"{tag}-f5", changed)) == generated_tokens(ch)


def check_ids_match_processor(path, images):
    """In-process: two images, each processed alone, give the ids (tile markers and all) and the
    embeddings of mlx-vlm's processor and model over the whole prompt."""
    import mlx.core as mx
    import msgspec
    from mlx_vlm.utils import load_image, prepare_inputs

    from worker.loading.model import load
    from worker.prompting.prompt import build_prompt
    from worker.protocol import Generate, LoadOptions

    kit = load(str(path), LoadOptions(), lambda f: None)
    addon = kit.addon
    req = msgspec.convert({"type": "generate", "id": "g", "prompt": {"messages": [user([images["a"], images["b"]])]}},
                          Generate)
    plan = build_prompt(kit, req)
    text = kit.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]}],
        tokenize=False, add_generation_prompt=True)
    ref = prepare_inputs(addon.processor, images=[load_image(images["a"]), load_image(images["b"])], prompts=text,
                         image_token_index=addon.image_token_id, add_special_tokens=False)
    assert plan.ids == ref["input_ids"].reshape(-1).tolist()
    extra = {k: ref[k] for k in ("spatial_shapes", "pixel_attention_mask") if k in ref}
    merged = _vlm(str(path))[0].get_input_embeddings(ref["input_ids"], ref["pixel_values"], **extra)
    assert mx.abs(merged.inputs_embeds[0] - plan.embed(0)).max().item() == 0.0


# 4 bits: on these tiny models the greedy tokens of a 4-bit cache part from an unquantized one's within a few
# tokens (8 bits mostly move only the logprobs); MLX quantizes in groups of 32 at least: the heads are 32 wide
KV = {"kv_bits": 4, "kv_group_size": 32}


@contextlib.contextmanager
def _as_the_worker_quantizes(kv_bits, kv_group_size, fill_shared_kv=True):
    """mlx-vlm's generate_step, with two upstream gaps filled the way PROTOCOL.md states kv_bits:
    - mlx-vlm, like mlx-lm, raises on quantizing a rotating (sliding-window) layer ("RotatingKVCache
      Quantization NYI"); with kv_bits those layers stay exact, and every other layer is quantized by
      mlx-vlm's own uniform rule;
    - Gemma 4's KV-shared layers read their source layer's quantized K/V but get no cache to say so, and
      mlx-vlm (like mlx-lm) then runs the float attention kernel on the packed arrays and fails; here they
      run the quantized kernel with the source's bits and group size.
    Pinned upstream by test_kv_layouts.py::test_upstream_cannot_quantize_rotating_layers and
    test_vision_gemma4.py::test_mlx_vlm_gemma4_gaps_the_reference_fills."""
    import types

    import mlx_vlm.generate  # noqa: F401  (generate_step looks the function up on this module)
    from mlx_lm.models.cache import RotatingKVCache as LmRotating
    from mlx_vlm.models.cache import RotatingKVCache as VlmRotating
    from mlx_vlm.models.gemma4.language import Attention

    module = sys.modules["mlx_vlm.generate"]
    upstream, attention = module.maybe_quantize_kv_cache, Attention.__call__

    def quantize(prompt_cache, quantized_kv_start, kv_group_size, kv_bits, **_):
        if kv_bits is None:
            return
        for i, c in enumerate(prompt_cache):
            if (hasattr(c, "to_quantized") and not isinstance(c, (LmRotating, VlmRotating))
                    and c.offset >= quantized_kv_start):
                prompt_cache[i] = c.to_quantized(group_size=kv_group_size, bits=int(kv_bits))

    def shared(self, x, mask=None, cache=None, shared_kv=None, offset=None):
        if cache is None and shared_kv is not None and isinstance(shared_kv[0], (tuple, list)):
            cache = types.SimpleNamespace(bits=kv_bits, group_size=kv_group_size)
        return attention(self, x, mask, cache, shared_kv=shared_kv, offset=offset)

    module.maybe_quantize_kv_cache = quantize
    if fill_shared_kv:
        Attention.__call__ = shared
    try:
        yield
    finally:
        module.maybe_quantize_kv_cache, Attention.__call__ = upstream, attention


def ref_user(n_images, question=QUESTION):
    """A user turn as mlx-vlm's chat template takes it: image placeholders, then the text."""
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": question}]}


class _Stop(Exception):
    pass


_TOKEN_TYPES = ("mm_token_type_ids", "token_type_ids")  # one per prompt token (Gemma 4's bidirectional images)


class _Recorder:
    """A tokenizer stand-in that records the text the processor tokenizes (its images expanded)."""

    def __init__(self, tok):
        self.tok, self.text = tok, None

    def __call__(self, text, *args, **kwargs):
        self.text = text[0] if isinstance(text, (list, tuple)) and len(text) == 1 else text
        return self.tok(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


class Reference:
    """mlx-vlm run directly on the checkpoint, greedy: its processor's ids (no second BOS, as the worker's
    prompts), its model's input embeddings, its own ``generate_step`` with ``prefill_step_size`` chunks. With
    ``kv_bits`` the cache is quantized as mlx-lm does it (QuantizedKVCache after each prefill chunk and each
    step, from ``quantized_kv_start``): a reference that really quantizes, fed the same ids and embeddings.
    ``load(path)`` gives mlx-vlm's (model, processor) (Gemma 3n's tests pass their patched mlx-vlm).
    ``fill_shared_kv``, ``per_layer_from_ids``: the fixes of two Gemma 4 gaps upstream (see below)."""

    fill_shared_kv = per_layer_from_ids = True

    def __init__(self, path, prefill_step_size, kv_bits=None, kv_group_size=32, quantized_kv_start=0, load=None):
        self.model, self.proc = (load or _vlm)(str(path))
        self.step, self.quant = prefill_step_size, dict(kv_bits=kv_bits, kv_group_size=kv_group_size,
                                                        quantized_kv_start=quantized_kv_start)
        cfg = self.model.config
        self.image_tokens = {getattr(cfg, "image_token_index", None), getattr(cfg, "image_token_id", None)} - {None}
        eos = cfg.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])

    def inputs(self, messages, images, ids=None):
        """mlx-vlm's inputs; ``self.text``: the text its tokenizer was given (each image expanded). ``ids``: other
        ids for the same prompt (a follow-up holding the model's own ids, tests/support/continued.py), the
        per-token arrays kept where they agree and text (0) past that."""
        import mlx.core as mx
        from mlx_vlm.utils import load_image, prepare_inputs

        text = self.proc.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        recorder = _Recorder(self.proc.tokenizer)
        self.proc.tokenizer = recorder
        try:
            inp = prepare_inputs(self.proc, images=[load_image(p) for p in images] or None, prompts=text,
                                 image_token_index=getattr(self.model.config, "image_token_index", None),
                                 add_special_tokens=False)  # as mlx-vlm's stream_generate
        finally:
            self.proc.tokenizer = recorder.tok
        self.text = recorder.text
        if ids is not None:
            own = inp["input_ids"].reshape(-1).tolist()
            same = next((i for i, (a, b) in enumerate(zip(own, ids)) if a != b), min(len(own), len(ids)))
            assert not self.image_tokens & set(ids[same:]), "the ids part from the processor's inside an image"
            inp = dict(inp, input_ids=mx.array([ids]), attention_mask=mx.ones((1, len(ids)), dtype=mx.int32))
            for k in _TOKEN_TYPES:
                if k in inp:
                    inp[k] = mx.concatenate([inp[k][:, :same], mx.zeros((1, len(ids) - same), dtype=inp[k].dtype)], 1)
        return inp

    def ids(self, messages, images):
        return self.inputs(messages, images)["input_ids"].reshape(-1).tolist()

    def generate(self, messages, images, max_tokens, cache=None, start=0, stop_at=None, ids=None):
        """(tokens up to EOS, each one's logprob, the cache). With ``cache`` (holding this prompt's first
        ``start`` tokens, e.g. a previous turn's) only the rest is fed, as mlx-vlm's own prompt reuse does.
        ``stop_at``: return the cache as the prefill leaves it after that many tokens (a chunk ends there).
        ``ids``: the prompt's ids where they are not the processor's (see ``inputs``)."""
        from mlx_vlm.generate.common import _chunked_prefill_enabled
        from mlx_vlm.generate.dispatch import _prime_cached_prefix_rope_state
        from mlx_vlm.models.cache import make_prompt_cache

        inp = self.inputs(messages, images, ids)
        ids, pixels, mask = inp["input_ids"], inp.get("pixel_values"), inp.get("attention_mask")
        extra = {k: v for k, v in inp.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
        lm = self.model.language_model
        if cache is None:
            cache = make_prompt_cache(lm)
            for stale in ("_position_ids", "_rope_deltas"):  # Qwen's M-RoPE state of the previous prompt
                if hasattr(lm, stale):
                    setattr(lm, stale, None)
        else:
            assert _prime_cached_prefix_rope_state(self.model, ids, mask, extra)  # Qwen: the whole prompt's positions
            ids, pixels = ids[:, start:], None
            extra = {k: v for k, v in extra.items() if k not in _TOKEN_TYPES}  # the rest is text
            return self._run(ids, pixels, mask, extra, max_tokens, cache, per_layer_from_ids=True)
        if pixels is not None and not _chunked_prefill_enabled(self.model, prefill_kwargs=extra):
            # mlx-vlm runs a Gemma 4 image prompt in one pass; the worker, as mlx-lm's generate_step, prefills all
            # but the last token, quantizes (PROTOCOL.md), then runs the last one: so does the reference
            n = ids.shape[1] - 1
            assert n <= self.step, "a prompt of one prefill chunk"
            cut = {k: v[:, :n] if k in _TOKEN_TYPES else v for k, v in extra.items()}
            self._run(ids[:, :n], pixels, mask[:, :n] if mask is not None else None, cut, 0, cache)
            return ([], [], cache) if stop_at == n else self.generate(messages, images, max_tokens, cache, n)
        if stop_at is not None:
            def stop(n, _):
                raise _Stop()
            extra.update(prompt_cache_checkpoint=stop, prompt_cache_checkpoint_lengths=[stop_at])
        return self._run(ids, pixels, mask, extra, max_tokens, cache)

    def _run(self, ids, pixels, mask, extra, max_tokens, cache, per_layer_from_ids=False):
        from mlx_vlm.generate import generate_step

        tokens, logprobs = [], []
        if per_layer_from_ids and self.per_layer_from_ids:
            # mlx-vlm 0.7.10's Gemma 4 slices a prompt's per-layer inputs at the cache offset, which is wrong for
            # a suffix fed on a cache (pinned: test_vision_gemma4.py::test_mlx_vlm_gemma4_gaps_the_reference_fills);
            # for a text suffix the model looks them up by id, chunk by chunk, as it does while decoding
            embed = self.model.get_input_embeddings

            def without_per_layer(*args, **kwargs):
                out = embed(*args, **kwargs)
                if getattr(out, "per_layer_inputs", None) is not None:
                    out.per_layer_inputs = None
                return out

            self.model.get_input_embeddings = without_per_layer
        try:
            with _as_the_worker_quantizes(self.quant["kv_bits"], self.quant["kv_group_size"], self.fill_shared_kv):
                for t, lp in generate_step(ids, self.model, pixels, mask, max_tokens=max_tokens, temperature=0.0,
                                           prompt_cache=cache, prefill_step_size=self.step, **self.quant, **extra):
                    if t in self.eos:
                        break
                    tokens.append(int(t))
                    logprobs.append(lp[int(t)].item())
        except _Stop:
            pass
        finally:
            self.model.__dict__.pop("get_input_embeddings", None)
        return tokens, logprobs, cache

    def cache_at(self, messages, images, answer, n):
        """The cache holding the first ``n`` tokens of this prompt followed by ``answer`` (its greedy tokens), as
        generate_step leaves it: cut at the end of a prefill chunk, or after decoding part of the answer."""
        ids = self.ids(messages, images)
        if n < len(ids):
            assert n == len(ids) - 1, "the worker resumes inside a prompt only where its prefill ended"
            return self.generate(messages, images, 0, stop_at=n)[2]
        tokens, _, cache = self.generate(messages, images, n - len(ids))
        assert tokens == answer[:n - len(ids)]
        return cache


def request(worker, rid, messages, max_tokens=MAX):
    """A chat request with each token's logprob: (events, tokens, logprobs)."""
    evs = worker.request({"type": "generate", "id": rid, "prompt": {"messages": messages},
                          "params": {"max_tokens": max_tokens, "top_logprobs": 1}})
    stats(evs)  # it ended in `done`
    toks = [e for e in evs if e["type"] == "token"]
    return evs, generated_tokens(evs), [lp["logprob"] for e in toks for lp in e["logprobs"]]


def closer_to_quantized(got, quant, plain, what):
    """``got``'s logprobs are the quantized reference's, not the unquantized one's: where the two references'
    greedy tokens do not part (Qwen3.5's few attention layers), every logprob still moves with the quantization.
    ``quant``, ``plain``: (tokens, logprobs) of the quantized and the unquantized reference."""
    if quant[0] != plain[0]:
        return  # the greedy tokens part: the token comparison already tells them apart
    # the worker's process rounds a little differently from the in-process reference, and a value that
    # lands on a rounding edge quantizes one step off: a token or two then differ by a few 1e-3; an
    # unquantized cache moves most of them by 1e-2 or more (the medians compare the bulk)
    off_q = statistics.median(abs(a - b) for a, b in zip(got, quant[1]))
    off_plain = statistics.median(abs(a - b) for a, b in zip(got, plain[1]))
    assert off_plain > 10 * off_q and off_plain > 1e-3, (what, off_q, off_plain, got, quant[1], plain[1])


def quantized_layers_shrink(quantized_cache, plain_cache, kv_bits=KV["kv_bits"], group=KV["kv_group_size"]):
    """mlx's quantized format: ``kv_bits`` per value plus a float32 scale and bias per group, against 4 bytes
    per float32 value; layers left exact (rotating windows, recurrent state) keep their size."""
    shrunk = [(q.nbytes, p.nbytes) for q, p in zip(quantized_cache, plain_cache) if type(q) is not type(p)]
    assert shrunk, "no layer was quantized"
    assert all(type(q).__name__ == "QuantizedKVCache" for q, p in zip(quantized_cache, plain_cache)
               if type(q) is not type(p))
    for q, p in shrunk:
        assert q * 4 * group == p * (kv_bits * group // 8 + 8), (q, p)
    return sum(c.nbytes for c in quantized_cache)


def check_kv_bits_follow_up(worker, path, images, tag, max_tokens=MAX, load=None, kv_bits=KV["kv_bits"]):
    """kv_bits against mlx-vlm with a cache that really quantizes (``Reference``): the first turn, a warm
    follow-up that reuses the quantized cache (what is promised: the tokens of mlx-vlm continuing a
    quantized cache that holds the reused prefix; they may part from a cold run at a near-tie), and the
    same follow-up cold, whose logprobs are the quantized reference's, not the unquantized one's.
    ``status`` then reports the entry's bytes: exactly the quantized reference cache's (the budget
    leaves no room for window snapshots), which is the unquantized one's with its full-attention layers
    shrunk to (kv_bits + 64/group) / 32 of their size. The follow-up reuses exactly the common prefix of
    its ids and the first turn's (prompt and answer) when every layer can be cut back; a recurrent state
    (LFM2's convolutions, Qwen3.5's gated-delta layers) resumes from a snapshot at or before it."""
    from mlx_vlm.models.cache import make_prompt_cache

    kv, w = dict(KV, kv_bits=kv_bits), worker
    step = w.load(path, **kv)["prefill_step_size"]
    quant = Reference(path, step, load=load, **kv)
    turn, ref_turn = [user([images["a"]])], [ref_user(1)]
    first, t1, _ = request(w, f"{tag}-q1", turn, max_tokens)
    r1 = quant.generate(ref_turn, [images["a"]], max_tokens)
    assert t1 == distinct(r1[0]), (t1, r1)

    answer = first[-1]["text"]
    follow = turn + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Tell me more."}]
    ref_follow = ref_turn + follow[1:]
    warm, t2, _ = request(w, f"{tag}-q2", follow, max_tokens)
    ids1 = quant.ids(ref_turn, [images["a"]])
    text1 = quant.text
    quant.ids(ref_follow, [images["a"]])
    # the follow-up holds the model's own ids for the answer it continues (PROTOCOL.md, The prompt cache)
    said = t1 + ([first[-1]["stop_token"]] if first[-1].get("stop_token") is not None else [])
    ids2 = continued_ids(quant.proc.tokenizer, text1, ids1, said, quant.text, streamed(path))
    assert stats(warm)["prompt_tokens"] == len(ids2), (stats(warm), len(ids2), len(quant.ids(ref_follow, [images["a"]])),
                                                       quant.text.startswith(text1), said, answer)
    common = next((i for i, (a, b) in enumerate(zip(ids1 + t1, ids2)) if a != b), min(len(ids1 + t1), len(ids2)))
    reused = stats(warm)["cached_tokens"]
    assert max(i for i, t in enumerate(ids1) if t in quant.image_tokens) < reused <= min(common, len(ids2) - 1)
    if all(c.is_trimmable() for c in make_prompt_cache(quant.model.language_model)):
        assert reused == min(common, len(ids2) - 1), (reused, common)
    cache = quant.cache_at(ref_turn, [images["a"]], t1, reused)
    assert t2 == distinct(quant.generate(ref_follow, [images["a"]], max_tokens, cache, reused, ids=ids2)[0])

    q = quant.generate(ref_follow, [images["a"]], max_tokens)
    plain = Reference(path, step, load=load).generate(ref_follow, [images["a"]], max_tokens)
    expected = quantized_layers_shrink(q[2], plain[2], kv_bits)
    w.load(path, cache_max_bytes=expected, **kv)  # no room for window snapshots: the entry alone
    _, t3, lp3 = request(w, f"{tag}-q3", follow, max_tokens)
    assert t3 == distinct(q[0])
    closer_to_quantized(lp3, q[:2], plain[:2], tag)
    assert w.request({"type": "status", "id": f"{tag}-qs"})[-1]["cache"]["bytes"] == expected


def speculative_text_turn(path, images, tag):
    """The model as its own draft: a text turn (and an image turn, which never speculates); returns
    the text turn's stats["speculative"] after checking both give the tokens they give without it."""
    w = Worker()
    try:
        w.request({"type": "load", "id": "l", "model_path": str(path), "options": {"draft_model_path": str(path)}})
        msgs = [{"role": "user", "content": QUESTION}]
        spec = chat(w, f"{tag}-s1", msgs)
        assert generated_tokens(spec) == vlm_generate(path, [])
        image = chat(w, f"{tag}-s2", [user([images["a"]])])
        assert stats(image)["speculative"] == "off: images or audio"
        assert generated_tokens(image) == vlm_generate(path, [images["a"]])
        return stats(spec)["speculative"]
    finally:
        w.close()


def check_batch(path, images):
    """Image requests (1 and 2 images) decoded beside text requests give the tokens they give alone."""
    msg = [{"role": "user", "content": [{"type": "image", "path": images["a"]}, {"type": "text", "text": QUESTION}]}]
    two = [{"role": "user", "content": [{"type": "image", "path": images["b"]}, {"type": "image", "path": images["c"]},
                                        {"type": "text", "text": "Compare them."}]}]
    reqs = [{"id": "image", "prompt": {"messages": msg}, "params": {"max_tokens": 12}},
            {"id": "two", "prompt": {"messages": two}, "params": {"max_tokens": 10}},
            {"id": "text", "prompt": {"messages": [{"role": "user", "content": "Tell me a story."}]},
             "params": {"max_tokens": 16}},
            {"id": "tokens", "prompt": {"tokens": random_ids(30, 6)}, "params": {"max_tokens": 20}}]
    alone, _ = run_all(path, reqs, 1)
    together, _ = run_all(path, reqs, 8)
    _compare(alone, together, cancelled=None)
    assert distinct(generated_tokens(together["two"])) == vlm_generate(path, [images["b"], images["c"]],
                                                                        "Compare them.", 10)
    assert min(_stats(together[r["id"]])["concurrent"] for r in reqs) >= 2

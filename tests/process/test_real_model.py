"""The real default model (SmolLM2-135M-Instruct, built offline from PyPI) through the worker."""

import json

import pytest

from tests.support import reference as ref
from tests.support.client import Worker, generated_tokens

pytestmark = pytest.mark.real_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    from model_prep.smollm2 import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="module")
def real_worker(smollm2):
    w = Worker()
    yield w
    w.close()


@pytest.fixture(scope="module")
def mlx_lm_ref(real_worker):
    """tests/support/reference.py's mlx-lm runs, with the worker's BLAS (in-process they prefill ~10 tok/s)."""
    child = ref.InChild(real_worker.proc.pid)
    yield child
    child.close()


@pytest.mark.parametrize("dtype,ref_dtype", [("auto", "float32"), ("stored", None)])
def test_paris_matches_mlx_lm(real_worker, mlx_lm_ref, smollm2, dtype, ref_dtype):
    info = real_worker.load(smollm2, dtype=dtype)
    assert info["compute_dtype"] == (ref_dtype or "bfloat16") and info["stored_dtype"] == "bfloat16"
    events = real_worker.request({"type": "generate", "id": f"paris-{dtype}",
                                  "prompt": {"messages": QUESTION}, "params": {"max_tokens": 20}})
    done = events[-1]
    assert done["stop_reason"] == "eos"
    assert "Paris" in done["text"]
    ids = mlx_lm_ref.chat_ids(smollm2, QUESTION)
    expected = mlx_lm_ref.generate(smollm2, ids, 20, dtype=ref_dtype)
    assert generated_tokens(events) == expected
    assert done["text"] == mlx_lm_ref.decode(smollm2, expected)


def test_three_turn_chat_uses_the_cache(real_worker, mlx_lm_ref, smollm2):
    real_worker.load(smollm2)
    chat = list(QUESTION)
    previous = None
    for turn, follow in enumerate(["And of Italy?", "And of Spain?", None]):
        events = real_worker.request({"type": "generate", "id": f"chat{turn}",
                                      "prompt": {"messages": chat}, "params": {"max_tokens": 24}})
        stats = next(e for e in events if e["type"] == "stats")
        ids = mlx_lm_ref.chat_ids(smollm2, chat)
        assert stats["prompt_tokens"] == len(ids)
        assert generated_tokens(events) == mlx_lm_ref.generate(smollm2, ids, 24, dtype="float32")
        if previous is not None:
            assert stats["cached_tokens"] >= previous, stats
        previous = stats["prompt_tokens"] + len(generated_tokens(events))
        if follow:
            chat += [{"role": "assistant", "content": events[-1]["text"]},
                     {"role": "user", "content": follow}]


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def test_a_tool_call_turn_is_reused_whole_and_exactly(real_worker, mlx_lm_ref, smollm2):
    """Issue #29 item 1: SmolLM2 emits its call's end as `"}` + `}`, which the tokenizer writes `"` + `}}`. The
    follow-up (the call re-rendered, then the tool's result) reuses the whole earlier turn, the model's own ids;
    and its greedy output equals a cold run (raw mlx-lm) of exactly those ids. SmolLM2's template ignores tools:
    the texts are rendered here as the worker renders them (worker_rendering: an input, not a reference)."""
    from mlx_lm.utils import load

    from worker.cache.prefix import common_prefix
    from worker.prompting.tools import worker_rendering

    real_worker.load(smollm2)
    _, tok = load(str(smollm2))

    def render(messages, tools):
        return tok.apply_chat_template(worker_rendering(messages, tools), add_generation_prompt=True, tokenize=False)

    msgs = [{"role": "system", "content": "You are a helpful assistant with tools."},
            {"role": "user", "content": "What's the weather in Paris today? Use the tool."}]
    first = real_worker.request({"type": "generate", "id": "call", "params": {"max_tokens": 60},
                                 "prompt": {"messages": msgs, "tools": WEATHER, "tool_choice": "required"}})
    done, st1 = first[-1], next(e for e in first if e["type"] == "stats")
    calls = done["tool_calls"]
    assert done["stop_reason"] == "tool_calls" and calls and calls[0]["function"]["name"] == "get_weather", done
    call_ids = [t for e in first if e["type"] in ("token", "tool_call") for t in e["tokens"]] + [done["stop_token"]]
    assert len(call_ids) == st1["generated_tokens"]
    turn1 = tok.encode(render(msgs, WEATHER), add_special_tokens=False)
    assert len(turn1) == st1["prompt_tokens"]
    msgs2 = msgs + [{"role": "assistant", "content": "", "tool_calls": [
                        {**calls[0], "function": {**calls[0]["function"],
                                                  "arguments": json.loads(calls[0]["function"]["arguments"])}}]},
                    {"role": "tool", "tool_call_id": calls[0]["id"], "content": '{"temp_c": 18, "sky": "clear"}'}]
    text2 = render(msgs2, WEATHER)
    said = list(turn1) + call_ids
    assert common_prefix(tok.encode(text2, add_special_tokens=False), said) < len(said), \
        "the call re-tokenizes as it was generated: this test shows nothing"
    second = real_worker.request({"type": "generate", "id": "result", "params": {"max_tokens": 16},
                                  "prompt": {"messages": msgs2[:2] + [dict(msgs2[2], tool_calls=calls)] + msgs2[3:],
                                             "tools": WEATHER}})
    st2 = next(e for e in second if e["type"] == "stats")
    assert st2["cached_tokens"] == len(said), st2  # the previous prompt and the whole call
    # the ids it used: the turn's own, then the rest of the text tokenized
    rest = text2[len(tok.decode(said, skip_special_tokens=False, clean_up_tokenization_spaces=False)):]
    used = said + tok.encode(rest, add_special_tokens=False)
    assert st2["prompt_tokens"] == len(used)
    expected = mlx_lm_ref.generate(smollm2, used, 16, dtype="float32")
    assert len(set(expected)) >= 3, expected
    assert generated_tokens(second) == expected

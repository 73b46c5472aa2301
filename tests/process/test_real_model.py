"""The real default model (SmolLM2-135M-Instruct, built offline from PyPI) through the worker."""

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


@pytest.mark.parametrize("dtype,ref_dtype", [("auto", "float32"), ("stored", None)])
def test_paris_matches_mlx_lm(real_worker, smollm2, dtype, ref_dtype):
    info = real_worker.load(smollm2, dtype=dtype)
    assert info["compute_dtype"] == (ref_dtype or "bfloat16") and info["stored_dtype"] == "bfloat16"
    events = real_worker.request({"type": "generate", "id": f"paris-{dtype}",
                                  "prompt": {"messages": QUESTION}, "params": {"max_tokens": 20}})
    done = events[-1]
    assert done["stop_reason"] == "eos"
    assert "Paris" in done["text"]
    ids = ref.chat_ids(smollm2, QUESTION)
    expected = ref.generate(smollm2, ids, 20, dtype=ref_dtype)
    assert generated_tokens(events) == expected
    assert done["text"] == ref.decode(smollm2, expected)


def test_three_turn_chat_uses_the_cache(real_worker, smollm2):
    real_worker.load(smollm2)
    chat = list(QUESTION)
    previous = None
    for turn, follow in enumerate(["And of Italy?", "And of Spain?", None]):
        events = real_worker.request({"type": "generate", "id": f"chat{turn}",
                                      "prompt": {"messages": chat}, "params": {"max_tokens": 24}})
        stats = next(e for e in events if e["type"] == "stats")
        ids = ref.chat_ids(smollm2, chat)
        assert stats["prompt_tokens"] == len(ids)
        assert generated_tokens(events) == ref.generate(smollm2, ids, 24, dtype="float32")
        if previous is not None:
            assert stats["cached_tokens"] >= previous, stats
        previous = stats["prompt_tokens"] + len(generated_tokens(events))
        if follow:
            chat += [{"role": "assistant", "content": events[-1]["text"]},
                     {"role": "user", "content": follow}]

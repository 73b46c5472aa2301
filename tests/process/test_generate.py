"""Acceptance: the worker's greedy tokens equal raw mlx-lm's, for text, messages and tokens prompts."""

import pytest

from tests.support import reference as ref
from tests.support.client import Worker, generated_text, generated_tokens
from tests.support.prompts import assert_varied, random_ids


@pytest.fixture(scope="module")
def shared():
    """One worker process for the module: each test loads the model and options it needs (a load of a
    fixture takes a fraction of a second, a new process several)."""
    w = Worker()
    yield w
    w.close()


@pytest.fixture
def worker(shared):
    return shared


@pytest.fixture
def llama_worker(shared, llama_dir):
    shared.load(llama_dir)
    return shared

FAMILIES = ["llama", "qwen2", "gemma3_text"]
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Tell me about the quick brown fox."}]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_mlx_lm(worker, family_dirs, family):
    path = family_dirs[family]
    info = worker.load(path)
    assert info["model_type"] == family
    cases = {
        "text": ({"text": "the lazy dog jumps"}, ref.text_ids(path, "the lazy dog jumps")),
        "messages": ({"messages": MESSAGES}, ref.chat_ids(path, MESSAGES)),
        "tokens": ({"tokens": random_ids(5, 8)}, random_ids(5, 8)),
    }
    for name, (prompt, ids) in cases.items():
        events = worker.request({"type": "generate", "id": f"{family}-{name}", "prompt": prompt,
                                 "params": {"max_tokens": 24, "temperature": 0}})
        done = events[-1]
        assert done["type"] == "done", done
        expected = ref.generate(path, ids, 24)
        assert_varied(expected, 4, what=f"mlx-lm's output for the {name} prompt")
        assert generated_tokens(events) == expected, name
        assert done["text"] == generated_text(events) == ref.decode(path, expected)
        stats = [e for e in events if e["type"] == "stats"]
        assert len(stats) == 1 and stats[0]["prompt_tokens"] == len(ids)
        assert done["stop_reason"] == ("max_tokens" if len(expected) == 24 else "eos")


def test_event_order_and_seq(llama_worker):
    events = llama_worker.request({"type": "generate", "id": "order", "prompt": {"text": "hello"},
                                   "params": {"max_tokens": 8}})
    kinds = [e["type"] for e in events]
    assert kinds[0] == "progress" and kinds[-2:] == ["stats", "done"]
    assert set(kinds[1:-2]) <= {"progress", "token"}
    prompt_progress = [e for e in events if e["type"] == "progress"]
    assert prompt_progress[-1]["processed"] == prompt_progress[-1]["total"]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_sampling_with_seed_is_reproducible(llama_worker, llama_dir):
    params = {"max_tokens": 16, "temperature": 1.0, "seed": 1234, "top_p": 0.95}
    runs = [generated_tokens(llama_worker.request(
        {"type": "generate", "id": f"seeded-{i}", "prompt": {"text": "once upon"}, "params": params}))
        for i in range(2)]
    assert runs[0] == runs[1]
    ids = ref.text_ids(llama_dir, "once upon")
    expected = ref.generate(llama_dir, ids, 16, temperature=1.0, seed=1234, top_p=0.95)
    assert runs[0] == expected
    assert expected != ref.generate(llama_dir, ids, 16), "sampling should differ from greedy here"


def test_stop_string_is_not_leaked(llama_worker, llama_dir):
    ids = ref.text_ids(llama_dir, "the quick")
    full = ref.decode(llama_dir, ref.generate(llama_dir, ids, 30))
    assert len(full) > 8
    stop = full[5:8]
    events = llama_worker.request({"type": "generate", "id": "stop", "prompt": {"text": "the quick"},
                                   "params": {"max_tokens": 30, "stop": [stop, "\u2603never"]}})
    done = events[-1]
    assert done["stop_reason"] == "stop_string" and done["stop_string"] == stop
    assert done["text"] == full[: full.index(stop)]
    assert generated_text(events) == done["text"]


def test_max_tokens_zero_and_context_full(worker, llama_dir):
    worker.load(llama_dir, max_kv_size=None)
    events = worker.request({"type": "generate", "id": "zero", "prompt": {"text": "abc"},
                             "params": {"max_tokens": 0}})
    assert events[-1]["stop_reason"] == "max_tokens" and events[-1]["text"] == ""
    model = worker.request({"type": "status", "id": "st"})[-1]["model"]
    ctx = model["context_length"]
    no_eos = {str(t): -100.0 for t in model["eos_token_ids"]}  # so that only the context can end it
    events = worker.request({"type": "generate", "id": "full", "prompt": {"tokens": random_ids(ctx - 3, 9)},
                             "params": {"max_tokens": 50, "logit_bias": no_eos}}, timeout=300)
    assert events[-1]["stop_reason"] == "context_full", events[-1]
    assert len(generated_tokens(events)) == 3  # the context holds 3 more tokens


def test_tokenize_matches_tokenizer(llama_worker, llama_dir):
    done = llama_worker.request({"type": "tokenize", "id": "tok", "text": "hello world"})[-1]
    assert done["tokens"] == ref.text_ids(llama_dir, "hello world")


def test_prefill_step_defaults_per_device(worker, llama_dir):
    import mlx.core as mx

    info = worker.load(llama_dir)
    cpu = mx.default_device().type == mx.DeviceType.cpu
    assert info["prefill_step_size"] == (256 if cpu else 2048)
    assert worker.load(llama_dir, prefill_step_size=100)["prefill_step_size"] == 100


def test_warmup_option(worker, llama_dir):
    info = worker.load(llama_dir, warmup=True)
    assert info["warmup_s"] > 0
    events = worker.request({"type": "generate", "id": "after-warmup", "prompt": {"text": "the lazy dog"},
                             "params": {"max_tokens": 8}})
    want = ref.generate(llama_dir, ref.text_ids(llama_dir, "the lazy dog"), 8)
    assert_varied(want, 4, what="mlx-lm's output")
    assert generated_tokens(events) == want
    assert "warmup_s" not in worker.load(llama_dir, warmup=False)

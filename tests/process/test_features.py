"""Generation features (issue 5) through the real worker: logprobs, penalties, stop tokens,
structured output, speculative decoding, KV quantization, and a bad value for every parameter."""

import json

import jsonschema
import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors

from tests.support import reference as ref
from tests.support.client import Worker, generated_tokens
from tests.support.prompts import assert_varied, random_ids


def gen(w, rid, prompt, **params):
    events = w.request({"type": "generate", "id": rid, "prompt": prompt, "params": params})
    assert events[-1]["type"] == "done", events[-1]
    return events


def test_logprobs_equal_log_softmax_of_mlx_lm(llama_worker, llama_dir):
    prompt = ref.text_ids(llama_dir, "logprob check")
    events = gen(llama_worker, "lp", {"tokens": prompt}, max_tokens=6, top_logprobs=5)
    model, _ = ref.load_model(llama_dir)
    reports = [lp for e in events if e["type"] == "token" for lp in e["logprobs"]]
    out = generated_tokens(events)
    assert [r["id"] for r in reports] == out and len(out) == 6
    for i, r in enumerate(reports):
        logits = model(mx.array(prompt + out[:i])[None])[0, -1].astype(mx.float32)
        expected = logits - mx.logsumexp(logits)
        assert abs(r["logprob"] - expected[r["id"]].item()) < 1e-4
        assert len(r["top"]) == 5 and r["top"][0]["id"] == r["id"]  # greedy picks the best
        assert [t["logprob"] for t in r["top"]] == sorted([t["logprob"] for t in r["top"]], reverse=True)
        for t in r["top"]:
            assert abs(t["logprob"] - expected[t["id"]].item()) < 1e-4


def test_processors_change_the_distribution():
    from worker.protocol import GenerateParams
    from worker.generation.sampling import processors_for

    class Kit:
        class info:
            vocab_size = 8

    def fresh():  # mlx-lm's repetition penalty writes into its input
        return mx.zeros((1, 8)) + mx.arange(8, dtype=mx.float32)

    toks = mx.array([1, 1, 2], dtype=mx.uint32)
    (bias,) = processors_for(GenerateParams(logit_bias={3: 5.0}), [])
    assert bias(toks, fresh())[0, 3].item() == 8.0 and bias(toks, fresh())[0, 4].item() == 4.0
    (rep,) = processors_for(GenerateParams(repetition_penalty=2.0), [])
    out = rep(toks, fresh())[0]
    assert out[1].item() == 0.5 and out[2].item() == 1.0 and out[3].item() == 3.0
    (freq,) = processors_for(GenerateParams(frequency_penalty=1.0), [])
    out = freq(toks, fresh())[0]
    assert out[1].item() == -1.0 and out[2].item() == 1.0 and out[5].item() == 5.0
    (pres,) = processors_for(GenerateParams(presence_penalty=1.0), [])
    out = pres(toks, fresh())[0]
    assert out[1].item() == 0.0 and out[2].item() == 1.0
    # tokens served from the prompt cache count too
    (rep,) = processors_for(GenerateParams(repetition_penalty=2.0), [6])
    assert rep(toks, fresh())[0, 6].item() == 3.0


def test_penalties_end_to_end_with_cache(llama_worker, llama_dir):
    prompt = ref.text_ids(llama_dir, "penalties count the cached prompt too")
    params = dict(max_tokens=16, repetition_penalty=1.3, repetition_context_size=64, logit_bias={"7": 2.5})
    model, _ = ref.load_model(llama_dir)
    procs = make_logits_processors(logit_bias={7: 2.5}, repetition_penalty=1.3, repetition_context_size=64)
    expected = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=16, logits_processors=procs)]
    llama_worker.request({"type": "cache_clear", "id": "pc"})
    cold = generated_tokens(gen(llama_worker, "pen1", {"tokens": prompt}, **params))
    warm_events = gen(llama_worker, "pen2", {"tokens": prompt}, **params)
    assert next(e for e in warm_events if e["type"] == "stats")["cached_tokens"] == len(prompt) - 1
    assert cold == expected == generated_tokens(warm_events)
    assert cold != ref.generate(llama_dir, prompt, 16)


def test_stop_token_ids(llama_worker, llama_dir):
    prompt = ref.text_ids(llama_dir, "stop token")
    full = ref.generate(llama_dir, prompt, 20)
    stop = full[5]
    first = full.index(stop)
    events = gen(llama_worker, "st", {"tokens": prompt}, max_tokens=20, stop_token_ids=[stop])
    done = events[-1]
    assert done["stop_reason"] == "stop_token" and done["stop_token"] == stop
    assert generated_tokens(events) == full[:first]


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"ok": {"type": "boolean"},
                                                   "n": {"enum": [1, 2, 3]}},
                  "required": ["ok", "n"], "additionalProperties": False},
    },
    "required": ["name", "kind", "age", "tags", "owner"],
    "additionalProperties": False,
}


def test_json_schema_outputs_validate(llama_worker):
    for seed in range(20):
        events = gen(llama_worker, f"js{seed}", {"text": "describe a pet as JSON"}, max_tokens=200,
                     temperature=1.0, seed=seed, json_schema=SCHEMA)
        done = events[-1]
        assert done["stop_reason"] == "eos", done  # stops when the JSON is complete
        jsonschema.validate(json.loads(done["text"]), SCHEMA)


def test_speculative_is_identical(worker, llama_dir, fixtures_root):
    from tests.support.fixtures import fixture_dir

    draft = fixture_dir("llama_draft", fixtures_root)
    info = worker.request({"type": "load", "id": "l", "model_path": str(llama_dir),
                           "options": {"draft_model_path": str(draft)}})[-1]
    assert info["draft"]["parameters"] < info["model"]["parameters"]
    prompt = {"text": "speculate on this"}
    plain = gen(worker, "plain", prompt, max_tokens=24, speculative=False)
    spec = gen(worker, "spec", prompt, max_tokens=24, num_draft_tokens=4)
    assert generated_tokens(spec) == generated_tokens(plain)
    stats = next(e for e in spec if e["type"] == "stats")
    assert stats["speculative"] == "on" and stats["draft_tokens_accepted"] >= 0
    assert all(len(e["from_draft"]) == len(e["tokens"]) for e in spec if e["type"] == "token")
    assert next(e for e in plain if e["type"] == "stats")["speculative"] == "off: request"
    # the model as its own draft: most tokens come from the draft
    done = worker.request({"type": "load_draft", "id": "ld", "model_path": str(llama_dir)})[-1]
    assert done["draft"]["model_type"] == "llama"
    worker.request({"type": "cache_clear", "id": "cc"})
    self_spec = gen(worker, "self", prompt, max_tokens=24)
    assert generated_tokens(self_spec) == generated_tokens(plain)
    stats = next(e for e in self_spec if e["type"] == "stats")
    assert stats["draft_tokens_accepted"] > 12
    assert stats["draft_tokens_proposed"] >= stats["draft_tokens_accepted"]
    # a follow-up reuses both caches and stays identical: the prompt is what the entry holds (all but its
    # last token, which a prompt always leaves to process)
    follow_ids = ref.text_ids(llama_dir, "speculate on this") + generated_tokens(plain)
    follow = gen(worker, "self2", {"tokens": follow_ids}, max_tokens=8)
    assert next(e for e in follow if e["type"] == "stats")["cached_tokens"] == len(follow_ids) - 1
    expected = ref.generate(llama_dir, follow_ids, 8)
    assert_varied(expected, what="mlx-lm's follow-up")
    assert generated_tokens(follow) == expected


def test_incompatible_draft_is_refused(worker, llama_dir, qwen2_dir):
    worker.load(llama_dir)
    err = worker.request({"type": "load_draft", "id": "bad", "model_path": str(qwen2_dir)})[-1]
    assert err["type"] == "error" and err["code"] == "draft_incompatible"
    events = gen(worker, "still", {"text": "x"}, max_tokens=3)
    assert "speculative" not in next(e for e in events if e["type"] == "stats")


def test_kv_bits_generates_and_reuses(worker, llama_dir):
    from mlx_lm.models.cache import make_prompt_cache

    worker.load(llama_dir, kv_bits=8, kv_group_size=32)
    prompt = ref.text_ids(llama_dir, "quantized cache please")
    first = gen(worker, "q1", {"tokens": prompt}, max_tokens=10)
    model, _ = ref.load_model(llama_dir)
    expected = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=10, kv_bits=8,
                                            kv_group_size=32, quantized_kv_start=0,
                                            prompt_cache=make_prompt_cache(model))]
    assert_varied(expected, what="mlx-lm's answer with a quantized cache")
    assert generated_tokens(first) == expected
    follow = gen(worker, "q2", {"tokens": prompt + expected + [9, 10]}, max_tokens=4)
    # the entry holds the prompt and the 10 generated tokens: the follow-up reuses all of them
    assert next(e for e in follow if e["type"] == "stats")["cached_tokens"] == len(prompt) + 10


BAD_PARAMS = [
    ("max_tokens", -1), ("temperature", -0.5), ("top_p", 0), ("top_p", 1.5), ("top_k", -1),
    ("min_p", 2), ("seed", -3), ("stop", [""]), ("stop", "x"), ("stop_token_ids", [-1]),
    ("stop_token_ids", [10**9]), ("top_logprobs", 21), ("repetition_penalty", 0),
    ("repetition_context_size", 0), ("presence_penalty", 11), ("frequency_penalty", "x"),
    ("logit_bias", {"x": 1}), ("logit_bias", {"5": 1000}), ("logit_bias", {"999999": 1}),
    ("json_schema", {"type": "nonsense"}), ("json_schema", 5), ("speculative", "yes"),
    ("num_draft_tokens", 0),
]


@pytest.mark.parametrize("name,value", BAD_PARAMS, ids=[f"{n}={v!r}" for n, v in BAD_PARAMS])
def test_bad_param_value(llama_worker, name, value):
    err = llama_worker.request({"type": "generate", "id": f"bad-{name}", "prompt": {"text": "x"},
                                "params": {name: value}})[-1]
    assert err["type"] == "error" and err["code"] == "invalid_params", err
    assert name in err["message"], err["message"]


BAD_OPTIONS = [("kv_bits", 3), ("kv_group_size", 48), ("quantized_kv_start", -1),
               ("draft_model_path", ""), ("max_kv_size", 0), ("dtype", "int8"),
               ("cache_max_bytes", -1), ("prefill_step_size", 0)]


@pytest.fixture(scope="module")
def bare_worker():
    """One worker for the refused loads: a refused load leaves it as it was."""
    w = Worker()
    yield w
    w.close()


@pytest.mark.parametrize("name,value", BAD_OPTIONS, ids=[f"{n}={v!r}" for n, v in BAD_OPTIONS])
def test_bad_load_option(bare_worker, llama_dir, name, value):
    err = bare_worker.request({"type": "load", "id": f"bad-{name}", "model_path": str(llama_dir),
                               "options": {name: value}})[-1]
    assert err["type"] == "error" and err["code"] == "invalid_params" and name in err["message"]


@pytest.mark.real_model
def test_smollm2_as_its_own_draft(smollm2_dir):
    w = Worker()
    try:
        w.load(smollm2_dir, draft_model_path=str(smollm2_dir))
        q = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}
        plain = gen(w, "p", q, max_tokens=20, speculative=False)
        w.request({"type": "cache_clear", "id": "c"})
        spec = gen(w, "s", q, max_tokens=20)
        assert generated_tokens(spec) == generated_tokens(plain)
        assert "Paris" in spec[-1]["text"]
        assert next(e for e in spec if e["type"] == "stats")["draft_tokens_accepted"] > 0
    finally:
        w.close()


def test_speculative_prefill_cancel_keeps_the_main_cache(worker, llama_dir, fixtures_root):
    from tests.support.fixtures import fixture_dir

    draft = fixture_dir("llama_draft", fixtures_root)
    worker.load(llama_dir, draft_model_path=str(draft), prefill_step_size=4)
    prompt = {"tokens": random_ids(1500, 13)}
    worker.send({"type": "generate", "id": "sc", "prompt": prompt, "params": {"max_tokens": 4}})
    while True:
        ev = worker.next_event()
        if ev["id"] == "sc" and ev["type"] == "progress" and ev["processed"] > 0:
            break
    worker.send({"type": "cancel", "id": "scx", "target": "sc"})
    assert worker.collect("sc")[-1]["stop_reason"] == "cancelled"
    again = gen(worker, "sc2", prompt, max_tokens=4)
    stats = next(e for e in again if e["type"] == "stats")
    assert stats["cached_tokens"] > 0 and stats["speculative"] == "on"
    assert generated_tokens(again) == ref.generate(llama_dir, prompt["tokens"], 4)


def test_speculative_with_a_sliding_window(worker, gemma3_dir):
    """Gemma 3 (window 512) as its own draft: speculative while prompt + answer + drafts fit the window,
    off ("sliding window") past it, where mlx-lm could not rewind rejected drafts; tokens equal mlx-lm's."""
    worker.request({"type": "load", "id": "l", "model_path": str(gemma3_dir),
                    "options": {"draft_model_path": str(gemma3_dir)}})
    short, long = random_ids(100, 1), random_ids(700, 2)
    for ids, want in ((short, "on"), (long, "off: sliding window"), (long + short, "off: sliding window")):
        events = gen(worker, f"s{len(ids)}", {"tokens": ids}, max_tokens=16, num_draft_tokens=3)
        assert next(e for e in events if e["type"] == "stats")["speculative"] == want
        expected = ref.generate(gemma3_dir, ids, 16, dtype="float32")
        assert_varied(expected, what=f"mlx-lm's answer to {len(ids)} tokens")
        assert generated_tokens(events) == expected
    edge = short * 4 + short[:95]  # 495 + 16 + 3 = 514 >= 512: would wrap
    events = gen(worker, "edge", {"tokens": edge}, max_tokens=16, num_draft_tokens=3)
    assert next(e for e in events if e["type"] == "stats")["speculative"] == "off: sliding window"

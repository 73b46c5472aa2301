"""Speculative decoding inside the batch, through the real worker: a draft model and prompt lookup.

Four requests sent at once to a batching worker with a draft model (each with its own num_draft_tokens) or with
prompt lookup give mlx-lm's greedy tokens for each request alone (generate_step, no speculation). The draft is the
main checkpoint with a little noise on its weights (tests/support/fixtures.py ``<family>_noisy<scale>``), so it
agrees with the main model often but not always: steps accept some proposals and reject others, row by row, and
every rejection is rewound in the batch's caches. Prompt lookup proposes from n-grams of the request's history; a
logit_bias confining the output to a few tokens makes that history repeat, so its proposals are accepted in part.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.support import reference as ref  # noqa: E402
from tests.support.client import Worker, generated_tokens  # noqa: E402
from tests.support.fixtures import fixture_dir  # noqa: E402
from tests.support.prompts import assert_varied, random_ids  # noqa: E402

NOISE = {"llama": 0.01, "qwen2": 0.01, "gemma3_w64": 0.003}  # agreeing with the main model about half the time


def _stats(events):
    return next(e for e in events if e["type"] == "stats")


def _send_all(w, reqs):
    for r in reqs:
        w.send({"type": "generate", **r})
    return {r["id"]: w.collect(r["id"]) for r in reqs}


def _biased(seed):
    """A logit_bias that confines greedy output to eight tokens: it repeats, but never one token alone."""
    return {str(t): 8.0 for t in random_ids(8, 300 + seed)}


@pytest.fixture(scope="module")
def dirs(fixtures_root, gemma3_w64_dir, family_dirs):
    return {"llama": family_dirs["llama"], "qwen2": family_dirs["qwen2"], "gemma3_w64": gemma3_w64_dir}


def _noisy(family, dirs, fixtures_root):
    if family != "gemma3_w64":
        return fixture_dir(f"{family}_noisy{NOISE[family]}", fixtures_root)
    from tests.support.fixtures import build_noisy_copy, build_once

    src = dirs[family]
    return build_once(src.parent / "noisy", lambda tmp: build_noisy_copy(src, tmp, NOISE[family]))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_w64"])
def test_draft_and_lookup_in_the_batch_give_mlx_lm_s_tokens(family, dirs, fixtures_root):
    """Four drafted requests decoded together, then four with prompt lookup: each gives mlx-lm's greedy tokens
    alone, with some proposals accepted and some rejected. (gemma3_w64: prompt + answer pass its 64-token
    window, where the batch stops speculating for the rest of the request.)"""
    path, draft = dirs[family], _noisy(family, dirs, fixtures_root)
    w = Worker()
    try:
        w.load(path, max_concurrent=4, draft_model_path=str(draft))
        drafted = [{"id": f"d{i}", "prompt": {"tokens": random_ids(20 + 9 * i, 100 + i)},
                    "params": {"max_tokens": 36, "num_draft_tokens": 2 + i}} for i in range(4)]
        looked = [{"id": f"l{i}", "prompt": {"tokens": random_ids(25 + 5 * i, 200 + i)},
                   "params": {"max_tokens": 40, "speculative": False, "prompt_lookup": True,
                              "prompt_lookup_tokens": 3 + 2 * i, "logit_bias": _biased(i)}} for i in range(4)]
        got = {**_send_all(w, drafted), **_send_all(w, looked)}
    finally:
        w.close()
    accepted = proposed = 0
    for r in drafted:
        want = ref.generate(path, r["prompt"]["tokens"], r["params"]["max_tokens"])
        assert_varied(want, 4, what=f"mlx-lm's output for {r['id']}")
        assert generated_tokens(got[r["id"]]) == want, r["id"]
        st = _stats(got[r["id"]])
        assert st["batching"] == "on" and st["speculative"] == "on" and st["concurrent"] >= 2, st
        accepted, proposed = accepted + st["draft_tokens_accepted"], proposed + st["draft_tokens_proposed"]
        marked = [f for e in got[r["id"]] if e["type"] == "token" for f in e["from_draft"]]
        assert sum(marked) == st["draft_tokens_accepted"] and len(marked) == len(want)
    assert 0 < accepted < proposed, (accepted, proposed)  # some of each, in the batch
    accepted = proposed = 0
    for i, r in enumerate(looked):
        want, _ = ref.generate_processed(path, r["prompt"]["tokens"], 40, logit_bias={int(k): v for k, v in
                                                                                      _biased(i).items()})
        assert_varied(want, 3, what=f"mlx-lm's biased output for {r['id']}")
        assert generated_tokens(got[r["id"]]) == want, r["id"]
        st = _stats(got[r["id"]])
        assert st["prompt_lookup"] == "on" and st["speculative"] == "off: request" and st["batching"] == "on", st
        accepted, proposed = accepted + st["draft_tokens_accepted"], proposed + st["draft_tokens_proposed"]
    assert 0 < accepted < proposed, (accepted, proposed)


def test_every_kind_of_request_beside_drafted_ones(llama_dir, fixtures_root):
    """Drafted rows beside a request without a draft, one with logprobs and a repetition penalty (its processors
    see each verified position's context), a stop string, and a sampled one: each as mlx-lm gives it alone; the
    sampled one's tokens are a draw (not the greedy output) whose reported logprobs are mlx-lm's for them."""
    draft = fixture_dir(f"llama_noisy{NOISE['llama']}", fixtures_root)
    text = ref.decode(llama_dir, ref.generate(llama_dir, random_ids(30, 41), 40))
    stop = text[len(text) // 2:len(text) // 2 + 3]
    reqs = [
        {"id": "plain", "prompt": {"tokens": random_ids(30, 40)}, "params": {"max_tokens": 30, "speculative": False}},
        {"id": "stop", "prompt": {"tokens": random_ids(30, 41)}, "params": {"max_tokens": 40, "stop": [stop]}},
        {"id": "pen", "prompt": {"tokens": random_ids(35, 42)},
         "params": {"max_tokens": 30, "top_logprobs": 2, "repetition_penalty": 1.3, "num_draft_tokens": 4}},
        {"id": "sampled", "prompt": {"tokens": random_ids(28, 43)},
         "params": {"max_tokens": 24, "temperature": 1.5, "top_logprobs": 1, "seed": 3}},
    ]
    w = Worker()
    try:
        eos = w.load(llama_dir, max_concurrent=4, draft_model_path=str(draft))["eos_token_ids"]
        reqs[3]["params"]["logit_bias"] = {str(t): -100 for t in eos}
        got = _send_all(w, reqs)
    finally:
        w.close()
    want = ref.generate(llama_dir, reqs[0]["prompt"]["tokens"], 30)
    assert_varied(want, 4) and generated_tokens(got["plain"]) == want
    assert _stats(got["plain"])["speculative"] == "off: request"
    assert got["stop"][-1]["stop_reason"] == "stop_string" and got["stop"][-1]["text"] == text[:text.index(stop)]
    pen, lps = ref.generate_processed(llama_dir, reqs[2]["prompt"]["tokens"], 30, repetition_penalty=1.3)
    assert_varied(pen, 4)
    assert generated_tokens(got["pen"]) == pen
    reported = [lp["logprob"] for e in got["pen"] if e["type"] == "token" for lp in e["logprobs"]]
    assert max(abs(a - b) for a, b in zip(reported, lps)) < 1e-4 and len(reported) == len(pen)
    assert _stats(got["pen"])["draft_tokens_accepted"] > 0
    out = generated_tokens(got["sampled"])
    assert_varied(out, 8, what="the sampled tokens")
    greedy = ref.greedy_choices(llama_dir, reqs[3]["prompt"]["tokens"], out)  # a draw, step after step
    assert sum(a == b for a, b in zip(out, greedy)) < len(out) // 3, (out, greedy)
    reported = [lp["logprob"] for e in got["sampled"] if e["type"] == "token" for lp in e["logprobs"]]
    want = ref.logprobs_of(llama_dir, reqs[3]["prompt"]["tokens"], out, banned=eos)
    assert max(abs(a - b) for a, b in zip(reported, want)) < 1e-3, list(zip(reported, want))
    for r in reqs:
        assert _stats(got[r["id"]])["batching"] == "on"


def test_prompt_lookup_alone_and_its_defaults(llama_dir):
    """prompt_lookup true verifies alone too (max_concurrent 1: the batch's decode step for one, stats.batching
    absent); the default (null) is off there (mlx-lm's generate_step) and on in the batch; false is off."""
    ids = random_ids(30, 210)
    params = {"max_tokens": 40, "logit_bias": _biased(10)}
    want, _ = ref.generate_processed(llama_dir, ids, 40, logit_bias={int(k): v for k, v in _biased(10).items()})
    assert_varied(want, 3)
    seen = {}
    for conc in (1, 2):
        w = Worker()
        try:
            w.load(llama_dir, max_concurrent=conc)
            for mode in (True, None, False):
                evs = w.request({"type": "generate", "id": f"g{conc}{mode}", "prompt": {"tokens": ids},
                                 "params": {**params, "prompt_lookup": mode}})
                assert generated_tokens(evs) == want, (conc, mode)
                seen[conc, mode] = _stats(evs)
            # max_tokens 0 (in the batch too): the prompt is processed and cached, nothing generated
            evs = w.request({"type": "generate", "id": f"z{conc}", "prompt": {"tokens": ids},
                             "params": {"max_tokens": 0, "prompt_lookup": True}})
            assert evs[-1]["stop_reason"] == "max_tokens" and evs[-1]["text"] == "" and not generated_tokens(evs)
            assert _stats(evs)["generated_tokens"] == 0 and "ttft_s" not in _stats(evs), _stats(evs)
        finally:
            w.close()
    assert seen[1, True]["prompt_lookup"] == "on" and seen[1, True].get("batching") is None
    assert seen[1, True]["draft_tokens_accepted"] > 0
    assert seen[1, None].get("prompt_lookup") is None and seen[1, False].get("prompt_lookup") is None
    assert seen[2, None]["prompt_lookup"] == "on" and seen[2, None]["batching"] == "on"
    assert seen[2, False].get("prompt_lookup") is None and seen[2, False].get("draft_tokens_proposed") is None


def test_the_model_as_its_own_draft_has_every_proposal_accepted(llama_dir):
    """A draft identical to the main model proposes exactly the main model's greedy tokens: every proposal is
    accepted (a draft cache a token off, or fed the wrong tokens, would propose others)."""
    reqs = [{"id": f"s{i}", "prompt": {"tokens": random_ids(18 + 11 * i, 60 + i)},
             "params": {"max_tokens": 25, "num_draft_tokens": 3 + i}} for i in range(2)]
    w = Worker()
    try:
        w.load(llama_dir, max_concurrent=2, draft_model_path=str(llama_dir))
        got = _send_all(w, reqs)
    finally:
        w.close()
    for r in reqs:
        want = ref.generate(llama_dir, r["prompt"]["tokens"], 25)
        assert_varied(want, 4)
        assert generated_tokens(got[r["id"]]) == want
        # the first token (sampled by the prompt's last position), then each step: its pending token and k accepted
        k = r["params"]["num_draft_tokens"]
        marked = [f for e in got[r["id"]] if e["type"] == "token" for f in e["from_draft"]]
        assert marked == ([False] + ([False] + [True] * k) * 25)[:25], marked
        st = _stats(got[r["id"]])
        assert st["draft_tokens_accepted"] == sum(marked), st


def test_a_draft_beside_kv_bits_in_the_batch(llama_dir, fixtures_root):
    """With kv_bits both models' caches are quantized from the first chunk (as alone), and the batch's quantized
    rows rewind rejected proposals row by row: mlx-lm's tokens with the same kv_bits alone."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    draft = fixture_dir(f"llama_noisy{NOISE['llama']}", fixtures_root)
    kv = {"kv_bits": 4, "kv_group_size": 32}
    reqs = [{"id": f"q{i}", "prompt": {"tokens": random_ids(15 + 20 * i, 150 + i)},
             "params": {"max_tokens": 30, "num_draft_tokens": 2 + i}} for i in range(3)]
    w = Worker()
    try:
        w.load(llama_dir, max_concurrent=3, draft_model_path=str(draft), **kv)
        got = _send_all(w, reqs)
    finally:
        w.close()
    model, tok = ref.load_model(llama_dir)
    accepted = 0
    for r in reqs:
        want = [t for t, _ in generate_step(mx.array(r["prompt"]["tokens"]), model, max_tokens=30,
                                            quantized_kv_start=0, **kv)]
        want = want[:next((i for i, t in enumerate(want) if t in tok.eos_token_ids), len(want))]
        assert_varied(want, 4)
        assert generated_tokens(got[r["id"]]) == want, r["id"]
        st = _stats(got[r["id"]])
        assert st["batching"] == "on" and st["speculative"] == "on", st
        accepted += st["draft_tokens_accepted"]
    assert accepted > 0


def test_image_requests_with_a_draft_and_with_prompt_lookup(tmp_path_factory):
    """Gemma 3 vision: an image question drafted, another with prompt lookup (its output confined to a few
    tokens so that it repeats) and a drafted text request, decoded together, give what they give alone without
    speculation (tests/process/test_vision_exactness.py holds that path to mlx-vlm's)."""
    import numpy as np
    from PIL import Image

    from tests.support.fixtures import build_noisy_copy, build_once
    from tests.support.vlm_fixtures import vlm_fixture_dir

    root = tmp_path_factory.mktemp("spec-vlm")
    path = vlm_fixture_dir("gemma3", root)
    draft = build_once(root / "noisy", lambda tmp: build_noisy_copy(path, tmp, NOISE["gemma3_w64"]))
    img = root / "a.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(img)
    image_msg = [{"role": "user", "content": [{"type": "image", "path": str(img)},
                                              {"type": "text", "text": "What is this?"}]}]
    reqs = [{"id": "drafted", "prompt": {"messages": image_msg}, "params": {"max_tokens": 30}},
            {"id": "looked", "prompt": {"messages": image_msg},
             "params": {"max_tokens": 30, "speculative": False, "prompt_lookup": True, "logit_bias": _biased(3)}},
            {"id": "text", "prompt": {"tokens": random_ids(30, 6)}, "params": {"max_tokens": 30}}]
    outs = {}
    for label, options in (("alone", {"max_concurrent": 1}),
                           ("together", {"max_concurrent": 4, "draft_model_path": str(draft)})):
        w = Worker()
        try:
            w.request({"type": "load", "id": "l", "model_path": str(path), "options": options})
            if label == "alone":
                off = [{**r, "params": {**r["params"], "prompt_lookup": False}} for r in reqs]
                outs[label] = {r["id"]: w.request({"type": "generate", **r}) for r in off}
            else:
                outs[label] = _send_all(w, reqs)
        finally:
            w.close()
    for r in reqs:
        want = generated_tokens(outs["alone"][r["id"]])
        assert_varied(want, 3, what=f"the {r['id']!r} request's output alone")
        assert generated_tokens(outs["together"][r["id"]]) == want, r["id"]
    st = {rid: _stats(evs) for rid, evs in outs["together"].items()}
    assert st["drafted"]["speculative"] == "on" and st["looked"]["prompt_lookup"] == "on", st
    assert st["drafted"]["draft_tokens_proposed"] > 0 and st["looked"]["draft_tokens_accepted"] > 0, st
    assert all(s["batching"] == "on" for s in st.values())


def test_auto_lookup_leaves_a_seeded_sample_as_alone(llama_dir):
    """Auto prompt lookup takes greedy requests only: a seeded sampled request whose output repeats (a logit_bias
    confining it to 8 tokens, so n-grams recur) draws in the batch exactly mlx-lm's seeded sample alone (verifying
    proposals would sample several positions per draw); asking for lookup explicitly is the caller's choice."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    ids, bias = random_ids(20, 220), _biased(20)
    params = {"max_tokens": 40, "temperature": 0.7, "seed": 5, "logit_bias": bias}
    w = Worker()
    try:
        w.load(llama_dir, max_concurrent=2)  # one after the other: a row alone computes as generate_step does
        got = {"auto": w.request({"type": "generate", "id": "auto", "prompt": {"tokens": ids}, "params": params}),
               "on": w.request({"type": "generate", "id": "on", "prompt": {"tokens": ids},
                                "params": {**params, "prompt_lookup": True}})}
    finally:
        w.close()
    model, tok = ref.load_model(llama_dir)
    mx.random.seed(5)
    procs = make_logits_processors(logit_bias={int(k): v for k, v in bias.items()})
    want = [t for t, _ in generate_step(mx.array(ids), model, max_tokens=40, sampler=make_sampler(0.7),
                                        logits_processors=procs)]
    want = want[:next((i for i, t in enumerate(want) if t in tok.eos_token_ids), len(want))]
    assert_varied(want, 3)
    assert generated_tokens(got["auto"]) == want and _stats(got["auto"]).get("prompt_lookup") is None
    st = _stats(got["on"])  # the same request with lookup asked for: proposals were verified
    assert st["prompt_lookup"] == "on" and st["draft_tokens_proposed"] > 0, st

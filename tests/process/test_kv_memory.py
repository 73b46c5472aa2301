"""Memory you can trust (PROTOCOL.md, Concurrency): a KV ceiling (`load.options.kv_memory`) that requests reserve
against, on a batching worker with a small ceiling. A request that can never fit is refused before any compute, one
that fits only once others end waits (and `status.kv_memory` says why), an allocation failure in one request's
prefill ends that request alone; the others give mlx-lm's tokens and the worker goes on.

One worker serves the module: the llama fixture with a model file that fails like MLX's allocator
("[metal::malloc] Resource limit ... exceeded") on a prompt chunk starting with ids 401, 402.
"""

import json
import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.support import reference as ref  # noqa: E402
from tests.support.client import Worker, generated_tokens  # noqa: E402
from tests.support.prompts import random_ids  # noqa: E402

FAULTY = '''
from mlx_lm.models.llama import Model as _Model, ModelArgs  # noqa: F401


class Model(_Model):
    def __call__(self, inputs, *args, **kwargs):
        if inputs.shape[-1] > 1 and inputs[0, :2].tolist() == [401, 402]:  # a prompt chunk, not a decode step
            raise RuntimeError("[metal::malloc] Resource limit (499000) exceeded (injected)")
        return super().__call__(inputs, *args, **kwargs)
'''

STEP = 256  # mlx-lm's KV layers allocate 256 tokens at a time, from wherever a prefill chunk ended


def _token_bytes(path) -> int:
    """KV bytes a token of this float32 checkpoint: every layer's keys and values."""
    cfg = json.loads((path / "config.json").read_text())
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head * 4


def _kv(path, tokens: int) -> int:
    """What a request of ``tokens`` (prompt + max_tokens) reserves: less than one step more, at most."""
    return (tokens + STEP - 1) * _token_bytes(path)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


@pytest.fixture(scope="module")
def ceiling(llama_dir):
    return _kv(llama_dir, 5 + 1700)  # 3.83 MiB


@pytest.fixture(scope="module")
def w(llama_dir, ceiling, tmp_path_factory):
    d = tmp_path_factory.mktemp("oom") / "faulty"
    shutil.copytree(llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_file": "faulty.py"}))
    (d / "faulty.py").write_text(FAULTY)
    worker = Worker()
    worker.load(d, max_concurrent=3, kv_memory=ceiling, trust_remote_code=True)
    yield worker
    worker.close()


def _gen(rid, ids, n, **params):
    return {"type": "generate", "id": rid, "prompt": {"tokens": ids}, "params": {"max_tokens": n, **params}}


def _kv_status(w, rid):
    return w.request({"type": "status", "id": rid})[-1]


def test_a_request_that_can_never_fit_is_refused_and_the_others_complete(w, llama_dir, ceiling):
    ok1, ok2 = random_ids(5, 31), random_ids(5, 32)
    assert _kv(llama_dir, 5 + 2000) > ceiling >= _kv(llama_dir, 5 + 16) * 2
    for r in (_gen("ok1", ok1, 16), _gen("huge", random_ids(5, 33), 2000), _gen("ok2", ok2, 16)):
        w.send(r)
    huge = w.collect("huge")
    assert [e["type"] for e in huge] == ["error"], huge  # no progress, no token: refused before any compute
    err = huge[0]
    assert err["code"] == "out_of_memory", err
    assert _mib(_kv(llama_dir, 5 + 2000)) in err["message"] and _mib(ceiling) in err["message"], err
    assert "max_tokens" in err["message"] and "kv_memory" in err["message"] and "kv_bits" in err["message"]
    for rid, ids in (("ok1", ok1), ("ok2", ok2)):
        events = w.collect(rid)
        assert events[-1]["type"] == "done" and events[-1]["stop_reason"] == "max_tokens", events[-1]
        assert generated_tokens(events) == ref.generate(llama_dir, ids, 16), rid
    w.send(_gen("after", ok1[:3], 8))  # the worker goes on
    after = w.collect("after")
    assert generated_tokens(after) == ref.generate(llama_dir, ok1[:3], 8)


def test_a_request_that_fits_only_after_others_end_waits(w, llama_dir, ceiling):
    """`long` reserves the whole ceiling (prompt + max_tokens); `wait` cannot fit beside it (a batch pads its rows
    to the longest) and starts once `long` ends; `status.kv_memory` says so meanwhile."""
    assert _kv(llama_dir, 5 + 1700) == ceiling
    wait_ids = random_ids(5, 35)
    w.send(_gen("long", random_ids(5, 34), 1700))
    w.send(_gen("wait", wait_ids, 12))
    w.wait_for("long", lambda e: e["type"] == "token")
    st = _kv_status(w, "s-wait")  # answered at once; `long`'s 1,700 tokens take seconds
    assert st["running"] == ["long", "wait"], st
    assert st["kv_memory"] == {"ceiling": ceiling, "reserved": ceiling, "free": 0}, st["kv_memory"]
    assert not [e for e in w.backlog if e.get("id") == "wait"], "it started beside `long`"
    w.request({"type": "cancel", "id": "c-long", "target": "long"})
    long = w.collect("long")
    waited = w.collect("wait")
    assert waited[0]["seq"] > long[-1]["seq"], "`wait` started before `long` ended"
    assert generated_tokens(waited) == ref.generate(llama_dir, wait_ids, 12)
    assert _kv_status(w, "s-after")["kv_memory"] == {"ceiling": ceiling, "reserved": 0, "free": ceiling}


def test_an_allocation_failure_in_one_prefill_ends_only_that_request(w, llama_dir, ceiling):
    steady, ok = random_ids(5, 36), random_ids(5, 37)
    w.send(_gen("steady", steady, 40))
    w.backlog.append(w.wait_for("steady", lambda e: e["type"] == "token"))  # it decodes while `boom` prefills
    w.send(_gen("boom", [401, 402, 7, 8, 411], 8))
    w.send(_gen("ok", ok, 12))
    boom = w.collect("boom", timeout=30)  # (before, a failed admission was never answered)
    assert boom[-1]["type"] == "error" and boom[-1]["code"] == "out_of_memory", boom[-1]
    assert "prefill" in boom[-1]["message"] and "Resource limit" in boom[-1]["message"], boom[-1]
    assert not generated_tokens(boom)
    for rid, ids, n in (("steady", steady, 40), ("ok", ok, 12)):
        events = w.collect(rid)
        assert events[-1]["type"] == "done", events[-1]
        assert generated_tokens(events) == ref.generate(llama_dir, ids, n), rid
    st = _kv_status(w, "s-boom")
    assert st["engine_alive"] and st["state"] == "idle", st
    assert st["kv_memory"]["reserved"] == 0, st["kv_memory"]  # the failed request's reservation is released


def test_a_request_run_alone_gets_the_same_refusal(llama_dir):
    """max_concurrent 1 (no batch): the same check, before any compute, and the ledger is left empty."""
    from worker.engine import Engine
    from worker.protocol import Generate, GenerateParams, Load, LoadOptions, Prompt

    engine = Engine()
    events = []
    done = engine.run(Load(id="l", model_path=str(llama_dir), options=LoadOptions(
        max_concurrent=1, kv_memory=_kv(llama_dir, 3 + 2 * STEP))), events.append, lambda: False)
    assert done.model.max_concurrent == 1
    run = lambda rid, n: engine.run(Generate(id=rid, prompt=Prompt(tokens=[3, 4, 5]),  # noqa: E731
                                             params=GenerateParams(max_tokens=n)), events.append, lambda: False)
    events.clear()
    refused = run("big", 2 * STEP + 1)
    assert refused.code == "out_of_memory" and "kv_memory" in refused.message and not events, refused
    assert run("small", 8).stop_reason == "max_tokens"
    assert engine.view.kv.figures.reserved == 0

"""Acceptance: bad input gets exactly one `error` with the right code, and the worker keeps serving."""

import json
import shutil

import pytest

BAD_LINES = [
    (b"{not json", "parse_error", None),
    (b"\xff\xfe garbage", "parse_error", None),
    (b"[1, 2, 3]", "invalid_request", None),
    (b'"a string"', "invalid_request", None),
    (b'{"type": "status"}', "invalid_request", None),
    (b'{"type": "status", "id": 5}', "invalid_request", None),
    (b'{"id": "t1"}', "invalid_request", "t1"),
    (b'{"type": "dance", "id": "t2"}', "unknown_type", "t2"),
    (b'{"type": "generate", "id": "t3", "prompt": {"text": 5}}', "invalid_params", "t3"),
    (b'{"type": "generate", "id": "t4", "prompt": {"text": "x"}, "params": {"max_tokens": "9"}}',
     "invalid_params", "t4"),
    (b'{"type": "generate", "id": "t5", "prompt": {"text": "x"}, "params": {"temperature": -1}}',
     "invalid_params", "t5"),
    (b'{"type": "generate", "id": "t6", "prompt": {"text": "x"}, "params": {"bogus": 1}}',
     "invalid_params", "t6"),
    (b'{"type": "load", "id": "t7"}', "invalid_params", "t7"),
    (b'{"type": "cancel", "id": "t8", "target": 3}', "invalid_params", "t8"),
    (b'{"type": "generate", "id": "t9", "prompt": {"text": "x"}}', "no_model", "t9"),
    (b'{"type": "generate", "id": "t10", "prompt": {"text": "x", "tokens": [1]}}', "no_model", "t10"),
    (b'{"type": "load", "id": "t11", "model_path": "/nonexistent/model"}', "model_not_found", "t11"),
]


def _one_error(worker, line, rid):
    worker.send_raw(line + b"\n")
    # a status right after proves the worker still serves, and bounds what we read
    worker.send({"type": "status", "id": "probe"})
    events = worker.collect("probe")
    errors = [e for e in worker.backlog + events if e["type"] == "error"]
    worker.backlog.clear()
    assert len(errors) == 1, errors
    assert errors[0]["id"] == rid
    return errors[0]


@pytest.mark.parametrize("line,code,rid", BAD_LINES, ids=[c for _, c, _ in BAD_LINES])
def test_bad_line(worker, line, code, rid):
    if code in ("no_model", "model_not_found") or rid == "t10":
        # these are answered by the engine, after the probe; wait for them instead
        events = worker.request(json.loads(line))
        assert [e["type"] for e in events] == ["error"] or events[-1]["type"] == "error"
        err = events[-1]
        expected = code if rid != "t10" else "no_model"
    else:
        err = _one_error(worker, line, rid)
        expected = code
    assert err["code"] == expected, err
    assert isinstance(err["number"], int) and err["message"]
    assert worker.request({"type": "status", "id": "alive"})[-1]["type"] == "done"


def test_prompt_with_two_kinds_is_invalid(llama_worker):
    err = llama_worker.request({"type": "generate", "id": "two",
                                "prompt": {"text": "x", "tokens": [1]}})[-1]
    assert err["code"] == "invalid_params" and "exactly one" in err["message"]


def test_token_out_of_vocab(llama_worker):
    err = llama_worker.request({"type": "generate", "id": "oov", "prompt": {"tokens": [10**6]}})[-1]
    assert err["code"] == "invalid_params"


def test_corrupt_and_partial_checkpoints(worker, llama_dir, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(llama_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    partial = tmp_path / "partial"
    shutil.copytree(llama_dir, partial)
    data = (partial / "model.safetensors").read_bytes()
    (partial / "model.safetensors").write_bytes(data[: len(data) // 2])
    no_weights = tmp_path / "noweights"
    shutil.copytree(llama_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    bad_type = tmp_path / "badtype"
    shutil.copytree(llama_dir, bad_type)
    cfg = json.loads((bad_type / "config.json").read_text())
    (bad_type / "config.json").write_text(json.dumps({**cfg, "model_type": "no_such_family"}))
    not_dir = llama_dir / "config.json"
    for path, code in [(corrupt, "model_load_failed"), (partial, "model_load_failed"),
                       (no_weights, "model_load_failed"), (bad_type, "model_load_failed"),
                       (not_dir, "model_not_found"), (tmp_path, "model_not_found")]:
        events = worker.request({"type": "load", "id": f"l-{path.name}", "model_path": str(path)})
        assert events[-1]["type"] == "error" and events[-1]["code"] == code, (path, events[-1])
    info = worker.load(llama_dir)
    assert info["model_type"] == "llama"


def test_remote_code_is_refused(worker, llama_dir, tmp_path):
    for key in ("model_file", "auto_map"):
        d = tmp_path / key
        shutil.copytree(llama_dir, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg[key] = "evil.py" if key == "model_file" else {"AutoModel": "evil.Model"}
        (d / "config.json").write_text(json.dumps(cfg))
        (d / "evil.py").write_text("open('/tmp/mlx_worker_pwned', 'w').write('x')\n")
        err = worker.request({"type": "load", "id": f"rc-{key}", "model_path": str(d)})[-1]
        assert err["code"] == "remote_code_refused", err
    import os
    assert not os.path.exists("/tmp/mlx_worker_pwned")


def test_requests_that_need_a_model_before_any_load(worker):
    """PROTOCOL.md: `tokenize`, `load_draft` (a path or null) and `cache_clear` without a model are `no_model`;
    `unload` with nothing loaded is done (nothing to release)."""
    for req, code in [({"type": "tokenize", "text": "hi"}, "no_model"),
                      ({"type": "load_draft", "model_path": "/nowhere"}, "no_model"),
                      ({"type": "load_draft", "model_path": None}, "no_model"),
                      ({"type": "cache_clear"}, "no_model"),
                      ({"type": "unload"}, None)]:
        rid = f"{req['type']}-{req.get('model_path')}"
        events = worker.request({**req, "id": rid})
        assert len(events) == 1, events
        if code is None:
            assert events[0] == {**events[0], "type": "done", "request": req["type"]}, events
        else:
            assert events[0]["type"] == "error" and events[0]["code"] == code, events
    assert worker.request({"type": "status", "id": "st"})[-1]["state"] == "empty"


def _next_error(w):
    """The next error event, whatever its id (the events before it are kept for later)."""
    while True:
        ev = w.next_event()
        if ev["type"] == "error":
            return ev
        w.backlog.append(ev)


def test_duplicate_active_id(worker, llama_dir):
    """The duplicate's error has ``id: null`` and ``refused_id``: a host that ends a request on its one
    done/error does not end the running one, which goes on and ends with its own terminal event."""
    worker.load(llama_dir)
    worker.send({"type": "generate", "id": "dup", "prompt": {"tokens": [3]},
                 "params": {"max_tokens": 100000}})
    worker.wait_for("dup", lambda e: e["type"] == "token")
    worker.send({"type": "generate", "id": "dup", "prompt": {"tokens": [3]}})
    err = _next_error(worker)
    assert err["code"] == "invalid_request" and err["id"] is None and err.get("refused_id") == "dup", err
    worker.wait_for("dup", lambda e: e["type"] == "token")  # still running
    worker.send({"type": "cancel", "id": "c", "target": "dup"})
    events = worker.collect("dup")
    assert [e["type"] for e in events if e["type"] in ("done", "error")] == ["done"], events[-3:]
    assert events[-1]["stop_reason"] == "cancelled"


def test_oversized_line_is_skipped(tmp_path):
    from tests.support.client import Worker

    w = Worker(args=["--max-line-bytes", "1024"])
    try:
        assert w.ready["limits"]["max_line_bytes"] == 1024
        w.send_raw(b'{"type": "status", "id": "' + b"x" * 5000 + b'"}\n')  # no valid id to answer with
        err = w.next_event()
        assert err["type"] == "error" and err["code"] == "line_too_long" and err["id"] is None
        assert "refused_id" not in err, err
        assert w.request({"type": "status", "id": "ok"})[-1]["type"] == "done"
    finally:
        w.close()


def test_an_oversized_request_is_answered_with_its_id(llama_dir):
    """A line over the limit whose beginning holds its id gets its error with that id, so the host can end
    that request; unless the id belongs to a request still in progress (then ``id: null`` + ``refused_id``)."""
    from tests.support.client import Worker

    w = Worker(args=["--max-line-bytes", "1024"])
    try:
        w.load(llama_dir)
        big = {"type": "generate", "id": "big", "prompt": {"text": "word " * 2000}}
        w.send(big)
        err = _next_error(w)
        assert err["code"] == "line_too_long" and err["id"] == "big" and "refused_id" not in err, err
        w.send({"type": "generate", "id": "run", "prompt": {"tokens": [3]}, "params": {"max_tokens": 100000}})
        w.wait_for("run", lambda e: e["type"] == "token")
        w.send({**big, "id": "run"})
        err = _next_error(w)
        assert err["code"] == "line_too_long" and err["id"] is None and err.get("refused_id") == "run", err
        w.wait_for("run", lambda e: e["type"] == "token")  # still running
        w.send({"type": "cancel", "id": "c", "target": "run"})
        events = w.collect("run")
        assert [e["type"] for e in events if e["type"] in ("done", "error")] == ["done"], events[-3:]
    finally:
        w.close()

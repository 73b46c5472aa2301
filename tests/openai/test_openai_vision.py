"""An image question through the `openai` SDK to the tiny gemma3 VLM fixture: a data: URL, a file:// URL and an
absolute path give the worker's own greedy answer for the same image; a follow-up reuses the image from the
prompt cache; a broken image is a 400 and the server carries on."""
import base64

import openai
import pytest

from tests.openai.serving import Server
from tests.support.client import Worker
from tests.support.vlm_fixtures import vlm_fixture_dir

MAX = 8


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("openai-vlm")
    image = root / "a.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    return vlm_fixture_dir("gemma3", root), image


@pytest.fixture(scope="module")
def server(paths):
    s = Server(paths[0])
    yield s
    s.close()


def _worker_answer(model, image, question):
    w = Worker()
    try:
        w.load(model)
        evs = w.request({"type": "generate", "id": "g", "prompt": {"messages": [{"role": "user", "content": [
            {"type": "image", "path": str(image)}, {"type": "text", "text": question}]}]},
            "params": {"max_tokens": MAX}})
    finally:
        w.close()
    assert evs[-1]["type"] == "done", evs[-1]
    return evs[-1]["text"], evs[-2]["prompt_tokens"]


def _ask(client, name, url, question="What is this?", **kw):
    return client.chat.completions.create(model=name, max_tokens=MAX, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}], **kw)


def test_an_image_question_is_the_workers_own_answer(server, paths):
    model, image = paths
    want, prompt_tokens = _worker_answer(model, image, "What is this?")
    client = server.client()
    data = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    for url in (data, f"file://{image}", str(image)):
        r = _ask(client, model.name, url)
        assert r.choices[0].message.content == want and r.usage.prompt_tokens == prompt_tokens, url
    text_only = client.chat.completions.create(model=model.name, max_tokens=1, messages=[
        {"role": "user", "content": "What is this?"}]).usage.prompt_tokens
    follow = _ask(client, model.name, data, "And the colours?")
    assert follow.usage.prompt_tokens_details.cached_tokens >= prompt_tokens - text_only  # the image's tokens
    chunks = list(_ask(client, model.name, data, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want


def test_a_broken_image_is_a_400(server, paths):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, paths[0].name, "data:image/png;base64," + base64.b64encode(b"not a png").decode())
    assert e.value.body["code"] == "invalid_image"
    assert _ask(client, paths[0].name, f"file://{paths[1]}").choices[0].finish_reason in ("length", "stop")

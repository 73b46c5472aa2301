"""Vision exactness against an independent, corrected reference: transformers' processor gives the prompt
ids (``apply_chat_template(..., tokenize=True)``), and mlx-vlm's own model runs on those ids (its
``get_input_embeddings`` + language model, greedy). The worker's prompt ids and greedy tokens equal it.

Checkpoints whose chat template writes BOS and whose tokenizer also adds it (gemma3, pixtral, mistral3,
as the real Gemma 3 and Mistral checkpoints are), images that are not square and whose sides are not a
multiple of the patch size. mlx-vlm 0.7.10's own generate tokenizes such a rendered prompt with
``add_special_tokens=True`` and so starts it with BOS twice (pinned below); transformers' processor and the
worker write it once.
"""

import functools
import importlib
import json
import os
import sys
import types
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.support import reference  # noqa: E402
from tests.support.client import Worker, generated_tokens  # noqa: E402
from tests.support.prompts import assert_varied  # noqa: E402
from tests.process.test_vision import _vlm, chat, stats, user  # noqa: E402
from tests.support.vlm_fixtures import vlm_fixture_dir  # noqa: E402

MAX = 8
QUESTION = "What is this?"
BOS_FAMILIES = ("gemma3", "pixtral", "mistral3")
FAMILIES = BOS_FAMILIES + ("qwen2_vl", "qwen2_5_vl")
# (height, width): not square, no side a multiple of the patch size (8) or of a Qwen merge (16); "big" is
# larger than every fixture's processor limit, so it is resized down
SIZES = {"wide": (45, 70), "tall": (83, 37), "big": (130, 97)}
IMAGE_SETS = (("wide",), ("tall", "big"))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("vlm-exact")


@pytest.fixture(scope="module")
def pics(root):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(11)
    out = {}
    for name, (h, w) in SIZES.items():
        path = root / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        out[name] = str(path)
    return out


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def fixture(family, root):
    return vlm_fixture_dir(family, root, add_bos=family in BOS_FAMILIES)


def _pixtral_processor_class():
    """transformers' PixtralProcessor (also Mistral 3's). Its module imports the torchvision image
    processor for one helper that the PIL image processor's module has too: give it that one."""
    pil = importlib.import_module("transformers.models.pixtral.image_processing_pil_pixtral")
    name = "transformers.models.pixtral.image_processing_pixtral"
    if name not in sys.modules:
        try:
            importlib.import_module(name)
        except ImportError:  # no torch
            sys.modules[name] = types.SimpleNamespace(get_resize_output_image_size=pil.get_resize_output_image_size)
    return importlib.import_module("transformers.models.pixtral.processing_pixtral").PixtralProcessor


@functools.lru_cache(maxsize=8)
def hf_processor(path, family):
    """transformers' own processor class for the family (not mlx-vlm's, which AutoProcessor returns once
    mlx-vlm is imported), from the checkpoint's files; PIL image processors (no torch here)."""
    import transformers
    from transformers import AutoTokenizer

    path = Path(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    proc_cfg = json.loads((path / "processor_config.json").read_text())
    if family == "gemma3":
        from transformers.models.gemma3.processing_gemma3 import Gemma3Processor

        ip = transformers.Gemma3ImageProcessorPil.from_pretrained(str(path))
        return Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template,
                               image_seq_length=proc_cfg["image_seq_length"])
    if family in ("pixtral", "mistral3"):
        ip = transformers.PixtralImageProcessorPil.from_pretrained(str(path))
        return _pixtral_processor_class()(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template,
                                          patch_size=proc_cfg["patch_size"],
                                          spatial_merge_size=proc_cfg["spatial_merge_size"])
    ip = transformers.Qwen2VLImageProcessorPil.from_pretrained(str(path))
    if family == "qwen2_vl":
        from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor as cls
    else:
        from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor as cls

    class NoVideo(cls):  # its video processor needs torch; no video here
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" and arg is None else super().check_argument_for_proper_class(
                name, arg)

    return NoVideo(image_processor=ip, tokenizer=tok, video_processor=None, chat_template=tok.chat_template)


def hf_inputs(path, family, image_paths, question=QUESTION):
    """transformers' processor output for a one-turn chat with these images: apply_chat_template with
    tokenize=True (the rendered template is tokenized without adding special tokens again)."""
    from PIL import Image

    proc = hf_processor(str(path), family)
    content = ([{"type": "image", "image": Image.open(p).convert("RGB")} for p in image_paths]
               + [{"type": "text", "text": question}])
    return proc.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                    add_generation_prompt=True, return_dict=True, return_tensors="np")


def corrected_reference(path, family, image_paths, question=QUESTION, max_tokens=MAX):
    """(prompt ids, greedy tokens): transformers' processor ids and pixels, then mlx-vlm's own
    stream_generate given those tensors (its get_input_embeddings and language model); cut at EOS."""
    import mlx.core as mx
    from mlx_vlm.generate import stream_generate

    inp = hf_inputs(path, family, image_paths, question)
    ids = inp["input_ids"][0].tolist()
    model, proc = _vlm(str(path))
    extra = {k: mx.array(inp[k]) for k in ("image_sizes", "image_grid_thw") if k in inp}
    out = [r.token for r in stream_generate(
        model, proc, "", input_ids=mx.array([ids]), pixel_values=mx.array(inp["pixel_values"]),
        mask=mx.array(inp["attention_mask"]), max_tokens=max_tokens, temperature=0.0, **extra)]
    eos = model.config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    out = out[:max_tokens]
    cut = next((i for i, t in enumerate(out) if t in eos), len(out))
    return ids, out[:cut]


def mlx_vlm_prompt_ids(path, image_paths, question=QUESTION):
    """The prompt ids mlx-vlm's own stream_generate feeds its model (captured at get_input_embeddings)."""
    from mlx_vlm.generate import stream_generate

    model, proc = _vlm(str(path))
    content = [{"type": "image"} for _ in image_paths] + [{"type": "text", "text": question}]
    prompt = proc.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                add_generation_prompt=True)
    seen = []
    cls = type(model)
    original = cls.get_input_embeddings

    def spy(self, input_ids=None, *a, **k):
        seen.append(input_ids.reshape(-1).tolist())
        return original(self, input_ids, *a, **k)

    cls.get_input_embeddings = spy
    try:
        for _ in stream_generate(model, proc, prompt, image=list(image_paths) or None, max_tokens=1,
                                 temperature=0.0):
            pass
    finally:
        cls.get_input_embeddings = original
    return seen[0]


@pytest.mark.parametrize("family", BOS_FAMILIES)
def test_mlx_vlm_generate_doubles_bos(root, pics, family):
    """Upstream pinned: mlx-vlm 0.7.10's generate tokenizes the rendered template with
    add_special_tokens=True (gemma3: because its processor never has a chat template of its own), so a
    template that writes BOS gets a second one; this test fails once mlx-vlm stops doing that."""
    path = fixture(family, root)
    bos = json.loads((path / "config.json").read_text())["bos_token_id"]
    ids = hf_inputs(path, family, [pics["wide"]])["input_ids"][0].tolist()
    assert ids[0] == bos and ids[1] != bos  # the corrected reference: one BOS, the template's
    theirs = mlx_vlm_prompt_ids(path, [pics["wide"]])
    assert theirs == [bos] + ids


@pytest.mark.parametrize("family", FAMILIES)
def test_worker_equals_corrected_reference(worker, root, pics, family):
    """Through the worker process: greedy tokens and prompt length equal the corrected reference, for one
    image and for two of different shapes; a text-only turn equals mlx-lm on the template's ids."""
    path = fixture(family, root)
    info = worker.load(path)
    assert info["vision"] is True
    for names in IMAGE_SETS:
        paths = [pics[n] for n in names]
        ids, ref = corrected_reference(path, family, paths)
        assert_varied(ref, 3, what=f"{family} {names} reference")
        evs = chat(worker, f"{family}-{'-'.join(names)}", [user(paths)])
        assert generated_tokens(evs) == ref, names
        assert stats(evs)["prompt_tokens"] == len(ids), names
    text_msgs = [{"role": "user", "content": QUESTION}]
    ids = reference.chat_ids(path, text_msgs)
    ref = reference.generate(path, ids, MAX)
    assert_varied(ref, 3, what=f"{family} text reference")
    evs = chat(worker, f"{family}-text", text_msgs)
    assert generated_tokens(evs) == ref and stats(evs)["prompt_tokens"] == len(ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_ids_equal_transformers(root, pics, family):
    """In-process: the worker's prompt ids (each image processed alone) are transformers' processor's
    ids for the whole prompt, token for token."""
    import msgspec

    from worker.loading.model import load
    from worker.prompting.prompt import build_prompt
    from worker.protocol import Generate, LoadOptions

    path = fixture(family, root)
    kit = load(str(path), LoadOptions(), lambda f: None)
    for names in IMAGE_SETS:
        paths = [pics[n] for n in names]
        req = msgspec.convert({"type": "generate", "id": "g", "prompt": {"messages": [user(paths)]}}, Generate)
        assert build_prompt(kit, req).ids == hf_inputs(path, family, paths)["input_ids"][0].tolist(), names


def test_images_alike_in_their_first_bytes(worker, root):
    """Two PNGs stored uncompressed that differ only in their last rows (their files share the first
    ~147 KB): each is its own image to the memo and the prompt cache."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(12)
    top = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    paths = []
    for name in ("same-top-1", "same-top-2"):
        px = top.copy()
        px[192:] = rng.integers(0, 255, (64, 256, 3), dtype=np.uint8)
        paths.append(str(root / f"{name}.png"))
        Image.fromarray(px).save(paths[-1], compress_level=0)
    one, two = (open(p, "rb").read() for p in paths)
    shared = next(i for i, (x, y) in enumerate(zip(one, two)) if x != y)
    assert shared > 140_000, shared
    path = fixture("pixtral", root)
    worker.load(path)
    refs = [corrected_reference(path, "pixtral", [p])[1] for p in paths]
    assert refs[0] != refs[1]
    for i, p in enumerate(paths):
        assert_varied(refs[i], 3, what=f"image {i + 1} reference")
        assert generated_tokens(chat(worker, f"same-top-{i}", [user([p])])) == refs[i], i


def test_an_image_rewritten_in_place_with_its_old_mtime(worker, root, pics):
    """A file rewritten in place (same inode) with another image of another byte size, its old mtime put
    back: the worker hashes it again (it skips rereading only a file whose inode, size and mtime match)."""
    path = fixture("pixtral", root)
    worker.load(path)
    target = root / "rewritten.png"
    old = 1_000_000_000
    answers = []
    for name in ("wide", "tall"):
        target.write_bytes(open(pics[name], "rb").read())
        os.utime(target, ns=(old, old))
        ref = corrected_reference(path, "pixtral", [pics[name]])[1]
        assert_varied(ref, 3, what=f"{name} reference")
        answers.append(generated_tokens(chat(worker, f"rewritten-{name}", [user([str(target)])])))
        assert answers[-1] == ref, name
    assert answers[0] != answers[1]
    assert os.path.getsize(pics["wide"]) != os.path.getsize(pics["tall"])

"""The tiny offline fixtures load in mlx-lm, tokenize consistently and generate varied text."""

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.support.fixtures import (  # noqa: E402
    FAMILIES,
    TOKENIZER_SPECS,
    build_draft_fixture,
    build_fixture,
    fixture_dir,
)

FILES = ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
         "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fixtures")


@pytest.fixture(scope="module")
def loaded(root):
    import mlx_lm

    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = mlx_lm.load(str(fixture_dir(family, root)))
        return cache[family]

    return get


def _n_params(model):
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))


def _greedy(model, ids, n=30):
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    steps = generate_step(mx.array(ids), model, max_tokens=n, sampler=make_sampler(0.0))
    return [int(tok) for tok, _ in steps]


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_with_expected_size(family, root, loaded):
    model, tokenizer = loaded(family)
    assert 500_000 <= _n_params(model) <= 2_000_000
    assert all((fixture_dir(family, root) / f).is_file() for f in FILES)
    assert len(tokenizer.vocab) == model.args.vocab_size
    assert tokenizer.eos_token_ids  # turn-end tokens from config.json


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template(family, loaded):
    _, tokenizer = loaded(family)
    spec = TOKENIZER_SPECS[family]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    for piece in ["Be brief.", "Hi there.", "Hello.", "What is this?"]:
        assert piece in text
    assert text.count("\n") >= 4, "whitespace control ate the newlines"
    ending = {"llama": "<|start_header_id|>assistant<|end_header_id|>\n\n",
              "qwen2": "<|im_start|>assistant\n", "gemma3_text": "<start_of_turn>model\n"}
    assert text.endswith(ending[family])
    if spec["bos"]:
        assert text.startswith(spec["bos"]) and text.count(spec["bos"]) == 1
    without = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert text.startswith(without) and not without.endswith(ending[family])
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("family", FAMILIES)
def test_autotokenizer_matches_mlx_wrapper(family, root, loaded):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = fixture_dir(family, root)
    _, wrapper = loaded(family)
    hf = AutoTokenizer.from_pretrained(str(path))
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    text = "Hello world! The capital of France is Paris, 12345.\n\n  Café 😀 naïve"
    ids = hf.encode(text)
    assert ids == wrapper.encode(text) == raw.encode(text).ids
    assert hf.decode(ids, skip_special_tokens=True) == text
    detok = wrapper.detokenizer
    detok.reset()
    for t in ids:
        detok.add_token(t)
    detok.finalize()
    assert detok.text == hf.decode(ids)
    assert type(detok).__name__ == "BPEStreamingDetokenizer"


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_output_not_degenerate(family, loaded):
    model, tokenizer = loaded(family)
    specials = {tokenizer.convert_tokens_to_ids(t) for t in TOKENIZER_SPECS[family]["specials"]}
    for prompt in ["What is the capital of France?", "Tell me a story.", "1 2 3"]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True)
        out = _greedy(model, ids)
        assert len(set(out)) >= 10, out
        assert not specials & set(out), "special tokens are suppressed in fixtures"


def test_rebuild_is_byte_identical(tmp_path):
    for family in FAMILIES:
        a = build_fixture(family, tmp_path / f"{family}-a", seed=3)
        b = build_fixture(family, tmp_path / f"{family}-b", seed=3)
        c = build_fixture(family, tmp_path / f"{family}-c", seed=4)
        match, mismatch, errors = filecmp.cmpfiles(a, b, FILES, shallow=False)
        assert match == FILES, (family, mismatch, errors)
        assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
        assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_draft_fixture_shares_tokenizer(root, loaded, tmp_path):
    import mlx_lm

    draft_dir = build_draft_fixture(tmp_path / "draft", seed=0)
    main_dir = fixture_dir("llama", root)
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        assert (draft_dir / name).read_bytes() == (main_dir / name).read_bytes()
    draft, _ = mlx_lm.load(str(draft_dir))
    model, _ = loaded("llama")
    assert _n_params(draft) < _n_params(model) / 4
    assert draft.args.vocab_size == model.args.vocab_size


def test_fixture_dir_builds_once(tmp_path):
    first = fixture_dir("qwen2", tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert fixture_dir("qwen2", tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp dirs left


def test_cli(tmp_path):
    target = tmp_path / "cli-llama"
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.fixtures", "llama", str(target), "--seed", "1"],
        cwd=repo, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(target)
    assert (target / "model.safetensors").is_file()

"""worker.prompting.prefix_tokens: a prompt that extends a remembered one is tokenized from the last added token in
the shared prefix, and always equals the tokenizer's own whole tokenization."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.fixtures import FAMILIES, fixture_dir
from tests.support.vlm_fixtures import build_vlm_fixture
from worker.prompting.prefix_tokens import PrefixTokenizer, common_prefix, probe_texts

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40) | st.sampled_from(
    ["", " ", "\n", "\n\n", "  x", "<|im_start|>", "<|im_end|>", "<start_of_turn>", "[INST]", "<image>",
     "naïve café 日本 🙂", "\t\tcode()\n", "<|endoftext|>user"])


def _load(path):
    from mlx_lm.tokenizer_utils import load

    return load(path)


@pytest.fixture(scope="module")
def tokenizers(fixtures_root, tmp_path_factory):
    out = {fam: _load(fixture_dir(fam, fixtures_root)) for fam in FAMILIES}
    root = tmp_path_factory.mktemp("vlm-tok")
    for fam in ("gemma3", "qwen2_vl", "mistral3"):
        out[fam] = _load(build_vlm_fixture(fam, root / fam))
    return out


def test_common_prefix():
    assert common_prefix("", "") == 0
    assert common_prefix("abc", "abc") == 3
    assert common_prefix("abcdef", "abcxef") == 3
    assert common_prefix("abc", "abcdef") == 3
    assert common_prefix("xbc", "abc") == 0
    for n in range(0, 70):
        a = "q" * n + "A" + "z" * 9
        assert common_prefix(a, "q" * n + "B" + "z" * 9) == n
        assert common_prefix(list(a), list("q" * n + "B")) == n
    assert common_prefix([1, 2, 3], [1, 2]) == 2 and common_prefix([], [1]) == 0


@pytest.mark.parametrize("name", list(FAMILIES) + ["gemma3", "qwen2_vl", "mistral3"])
def test_enabled_and_exact_on_growing_conversations(tokenizers, name):
    tok = tokenizers[name]
    pt = PrefixTokenizer(tok._tokenizer, probe_texts(tok))
    assert pt.enabled, name
    msgs, reused = [], 0
    for turn in range(6):
        msgs.append({"role": "user", "content": f"Question {turn}: what about  spaces\n and naïve? " * (turn + 1)})
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        for special in (False, True):
            assert pt.encode(text, special) == list(tok._tokenizer.encode(text, add_special_tokens=special))
        reused += pt.reused_chars
        msgs.append({"role": "assistant", "content": f" Answer {turn}.\n"})
    assert reused > 0  # follow-ups really reused the remembered ids


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=4), edit=TEXT, family=st.sampled_from(
    list(FAMILIES) + ["gemma3", "qwen2_vl", "mistral3"]))
def test_any_conversation_and_edit_equals_whole_tokenization(tokenizers, turns, edit, family):
    tok = tokenizers[family]
    pt = PrefixTokenizer(tok._tokenizer, probe_texts(tok))
    msgs = []
    texts = []
    for user, answer in turns:
        msgs.append({"role": "user", "content": user})
        texts.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        msgs.append({"role": "assistant", "content": answer})
    msgs[-1] = {"role": "user", "content": edit}  # the last answer replaced by an edited user turn
    try:
        texts.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    except Exception:  # noqa: BLE001 (templates that insist on alternating roles)
        pass
    texts += [t[: len(t) * 2 // 3] for t in texts] + [t + edit for t in texts]
    for text in texts:
        assert pt.encode(text, False) == list(tok._tokenizer.encode(text, add_special_tokens=False)), text


def test_a_tokenizer_that_is_not_prefix_stable_is_tokenized_whole(tokenizers):
    hf = tokenizers["llama"]._tokenizer

    class Odd:
        """Adds a token that depends on the whole text: no prefix can be reused."""

        backend_tokenizer = hf.backend_tokenizer

        def encode(self, text, add_special_tokens=True):
            return list(hf.encode(text, add_special_tokens=add_special_tokens)) + [len(text) % 7]

    pt = PrefixTokenizer(Odd(), probe_texts(tokenizers["llama"]))
    assert not pt.enabled
    text = probe_texts(tokenizers["llama"])[-1]
    assert pt.encode(text, False) == Odd().encode(text, False)


@pytest.mark.real_model
def test_smollm2_tokenizer():
    from model_prep.smollm2 import ensure_default_model

    tok = _load(ensure_default_model())
    pt = PrefixTokenizer(tok._tokenizer, probe_texts(tok))
    assert pt.enabled
    msgs = [{"role": "system", "content": "You are terse."}]
    for turn in range(4):
        msgs.append({"role": "user", "content": f"Tell me about {turn} things, café 🙂"})
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert pt.encode(text, False) == list(tok._tokenizer.encode(text, add_special_tokens=False))
        msgs.append({"role": "assistant", "content": f"There are {turn}.  "})
    assert pt.reused_chars > 0


def test_a_tokenizer_that_appends_eos_is_caught_by_the_self_check(tokenizers):
    """Ids a post-processor appends after the text (an EOS) would be missing from a reused prefix +
    suffix: the self-check sees it and the tokenizer is used whole."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    base = tokenizers["llama"]._tokenizer.backend_tokenizer
    tok = Tokenizer.from_str(base.to_str())
    eos = "<|end_of_text|>"
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}",
                                                       special_tokens=[(eos, tok.token_to_id(eos))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos)
    assert hf.encode("hi", add_special_tokens=True)[-1] == tok.token_to_id(eos)
    pt = PrefixTokenizer(hf, probe_texts(hf))
    assert not pt.enabled
    text = probe_texts(hf)[-1]
    assert pt.encode(text, True) == hf.encode(text, add_special_tokens=True)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_continued_output_reuses_the_models_own_ids(tokenizers, name):
    """A text that continues a prompt and then what the model generated after it gets the prompt's ids and the
    generated ids for that text, even where tokenizing the same text gives other ids; only the rest is tokenized.
    A text that continues only part of the output reuses the ids of that part."""
    tok = tokenizers[name]
    hf = tok._tokenizer
    pt = PrefixTokenizer(hf, probe_texts(tok))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say it."}], tokenize=False,
                                     add_generation_prompt=True)
    p_ids = pt.encode(prompt, False)
    word = next(w for w in ("hello", "world", "the", "and", "question", "answer")
                if len(hf.encode(" " + w, add_special_tokens=False)) == 1)
    # the model spells " word" one character at a time (a tokenization the tokenizer itself never gives)
    gen = [hf.encode(c, add_special_tokens=False) for c in " " + word]
    assert all(len(g) == 1 for g in gen), gen
    gen = [g[0] for g in gen]
    pt.remember_output(prompt, False, p_ids, gen)
    tail = "\nNext question: what?"
    text = prompt + " " + word + tail
    fresh = list(hf.encode(text, add_special_tokens=False))
    got = pt.encode(text, False)
    assert got == p_ids + gen + list(hf.encode(tail, add_special_tokens=False))
    assert got != fresh  # the memo really gave the model's ids
    assert tok.decode(got, skip_special_tokens=False) == tok.decode(fresh, skip_special_tokens=False)
    # the template re-rendered only the first three characters: their ids, then the rest tokenized
    part = prompt + " " + word[:2] + "!" + tail
    assert pt.encode(part, False) == p_ids + gen[:3] + list(hf.encode("!" + tail, add_special_tokens=False))
    # a text that does not continue the output at all: a whole tokenization
    other = prompt + "Something else."
    assert pt.encode(other, False) == list(hf.encode(other, add_special_tokens=False))


def test_an_output_resent_without_its_dropped_leading_space_is_continued(tokenizers):
    """The worker streams an answer without its first leading space (mlx-lm's detokenizer drops it), so a host
    re-sends it that way: with the worker's detokenizer the output still counts as continued."""
    from mlx_lm.tokenizer_utils import load

    from worker.prompting.prefix_tokens import detokenizer

    tok = tokenizers["llama"]
    hf = tok._tokenizer
    pt = PrefixTokenizer(hf, probe_texts(tok))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say it."}], tokenize=False,
                                     add_generation_prompt=True)
    p_ids = pt.encode(prompt, False)
    gen = list(hf.encode(" hello there", add_special_tokens=False))
    stream = detokenizer(tok)
    assert stream(gen) == "hello there"  # the leading space is gone from what the host got
    pt.remember_output(prompt, False, p_ids, gen, detokenize=stream)
    tail = "\nNext?"
    assert pt.encode(prompt + "hello there" + tail, False) == p_ids + gen + list(hf.encode(tail, add_special_tokens=False))

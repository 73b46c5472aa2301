"""Random-weight models shaped like real ones, built once into a models folder (speed does not depend on
weight values): text models for mlx-lm (``SHAPES``, ``build``; a word-level tokenizer covering the whole
vocabulary, with a byte-level decoder) and Gemma-3-shaped VLMs for mlx-vlm (``VLM_SHAPES``, ``build_vlm``;
the fixture tokenizer's 512-id vocabulary)."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

SHAPES = {
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         max_position_embeddings=131072),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, intermediate_size=18944,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       max_position_embeddings=32768),
}
SHAPES["gemma3-1b"] = dict(model_type="gemma3_text", hidden_size=1152, num_hidden_layers=26,  # sliding window
                           intermediate_size=6912, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                           vocab_size=262144, sliding_window=512, sliding_window_pattern=6,
                           max_position_embeddings=32768)
SHAPES["smoke"] = dict(SHAPES["llama-3.2-1b"], hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=4096)
# drafts for speculative decoding (speculation.py): the same vocabulary (so the same tokenizer), fewer, narrower layers
SHAPES["llama-3.2-1b-draft"] = dict(SHAPES["llama-3.2-1b"], hidden_size=1024, num_hidden_layers=4,
                                    intermediate_size=4096, num_attention_heads=16, num_key_value_heads=4)
SHAPES["smoke-draft"] = dict(SHAPES["smoke"], hidden_size=64, num_hidden_layers=1, intermediate_size=128,
                             num_attention_heads=2, num_key_value_heads=1)


def build(root: Path, shape: str, bits) -> Path:
    import importlib

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    cfg = dict(SHAPES[shape])
    path = root / f"{shape}-{'q%d' % bits if bits else 'bf16'}"
    if (path / "model.safetensors").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    arch = importlib.import_module(f"mlx_lm.models.{cfg['model_type']}")
    mx.random.seed(0)
    model = arch.Model(arch.ModelArgs.from_dict(cfg))
    model.set_dtype(mx.bfloat16)
    if bits:
        nn.quantize(model, group_size=64, bits=bits)
        cfg["quantization"] = {"group_size": 64, "bits": bits}
    mx.eval(model.parameters())
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    vocab = cfg["vocab_size"]
    cfg["eos_token_id"] = vocab - 1
    (path / "config.json").write_text(json.dumps(cfg))
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # a byte-level decoder, as real Llama / Qwen tokenizers have: mlx-lm then streams text with its BPE
    # detokenizer (tens of microseconds a token), not the naive one that re-decodes the text each token
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": f"t{vocab - 1}", "unk_token": "t0"}))
    del model
    mx.clear_cache()
    return path


def prompt_tokens(n, seed, vocab):
    return [(seed * 7919 + i * 104729) % (vocab - 2) + 1 for i in range(n)]


GEMMA3_4B = {
    "config": {"hidden_size": 2560, "mm_tokens_per_image": 256},
    "text": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
                 sliding_window_pattern=6, mm_tokens_per_image=256),
    "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   patch_size=14, image_size=896),
    "processor": {"image_seq_length": 256},
    "preprocessor": {"size": {"height": 896, "width": 896}},
}
SMOKE = {
    "config": {"hidden_size": 64, "mm_tokens_per_image": 16},
    "text": dict(mm_tokens_per_image=16),
    "vision": dict(patch_size=8, image_size=64),
    "processor": {"image_seq_length": 16},
    "preprocessor": {"size": {"height": 64, "width": 64}},
}
GEMMA3_12B = {
    "config": {"hidden_size": 3840, "mm_tokens_per_image": 256},
    "text": dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
                 sliding_window_pattern=6, mm_tokens_per_image=256, max_position_embeddings=32768),
    "vision": GEMMA3_4B["vision"], "processor": GEMMA3_4B["processor"], "preprocessor": GEMMA3_4B["preprocessor"],
}
VLM_SHAPES = {"4b": GEMMA3_4B, "12b": GEMMA3_12B, "smoke": SMOKE}


def build_vlm(root: Path, shape: str) -> Path:
    from tests.support.vlm_fixtures import build_vlm_fixture

    spec = VLM_SHAPES[shape]
    path = root / f"gemma3-{shape}-shaped"
    if not (path / "model.safetensors").exists():
        text = dict(spec["text"])
        text.setdefault("max_position_embeddings", 32768)
        build_vlm_fixture("gemma3", path, 0, text_overrides=text,
                          overrides={k: spec[k] for k in ("config", "vision", "processor", "preprocessor")},
                          dtype="float32" if shape == "smoke" else "bfloat16")
    return path

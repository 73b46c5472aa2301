"""A tiny offline Gemma 3n checkpoint (text + vision + audio towers, ~400k params) and WAV clips for its tests.

Weights come from mlx-vlm's own classes (seeded). mlx-vlm hard-codes Gemma 3n's MobileNetV5-300M
block list (``vision.gemma3n_mobilenet_def``) and its fusion adapter's widths (640 + 1280 channels
in, 2048 out: 15M parameters); ``patch_mobilenet()`` swaps in a four-block list with narrow stages
and builds the adapter (mlx-vlm's class) for their widths, out to the vision ``hidden_size``, so the
stem, the blocks' classes, the fusion adapter and the embedders stay mlx-vlm's own. Every process
that builds the tower must be patched: the test's mlx-vlm reference and the worker (``python -m
tests.support.vlm_fixtures_gemma3n worker`` runs the worker patched).

Token layout as in the real model: text ids below ``vocab_size_per_layer_input`` (512), then the
vision vocabulary (end_of_image, image_soft_token, ...) and the audio one (end_of_audio,
audio_soft_token, ...), 8 ids each.

CLI: python -m tests.support.vlm_fixtures_gemma3n build PATH [--seed N] | worker [worker args]
"""

from __future__ import annotations

import io
import json
import os
import sys
import wave
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from . import fixtures as F  # noqa: E402

TEXT_VOCAB = F.VOCAB_SIZE  # 512 = vocab_size_per_layer_input
VISION_VOCAB = AUDIO_VOCAB = 8
VOCAB = TEXT_VOCAB + VISION_VOCAB + AUDIO_VOCAB
HIDDEN = 64
STAGES = (16, 16, 32, 64)  # the tiny MobileNet's stage outputs; the last two feed the fusion adapter
VISION_HIDDEN = 64  # the fusion adapter's output channels (mlx-vlm: 2048)
IMAGE_SIDE = 64
SAMPLE_RATE = 16000
TEXT_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                 "<start_of_image>", "<start_of_audio>"]
VISION_TOKENS = ["<end_of_image>", "<image_soft_token>"] + [f"<unused_v{i}>" for i in range(6)]
AUDIO_TOKENS = ["<end_of_audio>", "<audio_soft_token>"] + [f"<unused_a{i}>" for i in range(6)]

_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'image' -%}{{- '<image_soft_token>' -}}"
    "{%- elif part['type'] == 'audio' -%}{{- '<audio_soft_token>' -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + render(message['content']) + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)


def tiny_mobilenet_def():
    """Stage outputs ``STAGES`` channels; an EdgeResidual first (mlx-vlm's sanitize looks at block
    0.0), attention in stage 4."""
    from mlx_vlm.models.gemma3n import vision as V

    s1, s2, s3, s4 = STAGES
    return [
        [V._er(3, s1, 2, 1.0)],
        [V._uir(3, 0, s2, 1, 1.0)],
        [V._uir(3, 0, s3, 1, 1.0)],
        [V._uir(3, 0, s4, 2, 0.5), V._mmqa(2, 8, 1), V._uir(0, 0, s4, 1, 0.5)],
    ]


_FUSION = {}


def tiny_fusion(in_chs, out_chs, **kwargs):
    """mlx-vlm's fusion adapter over the tiny stages (its tower asks for [1920] -> 2048)."""
    return _FUSION["cls"](in_chs=[sum(STAGES[2:])], out_chs=VISION_HIDDEN, **kwargs)


def patch_mobilenet() -> None:
    from mlx_vlm.models.gemma3n import vision as V

    V.gemma3n_mobilenet_def = tiny_mobilenet_def
    _FUSION.setdefault("cls", V.MobileNetV5MultiScaleFusionAdapter)
    V.MobileNetV5MultiScaleFusionAdapter = tiny_fusion  # looked up when VisionTower is built


_UNSCALED = {}


def patch_mlx_vlm() -> None:
    """The test's mlx-vlm reference: the tiny tower, and text positions of ``get_input_embeddings``
    scaled by sqrt(hidden_size) as mlx-lm and Transformers do (mlx-vlm 0.7.10 leaves them unscaled:
    test_vision_gemma3n.py checks that this is still so)."""
    import mlx.core as mx
    from mlx_vlm.models.gemma3n import gemma3n as G

    patch_mobilenet()
    if "fn" in _UNSCALED:
        return
    orig = _UNSCALED["fn"] = G.Model.get_input_embeddings

    def scaled(self, input_ids=None, pixel_values=None, **kw):
        out = orig(self, input_ids, pixel_values, **kw)
        text = input_ids < self.embed_vision.vocab_offset
        if pixel_values is None and kw.get("input_features") is None:  # its text-only early return
            text = mx.ones_like(text)
        emb = mx.where(text[..., None], out.inputs_embeds * (self.language_model.model.hidden_size ** 0.5),
                       out.inputs_embeds)
        return type(out)(inputs_embeds=emb, per_layer_inputs=out.per_layer_inputs)

    G.Model.get_input_embeddings = scaled


def vlm_generate(path, messages, images=(), audio=(), max_tokens=8):
    """mlx-vlm's stream_generate (patched as above) on a chat whose parts are {"type": "image"} /
    {"type": "audio"} / text; cut at EOS (it yields it)."""
    from mlx_vlm import load
    from mlx_vlm.generate import stream_generate

    patch_mlx_vlm()
    model, proc = _LOADED.get(str(path)) or _LOADED.setdefault(str(path), load(str(path)))
    prompt = proc.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = [r.token for r in stream_generate(model, proc, prompt, image=list(images) or None,
                                            audio=list(audio) or None, max_tokens=max_tokens, temperature=0.0)]
    out = out[:max_tokens]
    eos = set(model.config.eos_token_id)
    return next((out[:i] for i, t in enumerate(out) if t in eos), out)


_LOADED = {}


def _loaded(path):
    from mlx_vlm import load

    patch_mlx_vlm()
    return _LOADED.get(str(path)) or _LOADED.setdefault(str(path), load(str(path)))


def vlm_merge(path, messages, audio):
    """(prompt ids, mlx-vlm's ``get_input_embeddings`` output) for a chat with these clips: its processor
    over the whole prompt (clips padded to the longest, as its generate does), then its merge."""
    import mlx.core as mx
    from mlx_vlm.utils import load_audio, prepare_inputs

    model, proc = _loaded(path)
    prompt = proc.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    rate = proc.feature_extractor.sampling_rate
    inp = prepare_inputs(proc, audio=[load_audio(c, sr=rate) for c in audio], prompts=prompt,
                         add_special_tokens=False)
    out = model.get_input_embeddings(inp["input_ids"], None, input_features=inp["input_features"],
                                     input_features_mask=inp["input_features_mask"])
    mx.eval(out.inputs_embeds)
    return inp["input_ids"].reshape(-1).tolist(), out


def audio_runs(path, ids):
    """The audio-token positions of ``ids``, one list per clip (each clip's tokens are consecutive)."""
    token = _loaded(path)[0].config.audio_token_id
    runs = []
    for i, t in enumerate(ids):
        if t == token:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
    return runs


def clip_alone(path, clip):
    """A clip's soft tokens as mlx-vlm makes them for a prompt with that clip alone: [count, hidden]."""
    msgs = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "?"}]}]
    ids, out = vlm_merge(path, msgs, [clip])
    (run,) = audio_runs(path, ids)
    return out.inputs_embeds[0, run[0]:run[-1] + 1]


def vlm_generate_clips_alone(path, messages, audio, max_tokens=8):
    """The corrected reference for several clips: mlx-vlm's generate (patched as ``vlm_generate``) on its
    own prompt ids and merge, except that each clip's audio tokens hold that clip's own soft tokens
    (``clip_alone``), not what mlx-vlm's merge of the padded batch puts there; cut at EOS."""
    import mlx.core as mx
    from mlx_vlm.generate import generate_step

    model, _ = _loaded(path)
    ids, merged = vlm_merge(path, messages, audio)
    runs = audio_runs(path, ids)
    assert len(runs) == len(audio), (len(runs), len(audio))
    emb = merged.inputs_embeds
    for run, clip in zip(runs, audio):
        own = clip_alone(path, clip)
        assert own.shape[0] == len(run), (own.shape, len(run))
        emb[0, run[0]:run[-1] + 1] = own
    fixed = type(merged)(inputs_embeds=emb, per_layer_inputs=merged.per_layer_inputs)
    cls = type(model)
    original = cls.get_input_embeddings
    cls.get_input_embeddings = lambda self, *a, **k: fixed
    try:
        out = []
        for token, _ in generate_step(mx.array([ids]), model, None, None, max_tokens=max_tokens, temperature=0.0):
            out.append(int(token))
    finally:
        cls.get_input_embeddings = original
    eos = set(model.config.eos_token_id)
    return next((out[:i] for i, t in enumerate(out) if t in eos), out)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = F._pre_tokenizer("gemma3_text")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TEXT_VOCAB, min_frequency=2, show_progress=False,
                                  special_tokens=TEXT_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(F._corpus(), trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if tok.get_vocab_size() != TEXT_VOCAB:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} entries, want {TEXT_VOCAB}")
    tok.add_special_tokens(VISION_TOKENS + AUDIO_TOKENS)
    return tok


def _write_tokenizer(path: Path):
    tok = _tokenizer()
    (path / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    specials = TEXT_SPECIALS + VISION_TOKENS + AUDIO_TOKENS
    ids = {t: tok.token_to_id(t) for t in specials}
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for t, i in ids.items()}
    smap = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    extra = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
             "eoi_token": "<end_of_image>", "audio_token": "<audio_soft_token>",
             "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>"}
    F._write_json(path / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added, **smap,
        "extra_special_tokens": extra, "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": F.MAX_POSITIONS,
        "chat_template": _TEMPLATE})
    F._write_json(path / "special_tokens_map.json", smap)
    suppressed = set(ids.values())
    printable = set(range(0x20, 0x7F)) | {0x0A}
    for b, ch in F._byte_chars().items():
        if b not in printable:
            suppressed.add(tok.token_to_id(ch))
    return ids, sorted(suppressed)


def _config(ids: dict, kv_shared: int) -> tuple[dict, dict, dict]:
    text = dict(model_type="gemma3n_text", hidden_size=HIDDEN, intermediate_size=[128] * 4, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
                vocab_size=VOCAB, vocab_size_per_layer_input=TEXT_VOCAB, num_kv_shared_layers=kv_shared,
                sliding_window=1024, max_position_embeddings=F.MAX_POSITIONS, rope_local_base_freq=10000.0,
                rope_theta=1000000.0, final_logit_softcapping=30.0,
                layer_types=["sliding_attention", "full_attention"] * 2,
                activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0], hidden_size_per_layer_input=8,
                altup_num_inputs=4, altup_coef_clip=120.0, altup_correct_scale=True, altup_active_idx=0,
                laurel_rank=8, query_pre_attn_scalar=32, pad_token_id=ids["<pad>"])
    vision = dict(model_type="gemma3n_vision", hidden_size=VISION_HIDDEN, vocab_size=VISION_VOCAB,
                  vocab_offset=TEXT_VOCAB, rms_norm_eps=1e-6, image_size=IMAGE_SIDE)
    audio = dict(model_type="gemma3n_audio", input_feat_size=128, hidden_size=32, conf_attention_chunk_size=12,
                 conf_attention_context_left=13, conf_attention_context_right=0, conf_num_attention_heads=2,
                 conf_num_hidden_layers=1, conf_conv_kernel_size=5, conf_positional_bias_size=256,
                 conf_reduction_factor=4, conf_residual_weight=0.5, sscp_conv_channel_size=[8, 4],
                 sscp_conv_kernel_size=[[3, 3], [3, 3]], sscp_conv_stride_size=[[2, 2], [2, 2]],
                 vocab_size=AUDIO_VOCAB, vocab_offset=TEXT_VOCAB + VISION_VOCAB, rms_norm_eps=1e-6)
    cfg = dict(model_type="gemma3n", architectures=["Gemma3nForConditionalGeneration"], vocab_size=VOCAB,
               hidden_size=HIDDEN, text_config=text, vision_config=vision, audio_config=audio,
               image_token_id=ids["<image_soft_token>"], audio_token_id=ids["<audio_soft_token>"],
               boi_token_id=ids["<start_of_image>"], eoi_token_id=ids["<end_of_image>"],
               boa_token_id=ids["<start_of_audio>"], eoa_token_id=ids["<end_of_audio>"],
               vision_soft_tokens_per_image=256, audio_soft_tokens_per_image=188,
               pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"],
               eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]])
    proc = {"processor_class": "Gemma3nProcessor", "audio_seq_length": 188, "image_seq_length": 256}
    pre = {"processor_class": "Gemma3nProcessor", "feature_extractor_type": "Gemma3nAudioFeatureExtractor",
           "feature_size": 128, "sampling_rate": SAMPLE_RATE, "padding_value": 0.0,
           "return_attention_mask": True, "image_processor_type": "SiglipImageProcessor",
           "size": {"height": IMAGE_SIDE, "width": IMAGE_SIDE}, "do_resize": True, "resample": 2,
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True}
    return cfg, proc, pre


def _weights(cfg: dict, seed: int, suppressed: list[int]) -> dict:
    """mlx-vlm's Model, re-randomized (≥2-D params), saved under the Hugging Face names
    (``model.language_model.*`` ...) that both mlx-lm's and mlx-vlm's loaders accept."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.models import gemma3n as mod
    from mlx_vlm.utils import update_module_configs

    patch_mobilenet()
    c = json.loads(json.dumps(cfg))
    mc = update_module_configs(mod.ModelConfig.from_dict(c), mod, c, ["text", "vision", "audio"])
    mx.random.seed(seed)
    params = dict(tree_flatten(mod.Model(mc).parameters()))
    out = {}
    for i, name in enumerate(sorted(params)):
        w = params[name].astype(mx.float32)
        text = name.startswith("language_model.")
        if w.ndim >= 2 and "embed_tokens" not in name and "embedding." not in name:
            fan_in = int(w.size // w.shape[0])
            w = mx.random.normal(w.shape, key=mx.random.key(seed * 7919 + i)) * ((2.0 if text else 1.5)
                                                                               / fan_in ** 0.5)
        elif w.ndim >= 2 and "embed_tokens." in name:
            w = w * 0.3
        key = "model.language_model." + name[len("language_model.model."):] if text else "model." + name
        out[key] = w
    # tied: the output matrix too. Rows are shrunk, not zeroed: an all-zero input embedding makes
    # AltUp's magnitude ratio 0/0
    emb = "model.language_model.embed_tokens.weight"
    keep = mx.ones((VOCAB, 1), dtype=mx.float32)
    keep[mx.array(suppressed)] = 0.02
    out[emb] = out[emb] * keep
    return out


def build_gemma3n_fixture(path, seed: int = 0, kv_shared: int = 0) -> Path:
    import mlx.core as mx

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ids, suppressed = _write_tokenizer(path)
    cfg, proc, pre = _config(ids, kv_shared)
    F._write_json(path / "config.json", cfg)
    F._write_json(path / "processor_config.json", proc)
    F._write_json(path / "preprocessor_config.json", pre)
    F._write_json(path / "generation_config.json", {"eos_token_id": cfg["eos_token_id"], "do_sample": False})
    mx.save_safetensors(str(path / "model.safetensors"), _weights(cfg, seed, suppressed),
                        metadata={"format": "mlx"})
    return path


def gemma3n_fixture_dir(root, seed: int = 0, kv_shared: int = 0) -> Path:
    return F.build_once(Path(root) / f"vlm-gemma3n-seed{seed}-kv{kv_shared}",
                        lambda tmp: build_gemma3n_fixture(tmp, seed, kv_shared))


def wav_bytes(seconds: float, freq: float = 440.0, rate: int = SAMPLE_RATE, channels: int = 1,
              seed: int = 0) -> bytes:
    """A tone plus seeded noise as 16-bit PCM WAV (stdlib ``wave``)."""
    pcm = _pcm(seconds, freq, rate, channels, seed)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def _pcm(seconds, freq, rate, channels, seed):
    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    x = 0.4 * np.sin(2 * np.pi * freq * t) + 0.1 * np.random.default_rng(seed).standard_normal(t.shape)
    return np.repeat((np.clip(x, -1, 1) * 32767).astype("<i2")[:, None], channels, axis=1)


def _crc(data: bytes, poly: int, bits: int) -> int:
    crc, top, mask = 0, 1 << (bits - 1), (1 << bits) - 1
    for byte in data:
        crc ^= byte << (bits - 8)
        for _ in range(8):
            crc = ((crc << 1) ^ poly) & mask if crc & top else (crc << 1) & mask
    return crc


def flac_bytes(seconds: float, freq: float = 440.0, rate: int = SAMPLE_RATE, channels: int = 1,
               seed: int = 0, block: int = 4096) -> bytes:
    """The same samples as ``wav_bytes``, as a FLAC stream of VERBATIM subframes (no encoder needed)."""
    pcm = _pcm(seconds, freq, rate, channels, seed)
    n = len(pcm)
    info = (rate << 44) | ((channels - 1) << 41) | (15 << 36) | n
    streaminfo = (block.to_bytes(2, "big") * 2 + b"\0" * 6 + info.to_bytes(8, "big") + b"\0" * 16)
    out = [b"fLaC", b"\x80" + len(streaminfo).to_bytes(3, "big"), streaminfo]
    for i, start in enumerate(range(0, n, block)):
        chunk = pcm[start:start + block]
        head = (b"\xff\xf8\x70" + bytes([((channels - 1) << 4) | 0x08]) + chr(i).encode("utf-8")
                + (len(chunk) - 1).to_bytes(2, "big"))
        head += bytes([_crc(head, 0x07, 8)])
        body = b"".join(b"\x02" + chunk[:, c].astype(">i2").tobytes() for c in range(channels))
        frame = head + body
        out.append(frame + _crc(frame, 0x8005, 16).to_bytes(2, "big"))
    return b"".join(out)


def worker_cmd() -> list:
    return [sys.executable, "-m", "tests.support.vlm_fixtures_gemma3n", "worker"]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        from worker.boot import blas

        blas.maybe_reexec(argv, module="tests.support.vlm_fixtures_gemma3n")  # before mlx is imported
        patch_mobilenet()
        from worker.__main__ import main as worker_main

        worker_main(argv[1:])
        return
    import argparse

    p = argparse.ArgumentParser(description="Build a tiny offline Gemma 3n checkpoint.")
    p.add_argument("cmd", choices=["build"])
    p.add_argument("path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-shared", type=int, default=0)
    a = p.parse_args(argv)
    print(build_gemma3n_fixture(a.path, a.seed, a.kv_shared))


if __name__ == "__main__":
    main()

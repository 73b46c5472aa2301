"""Gemma 3n: MobileNetV5 vision tower and conformer audio tower, each with its embedder.

Gemma 3n's per-layer inputs come from the token ids: mlx-lm's text model computes them from the ids
it is given (image and audio ids lie past the per-layer vocabulary and read row 0, as in mlx-vlm),
so the add-on supplies only the input embeddings, built as mlx-vlm's ``get_input_embeddings`` builds
them (hard embeddings for the vision / audio vocabularies, the towers' soft tokens at the image /
audio tokens) except that text positions are scaled by sqrt(hidden_size), as mlx-lm's and
Transformers' Gemma 3n scale them (mlx-vlm leaves them unscaled: worker/patches/gemma3n_text_scale.py).
"""

import mlx.core as mx

from ..patches.gemma3n_text_scale import scale_text
from ..protocol import WorkerError
from .audio import AudioAddOn
from .base import VisionAddOn


class _Towers:
    """``tower_attr`` target: the weights go through each tower's own ``sanitize``."""

    def __init__(self, parts):
        self.parts = parts

    def sanitize(self, weights):
        for name in ("vision_tower", "audio_tower"):
            if hasattr(self.parts, name):
                weights = getattr(self.parts, name).sanitize(weights)
        return weights


class Gemma3nAddOn(AudioAddOn, VisionAddOn):
    family = "gemma3n"
    module = "gemma3n"
    processor_path = "gemma3n.processing_gemma3n:Gemma3nProcessor"
    placeholder = "<image_soft_token>"
    token_attr = "image_token_id"
    audio_placeholder = "<audio_soft_token>"
    weight_keys = ("vision_tower", "embed_vision", "audio_tower", "embed_audio")
    tower_attr = "towers"

    def _model_config(self, config):
        import json

        from mlx_vlm.utils import update_module_configs

        c = json.loads(json.dumps(config))
        self.accepts_audio = bool(c.get("audio_config"))
        for name in ("text_config", "vision_config", "audio_config"):
            c.setdefault(name, {})
        return update_module_configs(self.mod.ModelConfig.from_dict(c), self.mod, c, ["text", "vision", "audio"])

    def build_modules(self, parts):
        mc, embedder = self.mc, self.mod.gemma3n.Gemma3nMultimodalEmbedder
        parts.vision_tower = self.mod.VisionModel(mc.vision_config)
        parts.embed_vision = embedder(mc.vision_config, mc.text_config)
        if self.accepts_audio:
            parts.audio_tower = self.mod.AudioModel(mc.audio_config)
            parts.embed_audio = embedder(mc.audio_config, mc.text_config)
        object.__setattr__(parts, "towers", _Towers(parts))

    def split(self, inputs, n):
        pv = inputs["pixel_values"]
        return [(pv[i:i + 1], {}) for i in range(n)]

    def encode(self, pv, extras):
        parts = self.parts
        return self.mod.Model.get_image_features(pv, parts.vision_tower, self.mc, parts.embed_vision)

    def encode_audio(self, inputs, index):
        """mlx-vlm's audio soft tokens: padded frames and the tail up to ``audio_soft_tokens_per_image``
        hold the embedding of the last audio id."""
        parts, mc = self.parts, self.mc
        feats, padded = parts.audio_tower(inputs["input_features"], ~inputs["input_features_mask"])
        feats = parts.embed_audio(inputs_embeds=feats)
        pad = parts.embed_audio(input_ids=mx.array([[mc.text_config.vocab_size - 1]]))
        feats = mx.where(padded[..., None], pad, feats)
        extra = mc.audio_soft_tokens_per_image - feats.shape[1]
        if extra < 0:
            raise WorkerError("invalid_audio", f"audio {index + 1} is too long for this model "
                              f"({feats.shape[1]} audio tokens; it takes {mc.audio_soft_tokens_per_image})")
        return mx.concatenate([feats, mx.broadcast_to(pad, (1, extra, feats.shape[-1]))], axis=1)

    def merge(self, ids, image_feats, audio_feats):
        parts, mc = self.parts, self.mc
        ev, ea = parts.embed_vision, getattr(parts, "embed_audio", None)
        audio_offset = ea.vocab_offset if ea is not None else mc.text_config.vocab_size
        text = parts.language_model.model.embed_tokens(ids)
        h = scale_text(text, ids, ev.vocab_offset, mc.text_config.hidden_size)
        vision = mx.logical_and(ids >= ev.vocab_offset, ids < audio_offset)
        hard = ev(input_ids=mx.where(vision, ids, ev.vocab_offset + ev.vocab_size - 1))
        h = mx.where(vision[..., None], hard, h)
        if ea is not None:
            audio = ids >= ea.vocab_offset
            hard = ea(input_ids=mx.where(audio, ids, ea.vocab_offset + ea.vocab_size - 1))
            h = mx.where(audio[..., None], hard, h)
        for feats, token in ((image_feats, mc.image_token_id), (audio_feats, mc.audio_token_id)):
            if feats is not None:
                mask = mx.broadcast_to((ids == token)[..., None], h.shape)
                h = parts.merge_multimodal_and_text(h, feats, mask)
        return h

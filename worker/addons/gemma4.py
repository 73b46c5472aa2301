"""Gemma 4: a 2-D RoPE patch encoder + pooler (``vision_tower``) and ``embed_vision``, its projector.

Two things differ between mlx-vlm's Gemma 4 and mlx-lm's text model when it is given input embeddings,
and both are made exact by ``MultimodalInputs``, which stands in for mlx-lm's ``Gemma4TextModel``:
- mlx-vlm merges the image features into ``embed_tokens(ids) * embed_scale`` and feeds that as the
  hidden state, where mlx-lm multiplies whatever embeddings it is given by ``embed_scale``. The add-on's
  embeddings are mlx-vlm's (scaled); with them mlx-lm's scale is 1.0 for that call.
- the small models' per-layer inputs are looked up by token id, and mlx-vlm looks up id 0 at image (and
  audio, video) positions; mlx-lm would look up the image token itself.
Calls without embeddings (text prompts, every decode step, batched or not) reach mlx-lm unchanged.
"""

import types

import mlx.core as mx

from .base import VISION_KEYS, VisionAddOn


def text_ids(ids: mx.array, mm_ids: tuple) -> mx.array:
    """``ids`` with multimodal placeholders as 0, as mlx-vlm looks up the per-layer inputs."""
    mm = mx.zeros(ids.shape, dtype=mx.bool_)
    for t in mm_ids:
        mm = mm | (ids == t)
    return mx.where(mm, mx.zeros_like(ids), ids)


class MultimodalInputs:
    """Stands in for mlx-lm's ``Gemma4TextModel`` (not an nn.Module: its weights stay where they are)."""

    def __init__(self, inner, mm_ids: tuple):
        self.inner, self.mm_ids = inner, mm_ids

    def __call__(self, inputs=None, cache=None, input_embeddings=None, per_layer_inputs=None):
        inner = self.inner
        if input_embeddings is None or inputs is None:
            return inner(inputs, cache=cache, input_embeddings=input_embeddings, per_layer_inputs=per_layer_inputs)
        if per_layer_inputs is None and inner.hidden_size_per_layer_input:
            per_layer_inputs = inner._get_per_layer_inputs(text_ids(inputs, self.mm_ids))
        scale, inner.embed_scale = inner.embed_scale, 1.0  # the embeddings are already scaled
        try:
            return inner(inputs, cache=cache, input_embeddings=input_embeddings, per_layer_inputs=per_layer_inputs)
        finally:
            inner.embed_scale = scale

    def __getattr__(self, name):
        return getattr(self.__dict__["inner"], name)


def install_inputs(text_model, mm_ids: tuple) -> None:
    """Wrap the mlx-lm Gemma 4 text model's ``language_model.model`` (once per model)."""
    lm = text_model.language_model
    if not isinstance(lm.model, MultimodalInputs):
        object.__setattr__(lm, "model", MultimodalInputs(lm.model, mm_ids))


class Gemma4AddOn(VisionAddOn):
    family = "gemma4"
    module = "gemma4"
    processor_path = "gemma4.processing_gemma4:Gemma4Processor"
    placeholder = "<|image|>"
    token_attr = "image_token_id"
    weight_keys = VISION_KEYS + ("embed_vision",)

    def __init__(self, path, config, text_model, options):
        super().__init__(path, config, text_model, options)
        self.placeholder = getattr(self.processor, "image_token", "") or self.placeholder
        mc = self.mc
        install_inputs(text_model, tuple(t for t in (mc.image_token_id, mc.audio_token_id, mc.video_token_id)
                                         if t is not None))

    def _language_stub(self, embed):
        """mlx-vlm's merge multiplies ``embed_tokens`` by ``embed_scale``: scaled here (the same
        product), so the no-image suffix ``_embed`` returns is scaled too, as ``MultimodalInputs`` expects."""
        scale = self.mc.text_config.hidden_size ** 0.5
        inner = types.SimpleNamespace(embed_tokens=lambda ids: embed(ids) * scale, embed_scale=1.0,
                                      hidden_size_per_layer_input=0)  # per-layer inputs: MultimodalInputs
        return types.SimpleNamespace(model=inner)

    def build_modules(self, parts):
        vc, tc = self.mc.vision_config, self.mc.text_config
        parts.vision_tower = self.mod.VisionModel(vc)
        parts.embed_vision = self.mod.gemma4.MultimodalEmbedder(vc.hidden_size, tc.hidden_size, eps=vc.rms_norm_eps)
        parts.audio_tower = parts.embed_audio = None

    def split(self, inputs, n):
        pv = inputs["pixel_values"]
        return [((pv[i:i + 1] if isinstance(pv, mx.array) else mx.array(pv[i])[None]), {}) for i in range(n)]

    def encode(self, pv, extras):
        parts = self.parts
        return parts.embed_vision(parts.vision_tower(pv))  # [1, soft tokens, hidden]

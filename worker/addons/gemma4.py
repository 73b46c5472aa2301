"""Gemma 4: a 2-D RoPE patch encoder + pooler (``vision_tower``) and ``embed_vision``, its projector; the
small models (E2B, E4B) also a conformer audio tower (``audio_tower``) and ``embed_audio``.

Two things differ between mlx-vlm's Gemma 4 and mlx-lm's text model when it is given input embeddings,
and both are made exact by ``MultimodalInputs``, which stands in for mlx-lm's ``Gemma4TextModel``:
- mlx-vlm merges the image features into ``embed_tokens(ids) * embed_scale`` and feeds that as the
  hidden state, where mlx-lm multiplies whatever embeddings it is given by ``embed_scale``. The add-on's
  embeddings are mlx-vlm's (scaled); with them mlx-lm's scale is 1.0 for that call.
- the small models' per-layer inputs are looked up by token id, and mlx-vlm looks up id 0 at image (and
  audio, video) positions; mlx-lm would look up the image token itself.
Calls without embeddings (text prompts, every decode step, batched or not) reach mlx-lm unchanged, but
for ``kv_bits`` on the KV-shared layers (an mlx-lm bug: worker/patches/gemma4_shared_kv.py, whose wrapper a
text-only Gemma 4 with ``kv_bits`` gets at load and this one replaces).

The larger models (``use_bidirectional_attention: "vision"``, e.g. 26B-A4B) let the tokens of one
image attend to each other both ways. mlx-vlm does so when the whole prompt is one forward pass (a
prompt with images and no audio: it does not chunk those); inside ``with plan.state:`` the masks of a
prompt chunk get the same overlay, and no chunk ends inside an image (``Bidirectional.take``).
"""

import functools
import types

import mlx.core as mx
from mlx_lm.models.base import create_attention_mask

from ..patches.gemma4_shared_kv import shared_layer_caches, unwrapped
from .audio import AudioAddOn
from .base import VISION_KEYS, VisionAddOn


def text_ids(ids: mx.array, mm_ids: tuple) -> mx.array:
    """``ids`` with multimodal placeholders as 0, as mlx-vlm looks up the per-layer inputs."""
    mm = mx.zeros(ids.shape, dtype=mx.bool_)
    for t in mm_ids:
        mm = mm | (ids == t)
    return mx.where(mm, mx.zeros_like(ids), ids)


def vision_blocks(ids: mx.array, vision_ids: tuple) -> mx.array:
    """[L, L]: query and key are tokens of the same run of image (or video) tokens (mlx-vlm's blocks)."""
    vis = mx.zeros(ids.shape[-1:], dtype=mx.bool_)
    for t in vision_ids:
        vis = vis | (ids[0] == t)
    starts = vis & ~mx.concatenate([mx.zeros((1,), dtype=mx.bool_), vis[:-1]])
    group = mx.where(vis, mx.cumsum(starts.astype(mx.int32)) - 1, -1)
    return (group[:, None] == group[None, :]) & (group[:, None] >= 0)


def bidirectional_masks(inner, blocks, h, cache):
    """mlx-lm's masks for this chunk as arrays, its own image blocks attending both ways (the chunk's
    keys are the last L columns, for rotating layers too)."""
    by_type, masks = {}, []
    for layer, c in zip(inner.layers, cache):
        kind = layer.layer_type
        if kind not in by_type:
            window = inner.window_size if kind == "sliding_attention" else None
            m = create_attention_mask(h, c, window_size=window, return_array=True)
            n = blocks.shape[0]
            by_type[kind] = mx.concatenate([m[..., :-n], m[..., -n:] | blocks], axis=-1)
        masks.append(by_type[kind])
    return masks


class Bidirectional:
    """A request's state (prompts with images, no audio, on a bidirectional model): while entered, the
    prompt chunks' image blocks attend both ways. A prefill chunk that ends inside an image runs up to
    the image only; the image's head waits here and runs at the front of the next call (the caller
    reads no prefill output, and the cache holds, and is stored with, what really ran)."""

    def __init__(self, inputs: "MultimodalInputs"):
        self.inputs, self.pending = inputs, None

    def take(self, ids, emb):
        """(ids, embeddings) to run now: the waiting head first, then this call's, but a trailing image
        run (unless this is the one-token last step, which must answer)."""
        last_step = ids.shape[-1] == 1
        if self.pending is not None:
            ids = mx.concatenate([self.pending[0], ids], axis=-1)
            emb = mx.concatenate([self.pending[1], emb], axis=-2)
            self.pending = None
        vis = [t in self.inputs.vision_ids for t in ids[0].tolist()]
        if last_step or not vis[-1]:
            return ids, emb
        cut = len(vis) - next((i for i, v in enumerate(reversed(vis)) if not v), len(vis))
        self.pending = (ids[:, cut:], emb[:, cut:])
        return ids[:, :cut], emb[:, :cut]

    def __enter__(self):
        self.inputs.active = self
        return self

    def __exit__(self, *exc):
        self.inputs.active = None
        return False


class MultimodalInputs:
    """Stands in for mlx-lm's ``Gemma4TextModel`` (not an nn.Module: its weights stay where they are)."""

    def __init__(self, inner, mm_ids: tuple, vision_ids: tuple):
        self.inner, self.mm_ids, self.vision_ids = inner, mm_ids, vision_ids
        self.active = None  # the Bidirectional state of the request being prefilled

    def __call__(self, inputs=None, cache=None, input_embeddings=None, per_layer_inputs=None):
        inner = self.inner
        cache = shared_layer_caches(inner, cache)  # mlx-lm's kv_bits bug: worker/patches/gemma4_shared_kv.py
        if input_embeddings is None or inputs is None:
            return inner(inputs, cache=cache, input_embeddings=input_embeddings, per_layer_inputs=per_layer_inputs)
        if self.active is not None:
            inputs, input_embeddings = self.active.take(inputs, input_embeddings)
            if inputs.shape[-1] == 0:  # all of it waits: nothing runs (a prefill chunk: not read)
                return mx.zeros((1, 1, input_embeddings.shape[-1]), dtype=input_embeddings.dtype)
            if inputs.shape[-1] > 1:
                blocks = vision_blocks(inputs, self.vision_ids)
                object.__setattr__(inner, "_make_masks", functools.partial(bidirectional_masks, inner, blocks))
        if per_layer_inputs is None and inner.hidden_size_per_layer_input:
            per_layer_inputs = inner._get_per_layer_inputs(text_ids(inputs, self.mm_ids))
        scale, inner.embed_scale = inner.embed_scale, 1.0  # the embeddings are already scaled
        try:
            return inner(inputs, cache=cache, input_embeddings=input_embeddings, per_layer_inputs=per_layer_inputs)
        finally:
            inner.embed_scale = scale
            inner.__dict__.pop("_make_masks", None)

    def __getattr__(self, name):
        return getattr(self.__dict__["inner"], name)


def install_inputs(text_model, mm_ids: tuple, vision_ids: tuple) -> MultimodalInputs:
    """Wrap the mlx-lm Gemma 4 text model's ``Gemma4TextModel`` (``language_model.model``) once per model, in
    place of the kv_bits patch's wrapper (worker/patches/gemma4_shared_kv.py) when the load installed it."""
    lm = getattr(text_model, "language_model", text_model)
    if not isinstance(lm.model, MultimodalInputs):
        object.__setattr__(lm, "model", MultimodalInputs(unwrapped(lm.model), mm_ids, vision_ids))
    lm.model.mm_ids, lm.model.vision_ids = mm_ids, vision_ids
    return lm.model


class Gemma4AddOn(AudioAddOn, VisionAddOn):
    family = "gemma4"
    module = "gemma4"
    processor_path = "gemma4.processing_gemma4:Gemma4Processor"
    placeholder = "<|image|>"
    token_attr = "image_token_id"
    audio_placeholder = "<|audio|>"
    weight_keys = VISION_KEYS + ("embed_vision", "audio_tower", "embed_audio")

    def __init__(self, path, config, text_model, options):
        super().__init__(path, config, text_model, options)
        self.placeholder = getattr(self.processor, "image_token", "") or self.placeholder
        self.audio_placeholder = getattr(self.processor, "audio_token", "") or self.audio_placeholder
        mc = self.mc
        self.vision_ids = tuple(t for t in (mc.image_token_id, mc.video_token_id) if t is not None)
        mm_ids = tuple(t for t in self.vision_ids + (self.audio_token_id,) if t is not None)
        self.inputs = install_inputs(text_model, mm_ids, self.vision_ids)
        self.bidirectional = getattr(mc.text_config, "use_bidirectional_attention", None) == "vision"

    def _language_stub(self, embed):
        """mlx-vlm's merge multiplies ``embed_tokens`` by ``embed_scale``: scaled here (the same
        product), so the no-image suffix ``_embed`` returns is scaled too, as ``MultimodalInputs`` expects."""
        scale = self.mc.text_config.hidden_size ** 0.5
        inner = types.SimpleNamespace(embed_tokens=lambda ids: embed(ids) * scale, embed_scale=1.0,
                                      hidden_size_per_layer_input=0)  # per-layer inputs: MultimodalInputs
        return types.SimpleNamespace(model=inner)

    def _model_config(self, config):
        import json

        from mlx_vlm.utils import update_module_configs

        c = json.loads(json.dumps(config))
        self.accepts_audio = bool(c.get("audio_config"))  # the larger models have no audio tower
        for name in ("text_config", "vision_config"):
            c.setdefault(name, {})
        return update_module_configs(self.mod.ModelConfig.from_dict(c), self.mod, c,
                                     ["text", "vision", "audio"] if self.accepts_audio else ["text", "vision"])

    def build_modules(self, parts):
        mc, embedder = self.mc, self.mod.gemma4.MultimodalEmbedder
        vc, tc, ac = mc.vision_config, mc.text_config, mc.audio_config
        parts.vision_tower = self.mod.VisionModel(vc)
        parts.embed_vision = embedder(vc.hidden_size, tc.hidden_size, eps=vc.rms_norm_eps)
        parts.audio_tower = parts.embed_audio = None
        if self.accepts_audio:
            parts.audio_tower = self.mod.AudioEncoder(ac)
            parts.embed_audio = embedder(ac.output_proj_dims or ac.hidden_size, tc.hidden_size, eps=ac.rms_norm_eps)

    def split(self, inputs, n):
        pv = inputs["pixel_values"]
        return [((pv[i:i + 1] if isinstance(pv, mx.array) else mx.array(pv[i])[None]), {}) for i in range(n)]

    def encode(self, pv, extras):
        parts = self.parts
        return parts.embed_vision(parts.vision_tower(pv))  # [1, soft tokens, hidden]

    def join(self, feats):
        """Along the tokens: images (and clips) differ in length; the merge reads them in order."""
        return mx.concatenate(feats, axis=1)

    def make_state(self, ids, items):
        """mlx-vlm's vision overlay applies to a prompt with images and no audio (it chunks the others)."""
        if self.bidirectional and self.audio_token_id not in ids and any(t in self.vision_ids for t in ids):
            return Bidirectional(self.inputs)
        return None

    def encode_audio(self, inputs, index):
        """The clip's soft tokens as mlx-vlm scatters them: its audio-token positions read the encoder's
        frames in order (cyclically, should they be fewer)."""
        parts = self.parts
        mask = ~inputs["input_features_mask"].astype(mx.bool_)
        feats = parts.embed_audio(parts.audio_tower(inputs["input_features"], mask)[0])
        n = int((inputs["input_ids"] == self.audio_token_id).sum().item())
        return feats[:, mx.arange(n) % feats.shape[1]]

    def merge(self, ids, image_feats, audio_feats):
        """mlx-vlm's ``get_input_embeddings`` with both kinds of features given (it takes no cached audio)."""
        h = self.parts.language_model.model.embed_tokens(ids)
        for feats, token in ((image_feats, self.image_token_id), (audio_feats, self.audio_token_id)):
            if feats is not None:
                mask = mx.broadcast_to((ids == token)[..., None], h.shape)
                h = self.mod.gemma4.masked_scatter(h, mask, feats.astype(h.dtype))
        return h

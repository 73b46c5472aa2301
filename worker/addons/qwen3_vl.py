"""Qwen3-VL (and Qwen3-VL-MoE): interleaved M-RoPE positions and deepstack features for the mlx-lm
text model.

mlx-lm runs Qwen3-VL's text model as plain Qwen3 (1-D RoPE, no deepstack). mlx-vlm rotates with
interleaved M-RoPE (positions as Qwen2-VL's, so qwen2_vl.py's ``MRopeHook`` is reused with mlx-vlm's
interleaved rotary) and adds "deepstack" features (one merger per chosen vision layer) to the hidden
states that the first decoder layers output, at the image-token positions. Here those first layers
are given a subclass of their own class (same parameters, same module tree) whose ``__call__`` adds,
inside ``with plan.state:``, the features of the image tokens that fall in the current forward
chunk, located by the layer's KV cache offset: a prompt partly served from the cache and chunked
prefill add exactly what mlx-vlm adds. Outside a request state the layers are mlx-lm's own.
"""

import bisect

import mlx.core as mx

from .qwen2_vl import MRopeState, Qwen2VLAddOn

_SUBCLASSES: dict = {}


class DeepstackState(MRopeState):
    """A request's M-RoPE positions plus its deepstack features: ``feats[k]`` [n_image_tokens, D] is
    added after decoder layer k at the prompt's image-token positions ``image_pos`` (ascending)."""

    def __init__(self, box, prompt_positions, delta, image_pos: list, feats: list):
        super().__init__(box, prompt_positions, delta)
        self.image_pos, self.feats = image_pos, feats

    def added(self, k: int, offset: int, length: int):
        """(chunk-local indices, rows) of layer k's features inside [offset, offset + length), or None."""
        if k >= len(self.feats):
            return None
        lo = bisect.bisect_left(self.image_pos, offset)
        hi = bisect.bisect_left(self.image_pos, offset + length)
        if lo == hi:
            return None
        idx = mx.array([p - offset for p in self.image_pos[lo:hi]], dtype=mx.uint32)
        return idx, self.feats[k][lo:hi]


def _deepstack_call(self, x, mask=None, cache=None):
    state = self._worker_box.state
    if not isinstance(state, DeepstackState):
        return self._worker_base.__call__(self, x, mask, cache)
    offset = int(cache.offset) if cache is not None else 0
    out = self._worker_base.__call__(self, x, mask, cache)
    found = state.added(self._worker_k, offset, x.shape[1])
    if found is None:
        return out
    idx, rows = found  # as mlx-vlm's _deepstack_process (one row: the request's own)
    return mx.stack([mx.array(out[0]).at[idx].add(rows)], axis=0)


def install_deepstack(text_model, box, n: int) -> None:
    """Give the first ``n`` decoder layers the deepstack ``__call__`` (once per model)."""
    for k, layer in enumerate(text_model.layers[:n]):
        base = type(layer)
        if getattr(layer, "_worker_box", None) is not None:
            continue
        sub = _SUBCLASSES.get(base)
        if sub is None:
            sub = _SUBCLASSES[base] = type(f"Deepstack{base.__name__}", (base,), {"__call__": _deepstack_call})
        object.__setattr__(layer, "_worker_base", base)
        object.__setattr__(layer, "_worker_box", box)
        object.__setattr__(layer, "_worker_k", k)
        layer.__class__ = sub


class Qwen3VLAddOn(Qwen2VLAddOn):
    family = "qwen3_vl"
    module = "qwen3_vl"
    processor_path = "qwen3_vl.processing_qwen3_vl:Qwen3VLProcessor"
    rotary_class = "Qwen3VLRotaryEmbedding"

    def __init__(self, path, config, text_model, options):
        super().__init__(path, config, text_model, options)
        self.n_deepstack = len(self.mc.vision_config.deepstack_visual_indexes or [])
        if self.n_deepstack:
            install_deepstack(text_model, self.box, self.n_deepstack)

    def build_modules(self, parts):
        super().build_modules(parts)
        # the merge helper may be inherited (qwen3_5_moe's Model): base copies only the class's own
        merge = self.mod.Model.merge_input_ids_with_image_features
        object.__setattr__(parts, "merge_input_ids_with_image_features", merge)

    def rotary(self, tc):
        return getattr(self.language, self.rotary_class)(
            tc.head_dim, max_position_embeddings=tc.max_position_embeddings, base=tc.rope_theta,
            rope_scaling=tc.rope_scaling)

    def encode(self, pv, extras):
        """[1 + n_deepstack, tokens, D]: the merged features, then each deepstack merger's."""
        tower = self.parts.vision_tower
        feats, deepstack = tower(pv.astype(tower.patch_embed.proj.weight.dtype), extras["image_grid_thw"])
        return mx.stack([feats, *deepstack])

    def join(self, feats):
        return mx.concatenate([f[0] for f in feats], axis=0)

    def make_state(self, ids, items):
        pos, delta = self.prompt_positions(ids, items)
        if not self.n_deepstack:
            return MRopeState(self.box, pos, delta)
        image_pos = [i for i, t in enumerate(ids) if t == self.image_token_id]
        feats = [mx.concatenate([it.feats[1 + k] for it in items], axis=0) for k in range(self.n_deepstack)]
        return DeepstackState(self.box, pos, delta, image_pos, feats)


class Qwen3VLMoeAddOn(Qwen3VLAddOn):
    family = "qwen3_vl_moe"
    module = "qwen3_vl_moe"
    rotary_class = "Qwen3VLMoERotaryEmbedding"

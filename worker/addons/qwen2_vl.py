"""Qwen2-VL: vision tower + patch merger, and M-RoPE positions for the mlx-lm text model.

mlx-lm runs Qwen2-VL's text model with plain 1-D RoPE. The real model (and mlx-vlm) rotates image
tokens with 3-D (t, h, w) position ids and continues the text after an image from a compressed
position (``rope_deltas``). Here each attention layer's ``rope`` is wrapped once at load by
``MRopeHook``: while no request state is active it calls mlx-lm's own rope unchanged (text-only
requests are exactly mlx-lm); inside ``with plan.state:`` it rotates with mlx-vlm's M-RoPE using the
positions computed for the whole prompt (mlx-vlm's ``get_rope_index``), indexed by the KV cache
offset. Positions past the prompt (decode) are ``index + rope_delta`` on all three axes, as in
mlx-vlm. A prompt partly served from the cache works because positions are absolute.
"""

import functools
import threading

import mlx.core as mx

from .base import VisionAddOn


class _Active(threading.local):
    state = None


class MRopeState:
    """Per-request positions: ``prompt_positions`` [3, 1, N] and the delta for tokens after them."""

    def __init__(self, box: _Active, prompt_positions: mx.array, delta: int):
        self.box = box
        self.pos = prompt_positions.astype(mx.int32)
        self.n = int(prompt_positions.shape[-1])
        self.delta = int(delta)

    def positions(self, offset: int, length: int) -> mx.array:
        if offset + length <= self.n:
            return self.pos[:, :, offset:offset + length]
        start = max(offset, self.n)
        tail = mx.arange(start, offset + length, dtype=mx.int32) + self.delta
        tail = mx.broadcast_to(tail[None, None, :], (3, 1, offset + length - start))
        if offset >= self.n:
            return tail
        return mx.concatenate([self.pos[:, :, offset:], tail], axis=-1)

    def __enter__(self):
        if self.box.state is not None:
            raise RuntimeError("another M-RoPE request state is active")
        self.box.state = self
        return self

    def __exit__(self, *exc):
        self.box.state = None
        return False


class BatchPositions:
    """One batched decode step (worker/generation/decode_batch.py): each row's position is its cache offset plus its
    request's delta, with mlx-vlm's M-RoPE, as ``MRopeState`` decodes it alone; rows without state (text
    requests) keep mlx-lm's own rope."""

    def __init__(self, box: _Active, states: list):
        self.box = box
        self.rows = mx.array([s is not None for s in states])
        self.delta = mx.array([s.delta if s is not None else 0 for s in states], dtype=mx.int32)

    def positions(self, offset, length: int) -> mx.array:
        off = offset if isinstance(offset, mx.array) else mx.array([offset])
        pos = (off.astype(mx.int32) + self.delta)[:, None] + mx.arange(length, dtype=mx.int32)[None]
        return mx.broadcast_to(pos[None], (3, *pos.shape))

    __enter__ = MRopeState.__enter__
    __exit__ = MRopeState.__exit__


class MRopeHook:
    """Stands in for an attention layer's ``rope``; not an nn.Module, so it adds no parameters."""

    def __init__(self, base, rotary, box: _Active, apply):
        self.base, self.rotary, self.box, self.apply = base, rotary, box, apply

    def __call__(self, x, offset=0):
        state = self.box.state
        if state is None:
            return self.base(x, offset=offset)
        if isinstance(state, BatchPositions):
            cos, sin = self.rotary(x, state.positions(offset, x.shape[-2]))
            rotated = self.apply(x, x, cos, sin, unqueeze_dim=1)[0]
            return mx.where(state.rows[:, None, None, None], rotated, self.base(x, offset=offset))
        pos = state.positions(int(offset), x.shape[-2])
        cos, sin = self.rotary(x, pos)
        return self.apply(x, x, cos, sin, unqueeze_dim=1)[0]


def install_mrope(text_model, rotary, apply) -> _Active:
    """Wrap every attention ``rope`` of the mlx-lm text model (once per model); ``rotary(x, positions)``
    gives mlx-vlm's (cos, sin), ``apply(q, k, cos, sin, unqueeze_dim=1)`` rotates. Layers without
    ``self_attn`` (Qwen3.5's gated-delta layers) have no positions."""
    box = getattr(text_model, "_worker_mrope_box", None)
    if box is not None:
        return box
    box = _Active()
    for layer in text_model.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is not None and not isinstance(attn.rope, MRopeHook):
            object.__setattr__(attn, "rope", MRopeHook(attn.rope, rotary, box, apply))
    object.__setattr__(text_model, "_worker_mrope_box", box)
    return box


class Qwen2VLAddOn(VisionAddOn):
    family = "qwen2_vl"
    module = "qwen2_vl"
    processor_path = "qwen2_vl.processing_qwen2_vl:Qwen2VLProcessor"
    placeholder = "<|image_pad|>"
    token_attr = "image_token_id"
    language_module = ""  # the mlx-vlm module whose language.py has the rotary (default: ``module``)

    def __init__(self, path, config, text_model, options):
        super().__init__(path, config, text_model, options)
        self.language = __import__(f"mlx_vlm.models.{self.language_module or self.module}.language",
                                   fromlist=["x"])
        self.box = install_mrope(text_model, self.rotary(self.mc.text_config),
                                 self.language.apply_multimodal_rotary_pos_emb)
        self._rope_memo = None  # (prompt prefix, image digests) -> positions, delta

    def rotary(self, tc):
        """mlx-vlm's rotary embedding of this family's text model."""
        head_dim = tc.hidden_size // tc.num_attention_heads
        return self.language.Qwen2RotaryEmbedding(head_dim, max_position_embeddings=tc.max_position_embeddings,
                                                  base=tc.rope_theta, rope_scaling=tc.rope_scaling)

    def _language_stub(self, embed):
        stub = super()._language_stub(embed)
        lm_self = type("LM", (), {"config": self.mc})()
        stub.get_rope_index = functools.partial(self.mod.LanguageModel.get_rope_index, lm_self)
        return stub

    def build_modules(self, parts):
        parts.vision_tower = self.mod.VisionModel(self.mc.vision_config)

    def split(self, inputs, n):
        pv, grid = inputs["pixel_values"], inputs["image_grid_thw"]
        out, at = [], 0
        for i in range(n):
            rows = int(mx.prod(grid[i]).item())
            out.append((pv[at:at + rows], {"image_grid_thw": grid[i:i + 1]}))
            at += rows
        return out

    def encode(self, pv, extras):
        tower = self.parts.vision_tower
        pv = pv.astype(tower.patch_embed.proj.weight.dtype)
        return tower(pv, extras["image_grid_thw"], output_hidden_states=False)

    def embed_kwargs(self, extras):
        return {"image_grid_thw": mx.concatenate([e["image_grid_thw"] for e in extras], axis=0)}

    def batch_positions(self, states):
        return BatchPositions(self.box, states) if any(s is not None for s in states) else None

    def make_state(self, ids, items):
        return MRopeState(self.box, *self.prompt_positions(ids, items))

    def prompt_positions(self, ids, items):
        """mlx-vlm's positions for the prompt up to its last image token (the embeddings may cover only a
        suffix) and the delta; the text after it continues linearly, which ``MRopeState`` computes
        itself. The last prompt's are kept: a follow-up on the same images has the same ones."""
        end = len(ids) - ids[::-1].index(self.image_token_id)
        memo_key = (tuple(ids[:end]), tuple(it.digest for it in items))
        if self._rope_memo is None or self._rope_memo[0] != memo_key:
            ids_arr = mx.array(ids[:end])[None]
            pos, delta = self.parts.language_model.get_rope_index(
                ids_arr, **self.embed_kwargs([it.extras for it in items]),
                attention_mask=mx.ones(ids_arr.shape))
            self._rope_memo = (memo_key, pos, int(delta.reshape(-1)[0].item()))
        return self._rope_memo[1], self._rope_memo[2]

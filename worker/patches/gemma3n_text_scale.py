"""mlx-vlm 0.7.10's Gemma 3n leaves the text embeddings unscaled: ``Model.get_input_embeddings``
(mlx_vlm/models/gemma3n/gemma3n.py) returns ``embed_tokens(ids)`` at the text positions, and its language
model multiplies by sqrt(hidden_size) only when it is given ids, never given embeddings. mlx-lm's and
Transformers' Gemma 3n scale them (and mlx-vlm's own Gemma 4 does), so mlx-vlm's generate differs from
mlx-lm even on a text-only prompt. The Gemma 3n add-on builds its embeddings as mlx-vlm does
(worker/addons/gemma3n.py ``merge``) with the text positions scaled here.

Pinned by tests/unit/test_patches.py::test_mlx_vlm_gemma3n_text_embeddings_are_unscaled.
"""

import mlx.core as mx


def scale_text(h: mx.array, ids: mx.array, vocab_offset: int, hidden_size: int) -> mx.array:
    """``h`` (the text embeddings of ``ids``) times sqrt(hidden_size) at the text positions (ids below the
    vision vocabulary's ``vocab_offset``); the other positions as they are."""
    return mx.where((ids < vocab_offset)[..., None], h * (hidden_size ** 0.5), h)

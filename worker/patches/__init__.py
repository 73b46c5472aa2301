"""Workarounds of upstream library bugs, one module per bug.

Each module's docstring names the bug (library, version, what is wrong, where) and the test that pins it:
that test runs the library directly and asserts the wrong behaviour, so it fails once upstream fixes the
bug, and its message says which module to delete (tests/unit/test_patches.py).

- ``idefics3_llama``: mlx-lm has no idefics3 / smolvlm text model; it is loaded as mlx-lm's llama.
- ``gemma4_shared_kv``: mlx-lm's Gemma 4 KV-shared layers fail with kv_bits (float kernel on quantized K/V).
- ``gemma3n_text_scale``: mlx-vlm's Gemma 3n input embeddings leave the text positions unscaled.
- ``speculative_cache_split``: mlx-lm's speculative decoding splits main and draft caches at the main
  model's layer count (Gemma 4's cache list is shorter: the main cache is padded).
- ``gemma3_text_shard``: mlx-lm's Gemma 3 (text and VLM wrapper) has no ``shard()`` for tensor parallelism.
"""

"""mlx-lm 0.32.2's Gemma 4 fails with kv_bits: its KV-shared layers run the float attention kernel on
quantized K/V. ``Gemma4TextModel.__call__`` (mlx_lm/models/gemma4_text.py) gives the KV-shared layers (the
last ``num_kv_shared_layers``, which read an earlier layer's K/V) no cache entry (``make_cache`` has none
for them), and ``Attention`` passes that None to ``scaled_dot_product_attention``, which picks the kernel by
the cache: once the source layer's cache is quantized, ``generate_step(..., kv_bits=...)`` raises TypeError.
(mlx-vlm 0.7.10's Gemma 4 has the same gap.)

Here the ``Gemma4TextModel`` is wrapped so that each KV-shared layer whose source cache is quantized gets
``SharedQuantized``: it stores nothing and carries the source's ``bits`` / ``group_size``, so the
quantized kernel runs. worker/loading/model.py installs it for every Gemma 4 loaded with kv_bits; the Gemma 4
add-on's own wrapper (worker/addons/gemma4.py ``MultimodalInputs``) calls ``shared_layer_caches`` too.

Pinned by tests/unit/test_patches.py::test_mlx_lm_gemma4_kv_bits_fails_on_kv_shared_layers.
"""

GEMMA4_TYPES = ("gemma4", "gemma4_text")


class SharedQuantized:
    """The cache argument of a KV-shared layer whose source layer's cache is quantized (``kv_bits``).
    mlx-lm gives such a layer no cache, so it runs the float attention kernel on the packed K/V; with
    this stand-in (it stores nothing) it runs the quantized one."""

    def __init__(self, source):
        self.bits, self.group_size = source.bits, source.group_size

    def update_and_fetch(self, keys, values):
        return keys, values


def shared_layer_caches(inner, cache):
    """``cache`` over every layer when some layer is quantized, each KV-shared layer whose source is quantized
    with a stand-in (in place of no entry, or of speculative decoding's placeholder); else as it is."""
    if not cache or not any(hasattr(c, "bits") for c in cache):
        return cache
    out = list(cache) + [None] * (len(inner.layers) - len(cache))
    for j, i in enumerate(inner.previous_kvs):
        if i != j and hasattr(out[i], "bits"):
            out[j] = SharedQuantized(out[i])
    return out


class SharedKV:
    """Stands in for mlx-lm's ``Gemma4TextModel`` (not an nn.Module: its weights stay where they are)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, inputs=None, cache=None, input_embeddings=None, per_layer_inputs=None):
        inner = self.inner
        return inner(inputs, cache=shared_layer_caches(inner, cache), input_embeddings=input_embeddings,
                     per_layer_inputs=per_layer_inputs)

    def __getattr__(self, name):
        return getattr(self.__dict__["inner"], name)


def unwrapped(module):
    """The ``Gemma4TextModel`` under a ``SharedKV`` (for a wrapper of its own that replaces this one)."""
    return module.inner if isinstance(module, SharedKV) else module


def fit(model, config: dict, options) -> None:
    """Wrap the text model's ``Gemma4TextModel`` (``language_model.model``; ``model`` of a gemma4_text
    checkpoint) once, for a Gemma 4 loaded with kv_bits."""
    if options.kv_bits is None or config.get("model_type") not in GEMMA4_TYPES:
        return
    lm = getattr(model, "language_model", model)
    if not isinstance(lm.model, SharedKV):
        object.__setattr__(lm, "model", SharedKV(lm.model))

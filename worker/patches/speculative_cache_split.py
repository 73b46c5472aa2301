"""mlx-lm 0.32.2's speculative decoding splits one ``prompt_cache`` list into the main model's and the draft's
caches at ``len(model.layers)`` (``speculative_generate_step``, mlx_lm/generate.py: ``prompt_cache[:
len(model.layers)]``), but a model's cache list may be shorter than its layers: Gemma 4's ``make_cache``
(mlx_lm/models/gemma4_text.py) has no entry for its KV-shared layers. The draft's first caches then land in
the main model's list (and the draft runs short of its own), so decoding raises or its tokens differ from
plain greedy decoding.

Here the main cache is padded to ``len(model.layers)`` with ``NoCache`` entries (they store nothing and
trim as asked), so the split falls where the draft's list begins. worker/generation/speculation.py pads it.

Pinned by tests/unit/test_patches.py::test_mlx_lm_speculative_cache_split_misplaces_the_draft_caches.
"""


class NoCache:
    """The cache entry of a layer that keeps none (a Gemma 4 KV-shared layer): trimmable, storing nothing."""

    state = ()

    def is_trimmable(self):
        return True

    def trim(self, n):
        return n

    def update_and_fetch(self, keys, values):
        return keys, values


def pad_main_cache(model, cache) -> list:
    """``cache`` (the main model's) padded with ``NoCache`` to ``len(model.layers)`` entries, to be followed by
    the draft's caches in speculative_generate_step's ``prompt_cache``."""
    return list(cache) + [NoCache() for _ in range(len(model.layers) - len(cache))]

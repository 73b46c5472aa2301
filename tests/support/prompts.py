"""Random token prompts and a guard against degenerate references, shared by the process tests."""

import random


def random_ids(n, seed, low=20, high=400):
    """``n`` token ids drawn from one generator seeded with ``seed``: a random prompt, not one token repeated."""
    rng = random.Random(seed)
    return [rng.randrange(low, high) for _ in range(n)]


def assert_varied(tokens, min_distinct=3, what="reference output"):
    """Fail when a reference is too uniform to tell a right answer from a wrong one (e.g. one token repeated)."""
    distinct = len(set(tokens))
    assert distinct >= min_distinct, f"{what} is degenerate ({distinct} distinct tokens < {min_distinct}): {tokens}"

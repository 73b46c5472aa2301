"""The common prefix of two token lists (or texts): how the cache matches a prompt, and the prefix tokenizer
a text."""


def common_prefix(a, b) -> int:
    """Length of the common prefix of two strings or lists (C-speed slice comparisons, binary search:
    a follow-up usually extends the remembered prompt, which one comparison confirms)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # a[:lo] == b[:lo] holds; a[:hi] != b[:hi] or hi is the first unknown
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo

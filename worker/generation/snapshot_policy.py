"""When a request's bounded layers (sliding windows, recurrent state) are snapshotted: the one policy of the
solo and the batch drivers.

A bounded layer cannot be trimmed back, so a follow-up resumes only where a snapshot lies. Snapshots are taken
where the next turn is likely to diverge: where the cached prefix ended (an edit of this turn's message resumes
there), at the prompt's end, and every few tokens while decoding, keeping the newest, so a follow-up whose
re-rendered answer differs in its last tokens (a trimmed newline, a stop string cut off) resumes a few tokens
before the end, not at the prompt.
"""

from typing import Callable, List, Optional

from ..cache.snapshots import Snapshot, take_snapshot

DECODE_SNAPSHOT_EVERY = 4  # tokens between snapshots while decoding
DECODE_SNAPSHOTS = 2  # the newest ones are kept: 1-4 and 5-8 tokens before the end


def add(snapshots: List[Snapshot], n: Optional[int], take: Callable[[int], Optional[Snapshot]]) -> None:
    """Append ``take(n)`` (a snapshot holding ``n`` tokens, or None), unless the newest one already lies there."""
    if n and not (snapshots and snapshots[-1].n >= n):
        snap = take(n)
        if snap is not None:
            snapshots.append(snap)


def snapshot_into(snapshots: List[Snapshot], cache: list, n: Optional[int]) -> None:
    """``add`` for a request's own (unbatched) cache."""
    add(snapshots, n, lambda k: take_snapshot(cache, k))


def while_decoding(snapshots: List[Snapshot], n_generated: int, n: Optional[int],
                   take: Callable[[int], Optional[Snapshot]]) -> None:
    """After the ``n_generated``-th token, the cache holding ``n``: a snapshot every DECODE_SNAPSHOT_EVERY tokens,
    the newest DECODE_SNAPSHOTS kept."""
    if n_generated % DECODE_SNAPSHOT_EVERY == 0:
        add(snapshots, n, take)
        del snapshots[:-DECODE_SNAPSHOTS]

"""In-memory prompt-cache entries: longest-prefix reuse, trimming, LRU eviction within a byte budget.

Unlike mlx-lm's LRUPromptCache, a fetched entry is *taken* (no deep copy: the request owns and
extends it, then puts it back), a request can pin a conversation with a key, and every fetch says
why fewer tokens than possible were reused.
"""

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from .layout import adapt, make_cache
from .prefix import common_prefix
from .snapshots import best_snapshot, bounded, clone, keep, resume

log = logging.getLogger("worker")

MAX_GHOSTS = 32


@dataclass
class Entry:
    tokens: List[int]
    cache: Optional[list]  # None while it lives on disk only
    nbytes: int
    key: Optional[str] = None
    used: float = field(default_factory=time.monotonic)
    disk_name: Optional[str] = None
    snapshots: list = field(default_factory=list)  # Snapshots of its bounded layers (memory only)


@dataclass
class Lease:
    cache: list
    reused: int
    miss_reason: Optional[str]
    snapshots: list = field(default_factory=list)  # those still valid for the request's prompt


def cache_nbytes(cache) -> int:
    return sum(c.nbytes for c in cache)


def cache_len(cache) -> Optional[int]:
    """Tokens held by the cache, or None when its layers do not say (e.g. SSM state only)."""
    offsets = [c.offset for c in cache if hasattr(c, "offset")]
    return max(offsets) if offsets else None


class PromptCacheStore:
    def __init__(self, model, max_kv_size=None, max_bytes=2 << 30, max_entries=8, disk=None, kv_bits=None):
        self.model = model
        self.max_kv_size = max_kv_size
        self.kv_bits = kv_bits
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.disk = disk
        # with several ranks: rank 0's figures on every rank (distributed.group.World.agree), so that each
        # rank keeps, drops and evicts the same entries even where its own share of them has another size
        self.agree: Optional[Callable] = None
        # layers that cannot be cut back (sliding windows, recurrent state): reuse needs snapshots
        self.bounded = any(bounded(c) for c in self.fresh())
        self.entries: List[Entry] = []
        self.ghosts: List[List[int]] = []  # token lists of evicted entries, for miss reasons
        self._unsaved: Optional[Entry] = None
        if disk is not None:
            self.entries.extend(disk.index())

    def _agreed(self, figures):
        return self.agree(figures) if self.agree is not None else figures

    def fresh(self) -> list:
        return make_cache(self.model, self.max_kv_size, self.kv_bits)

    def take(self, ids: List[int], key: Optional[str] = None) -> Lease:
        """The best cache for a prompt: the entry that can serve the longest prefix of it, of any conversation.

        An entry the prompt fully extends, of the same ``cache_key`` (or both without one), is handed over
        (the request extends it and puts it back); any other match is copied up to the shared prefix,
        so the entry stays for its own conversation: a shared system prompt is shared, not stolen, and a
        pinned entry is never taken by a request with another key.
        """
        matches = [(e, n) for e in self.entries for n in (common_prefix(e.tokens, ids),) if n]
        if not matches:
            return Lease(self.fresh(), 0, self._reason_for_nothing(self.entries, ids))
        if len(ids) <= 1:  # a one-token prompt: nothing could be reused, nothing was missed
            return Lease(self.fresh(), 0, None)
        # the most tokens served, not the longest match: an entry that cannot be cut back to its match
        # (a sliding window past it, without a snapshot there) loses to one that can serve fewer
        best, common = max(matches, key=lambda m: (_usable(m[0], m[1], ids), _rank(m[0], key), m[1]))
        reuse = min(common, len(ids) - 1)  # keep one token to process, so decoding has logits
        cache = best.cache
        if cache is None:
            cache = self.disk.load(best)
            if cache is None:
                self.entries.remove(best)
                return Lease(self.fresh(), 0, "disk_entry_unreadable")
            best.cache = cache = adapt(cache, self.kv_bits)
        excess = len(best.tokens) - reuse
        if excess > 0 and not can_trim_prompt_cache(cache):
            snap = best_snapshot(best.snapshots, reuse)
            if snap is None:
                return Lease(self.fresh(), 0, "untrimmable")
            best.used = time.monotonic()
            reason = f"prefix_diverged_at {common}" if snap.n < len(ids) - 1 else None
            return Lease(resume(cache, snap), snap.n, reason, keep(best.snapshots, snap.n + 1))
        snapshots = keep(best.snapshots, reuse + 1)
        if best.key == key and common == len(best.tokens):
            self._hand_over(best)
        else:
            cache = clone(cache)
            best.used = time.monotonic()
        if excess > 0:
            trim_prompt_cache(cache, excess)
        reason = None
        if common < len(best.tokens) and reuse < len(ids) - 1:
            reason = f"prefix_diverged_at {common}"
        elif reuse < len(ids) - 1 and self._ghost_match(ids) > reuse:
            reason = "evicted"
        return Lease(cache, reuse, reason, snapshots)

    def _hand_over(self, entry: Entry) -> None:
        self.entries.remove(entry)
        if entry.disk_name is not None:  # the file stays a candidate until an extension replaces it
            self.entries.append(Entry(entry.tokens, None, entry.nbytes, entry.key, entry.used, entry.disk_name))

    def put(self, tokens: List[int], cache: list, key: Optional[str] = None, snapshots=()) -> None:
        """Store a request's cache holding ``tokens`` (its prompt key + generated ids), with the
        snapshots its request took or inherited (each a prefix of ``tokens``)."""
        n = cache_len(cache)
        if n is None or n == 0 or n > len(tokens):
            return  # nothing reusable, or we cannot tell which tokens it holds
        tokens = list(tokens[:n])
        snapshots = keep(snapshots, n)
        kv, snap_bytes = self._agreed([cache_nbytes(cache), [s.nbytes for s in snapshots]])
        while snapshots and kv + sum(snap_bytes) > self.max_bytes:
            snapshots, snap_bytes = snapshots[1:], snap_bytes[1:]  # the oldest go first: the entry must fit
        if key is not None:
            self._drop([e for e in self.entries if e.key == key])
        if can_trim_prompt_cache(cache):  # an entry that this one extends is now redundant
            self._drop([e for e in self.entries if e.key == key and len(e.tokens) <= n
                        and tokens[: len(e.tokens)] == e.tokens])
        entry = Entry(tokens, cache, kv + sum(snap_bytes), key, snapshots=snapshots)
        self.entries.append(entry)
        self._evict()
        if self.disk is not None and entry in self.entries:
            self._unsaved = entry

    def persist(self) -> None:
        """Write the newest entry to disk; called after the request's terminal event is sent."""
        entry, self._unsaved = self._unsaved, None
        if entry is not None and entry.cache is not None and entry.disk_name is None:
            self.disk.save(entry)
            self._evict_disk_only()

    def clear(self) -> dict:
        dropped = self.stats()
        self._drop(list(self.entries))
        self.ghosts.clear()
        if self.disk is not None:
            self.disk.clear()
        return dropped

    def stats(self) -> dict:
        live = [e for e in self.entries if e.cache is not None]
        return {
            "entries": len(live),
            "tokens": sum(len(e.tokens) for e in live),
            "bytes": sum(e.nbytes for e in live),
            "disk_entries": sum(1 for e in self.entries if e.disk_name is not None),
            "max_bytes": self.max_bytes,
            "max_entries": self.max_entries,
        }

    # ------------------------------------------------------------------

    def _reason_for_nothing(self, pool, ids) -> Optional[str]:
        if len(ids) <= 1:
            return None  # a one-token prompt cannot reuse anything
        if self._ghost_match(ids) > 0:
            return "evicted"
        if self.disk is not None and any(common_prefix(t, ids) for t in self.disk.unreadable):
            return "disk_entry_unreadable"
        if not pool:
            if self.disk is not None and self.disk.other_layouts():
                return "options_changed"
            return "no_entry"
        return "prefix_diverged_at 0"

    def _ghost_match(self, ids) -> int:
        return max((common_prefix(g, ids) for g in self.ghosts), default=0)

    def _drop(self, entries) -> None:
        for e in entries:
            if e in self.entries:
                self.entries.remove(e)
            if self.disk is not None and e.disk_name is not None:
                self.disk.remove(e)

    def _evict(self) -> None:
        def in_memory():
            return [e for e in self.entries if e.cache is not None]

        while in_memory() and (len(in_memory()) > self.max_entries
                               or sum(e.nbytes for e in in_memory()) > self.max_bytes):
            victim = min(in_memory(), key=lambda e: e.used)
            log.info("prompt cache: evicting an entry of %d tokens (%d bytes)",
                     len(victim.tokens), victim.nbytes)
            self.ghosts = (self.ghosts + [victim.tokens])[-MAX_GHOSTS:]
            if victim.disk_name is not None:
                victim.cache = None  # still on disk: it can come back
            else:
                self.entries.remove(victim)

    def _evict_disk_only(self) -> None:
        for e in self.disk.enforce_budget(self._agreed):
            if e in self.entries and e.cache is None:
                self.entries.remove(e)


def _usable(entry: Entry, common: int, ids: List[int]) -> int:
    """The prompt tokens ``entry`` can serve, sharing ``common`` with it: all of them (one is always left to
    process) when it needs no cut or can be cut back there, else its newest snapshot's, else none. An entry on
    disk only counts as usable (its layers are read when it is taken)."""
    reuse = min(common, len(ids) - 1)
    if entry.cache is None or len(entry.tokens) <= reuse or can_trim_prompt_cache(entry.cache):
        return reuse
    snap = best_snapshot(entry.snapshots, reuse)
    return snap.n if snap is not None else 0


def _rank(entry: Entry, key: Optional[str]):
    """Between equally long matches: the request's own conversation first, then the most recent."""
    return (entry.key == key, entry.used)

"""The prompt cache: reuse KV state across requests (in memory, and optionally on disk)."""

from .store import Entry, Lease, PromptCacheStore, cache_len, cache_nbytes  # noqa: F401
from .disk import DiskCache, layout_identity, model_identity  # noqa: F401,E402
